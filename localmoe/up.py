"""`localmoe up`: the whole service on one box, from one command.

Starts, in order: its own Redis (unless LOCALMOE_REDIS_URL names one), the embedded small model
(built on first start unless LOCALMOE_MODEL_DIR names one), one worker per visible GPU or per
tensor-parallel group of GPUs (pinned with CUDA_VISIBLE_DEVICES) or one CPU worker, the API
processes (uvicorn, sharing api_port: api/serve.py) and Flower (basic auth, its history kept in
the home: localmoe/flower.py).
SIGINT / SIGTERM stop every child: the API and Flower first, then workers, then Redis.

One `up` per home (host/instance.py): it holds the home's lock for its life and refuses to
start beside another; it checks every port it will bind before it starts anything; each child is
tied to it (PR_SET_PDEATHSIG), so that killing `up` (SIGKILL included) takes every child with it:
Redis gets SIGTERM (it flushes its append-only file), the others SIGKILL (jobs are leased and
acknowledged late: a new start re-queues what was running).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from host.gpus import Topology, describe, group_gpus, nvml_index, read_topology
from host.instance import Holder, InstanceLock, die_with_parent, taken
from host.settings import EngineSettings, Settings
from localmoe.redis_server import RedisServer, free_port

log = logging.getLogger("localmoe.up")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    argv: list[str]
    env: dict[str, str]
    started: float = 0.0  # time.monotonic() of its latest start
    restarts: int = 0  # in a row: back to 0 once it has run STABLE_S
    due: float = 0.0  # when a dead child is started again


RESTART_BASE_S = 1.0  # the first restart waits this long, doubling up to RESTART_MAX_S
RESTART_MAX_S = 30.0
STABLE_S = 60.0  # a child that ran this long had recovered: its next death waits RESTART_BASE_S


def load_secrets(home: Path) -> dict[str, str]:
    """Passwords generated on first start, kept in home/secrets.json (mode 0600)."""
    path = home / "secrets.json"
    values: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    changed = False
    for key in ("redis_password", "flower_password"):
        if key not in values:
            values[key] = secrets.token_urlsafe(24)
            changed = True
    if changed:
        path.write_text(json.dumps(values, indent=2))
        path.chmod(0o600)
    return values


def visible_gpus() -> list[str]:
    """GPU ids this box offers workers: CUDA_VISIBLE_DEVICES if set, else every NVML device."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver: a CPU box
        return []
    try:
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def engine_tp(engine: EngineSettings) -> int:
    """GPUs one worker's engine spans: DeepSpeed's tensor_parallel_size for that backend, vLLM's
    for vllm and auto (auto serves with vLLM whenever the model fits), 1 for torch."""
    if engine.backend == "torch":
        return 1
    return (engine.deepspeed if engine.backend == "deepspeed" else engine.vllm).tensor_parallel_size


def worker_plan(
    gpus: list[str], tp: int = 1, topology: Callable[[], Topology | None] = read_topology
) -> list[tuple[str, str]]:
    """(worker name, CUDA_VISIBLE_DEVICES) per worker: one per GPU, or one CPU worker that sees
    no GPU at all. gpus are CUDA_VISIBLE_DEVICES entries (NVML indices or GPU UUIDs).

    With tp > 1, one worker per group of tp GPUs ("gpu0-1" sees "0,1"). Tensor parallelism
    all-reduces every layer, so the groups are chosen by group_gpus over the topology() reads
    (NVML; a seam for tests) for their slowest internal link; in the order given when there is no
    topology or an entry does not map onto it. GPUs that fill no group stay unused (warned);
    fewer GPUs than tp stops the start.
    """
    if tp == 1 or not gpus:
        return [(f"gpu{g}", g) for g in gpus] or [("cpu0", "")]
    if len(gpus) < tp:
        raise SystemExit(f"tensor_parallel_size {tp} needs {tp} GPUs per worker; this box offers {gpus}")
    topo = topology()
    index = [nvml_index(g, topo.uuids if topo else None) for g in gpus]
    if topo is None or None in index or len(set(index)) < len(gpus):
        full = len(gpus) - len(gpus) % tp
        log.info("no NVML topology for GPUs %s: groups of %d in the order given", gpus, tp)
        if full < len(gpus):
            log.warning("GPUs %s form no full group of %d and stay unused", gpus[full:], tp)
        groups = [gpus[i : i + tp] for i in range(0, full, tp)]
    else:
        entry = {i: g for i, g in zip(index, gpus, strict=True) if i is not None}
        log.info("GPU topology:\n%s", describe(topo))
        groups = []
        for grp in group_gpus(topo, tp, list(entry)):
            log.info("tensor-parallel group: NVML GPUs %s, slowest link %s", grp, topo.worst(grp).value)
            groups.append([entry[i] for i in grp])
    return [(f"gpu{'-'.join(g)}", ",".join(g)) for g in groups]


def ensure_model(settings: Settings) -> Path:
    """The model to serve: LOCALMOE_MODEL_DIR, or the embedded small model — trained, shipped packed
    in moe_build/assets (moe_build/packed.py) and unpacked into the home on first start."""
    from moe_build.checkpoint import is_checkpoint
    from moe_build.packed import EMBEDDED, unpack

    path = settings.resolved_model_dir
    if is_checkpoint(path):
        return path
    if settings.model_dir is not None:
        raise SystemExit(
            f"LOCALMOE_MODEL_DIR={path} is not a model directory (config.json, *.safetensors, tokenizer.json)"
        )
    print(f"unpacking the embedded small model into {path} (first start only)", flush=True)
    return unpack(EMBEDDED, path)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.redis: RedisServer | None = None
        self.stopping = False
        self.api_key = ""
        self.instance = secrets.token_hex(8)  # its API processes answer /readyz with it
        self.workers = worker_plan(visible_gpus(), engine_tp(settings.engine))
        self._tied = die_with_parent(signal.SIGKILL)  # each child dies with this process

    def ports(self) -> dict[str, tuple[str, int]]:
        """The ports this start binds, Redis's excepted: the setting naming each → (host, port)."""
        s = self.settings
        ports = {
            "LOCALMOE_API_PORT": (s.api_host, s.api_port),
            "LOCALMOE_FLOWER_PORT": (s.flower_host, s.flower_port),
            "LOCALMOE_METRICS__WEBHOOK_PORT": (s.metrics.host, s.metrics.webhook_port),
        }
        if s.metrics.worker_port:
            for i in range(len(self.workers)):
                ports["LOCALMOE_METRICS__WORKER_PORT" + (f" (+{i})" if i else "")] = (
                    s.metrics.host,
                    s.metrics.worker_port + i,
                )
        return ports

    def holder(self) -> Holder:
        s = self.settings
        return Holder(
            pid=os.getpid(),
            api_url=s.resolved_api_url,
            flower_url=s.flower_url,
            home=str(s.home),
            instance=self.instance,
        )

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        # start_new_session: our signals, not the terminal's; _tied: gone when this process is
        proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=self._tied)
        self.children.append(Child(name, proc, argv, env, started=time.monotonic()))
        log.info("started %s (pid %d)", name, proc.pid)

    def supervise(self) -> None:
        """Restart what died, with backoff: 1 s, 2 s, 4 s … 30 s in a row, back to 1 s after a
        minute of running. Redis first: its children reconnect to it by themselves."""
        now = time.monotonic()
        if self.redis is not None and not self.redis.running():
            log.error(
                "redis exited (code %s); restarting it on the same port and data", self.redis.exit_code()
            )
            self.redis.start()
        for child in self.children:
            if child.proc.poll() is None:
                if child.restarts and now - child.started > STABLE_S:
                    child.restarts = 0
                continue
            if child.due == 0.0:
                wait = min(RESTART_BASE_S * 2**child.restarts, RESTART_MAX_S)
                child.due = now + wait
                log.error(
                    "%s (pid %d) exited with code %s; restarting it in %.0f s (restart %d)",
                    child.name, child.proc.pid, child.proc.returncode, wait, child.restarts + 1,
                )  # fmt: skip
            elif now >= child.due:
                child.proc = subprocess.Popen(
                    child.argv, env=child.env, start_new_session=True, preexec_fn=self._tied
                )
                child.started, child.due, child.restarts = now, 0.0, child.restarts + 1
                log.warning("restarted %s (pid %d)", child.name, child.proc.pid)

    def start(self) -> None:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = load_secrets(s.home)
        env = {**os.environ, "LOCALMOE_INSTANCE": self.instance}
        if s.redis_url is None:
            tied = die_with_parent(signal.SIGTERM)  # Redis flushes its append-only file and exits
            planned = {port for _, port in self.ports().values()}
            port = free_port()
            while port in planned:  # a free port now, but one the API or Flower is about to bind
                port = free_port()
            self.redis = RedisServer(s.home / "redis", keys["redis_password"], port, preexec_fn=tied)
            self.redis.start()
            env["LOCALMOE_REDIS_URL"] = self.redis.url
            log.info("redis on 127.0.0.1:%d (password in %s)", self.redis.port, s.home / "secrets.json")
        self._ensure_api_key(env["LOCALMOE_REDIS_URL"])
        model = ensure_model(s)
        env["LOCALMOE_MODEL_DIR"] = str(model)
        env["LOCALMOE_HOME"] = str(s.home)

        for i, (name, devices) in enumerate(self.workers):
            port = s.metrics.worker_port + i if s.metrics.worker_port else 0  # its exporter; 0: off
            worker_env = {**env, "CUDA_VISIBLE_DEVICES": devices, "LOCALMOE_METRICS__WORKER_PORT": str(port)}
            self.spawn(f"worker-{name}", self._worker_argv(name), worker_env)
        self.spawn("webhooks", [sys.executable, "-m", "workers.webhooks"], env)
        metrics = str(self._metrics_dir())
        api_env = {**env, "LOCALMOE_API_REUSE_PORT": "true", "PROMETHEUS_MULTIPROC_DIR": metrics}
        for i in range(s.resolved_api_processes()):  # one port: the kernel spreads connections over them
            self.spawn(f"api-{i}", [sys.executable, "-m", "localmoe", "api"], api_env)
        self.spawn("flower", [sys.executable, "-m", "localmoe", "flower"], env)  # its password: secrets.json
        api = s.resolved_api_url
        print(
            f"LocalMoE API   {api}\n         docs  {api}/docs\n       Flower  {s.flower_url}"
            f"  (user {s.flower_user}, password in {s.home / 'secrets.json'})",
            flush=True,
        )

    def _ensure_api_key(self, redis_url: str) -> None:
        """First start: an admin key, printed once and kept where the CLI looks (secrets.json)."""
        from api.auth import ensure_admin_key

        path = self.settings.home / "secrets.json"
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            made = ensure_admin_key(client, path)
        finally:
            client.close()
        if made is not None:
            print(
                f"admin API key (shown once; kept in {path} for the localmoe CLI):\n    {made}",
                flush=True,
            )
        self.api_key = made or json.loads(path.read_text())["api_key"]

    def _metrics_dir(self) -> Path:
        """Where the API processes keep their Prometheus samples, so that any of them answers a
        scrape for all (prometheus_client's multiprocess mode); emptied at every start."""
        path = self.settings.home / "run" / "api-metrics"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, mode=0o700)
        return path

    def _worker_argv(self, name: str) -> list[str]:
        return [sys.executable, "-m", "localmoe", "worker", "--name", name]

    def wait_ready(self, timeout: float = 600) -> bool:
        deadline = time.monotonic() + timeout
        url = f"{self.settings.resolved_api_url}/readyz"
        while time.monotonic() < deadline and not self.stopping:
            if self.dead_child() is not None:
                return False
            try:
                auth = {"Authorization": f"Bearer {self.api_key}"}
                r = httpx.get(url, headers=auth, timeout=2)
                # the API this `up` started, not another one answering on the port
                if r.status_code == 200 and r.headers.get("X-LocalMoE-Instance") == self.instance:
                    print("LocalMoE is ready: a worker has loaded and warmed up its engine", flush=True)
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        return False

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self) -> None:
        """Front ends first (no new work comes in), then workers, then the webhook worker (the
        last events go out), then Redis."""
        self.stopping = True
        workers = [c for c in self.children if c.name.startswith("worker")]
        hooks = [c for c in self.children if c.name == "webhooks"]
        front = [c for c in self.children if c not in workers and c not in hooks]
        for group in (front, workers, hooks):
            for c in group:
                if c.proc.poll() is None:
                    c.proc.terminate()
            for c in group:
                try:
                    c.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in 20 s; killing it", c.name)
                    c.proc.kill()
                    c.proc.wait()
        if self.redis is not None:
            self.redis.stop()
        log.info("all stopped")


def run(settings: Settings) -> int:
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = InstanceLock(settings.home)
    other = lock.acquire()
    if other is not None:
        print(
            f"another `localmoe up` (pid {other.pid}) serves {settings.home}: API {other.api_url}, "
            f"Flower {other.flower_url}.\nStop it with `localmoe down`, or start this one with "
            "another LOCALMOE_HOME.",
            file=sys.stderr,
        )
        return 2
    try:
        return _run(settings, lock)
    finally:
        lock.release()


def _run(settings: Settings, lock: InstanceLock) -> int:
    sup = Supervisor(settings)
    problems = taken(sup.ports())  # something else holds one: a line each
    if problems:
        print("\n".join(problems) + "\nnothing was started", file=sys.stderr)
        return 2
    lock.publish(sup.holder())

    def on_signal(signum: int, _frame: object) -> None:
        sup.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        sup.start()
        if not sup.wait_ready():
            dead = sup.dead_child()
            if dead is not None and not sup.stopping:  # a child that cannot even start: say so, stop
                log.error(
                    "%s exited with code %s before the service was ready", dead.name, dead.proc.returncode
                )
                code = 1
                return code
        while not sup.stopping:
            sup.supervise()
            time.sleep(0.2)
    finally:
        sup.stop()
    return code
