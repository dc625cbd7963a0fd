"""The service's processes for a benchmark: one environment, workers, the API, readiness waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import redis

from api.auth import KeyLimits, Scope, create_key
from localmoe.redis_server import free_port
from scheduler import keys
from scheduler.registry import WorkerInfo

Proc = subprocess.Popen[bytes]


def py_spy() -> str:
    """The py-spy executable: the one installed beside this Python (a venv's bin, not always on
    PATH), else PATH's."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


@contextlib.contextmanager
def spied(outs: dict[Path, int], *flags: str, rate: int = 100) -> Iterator[None]:
    """`py-spy record` on each pid for the block, raw samples into its path (`flags`: py-spy's,
    e.g. --gil, or --subprocesses --idle); started a second before the block, so that the block's
    start is sampled. A py-spy that wrote nothing is said on stdout, with its last words."""
    spies = []
    for out, pid in outs.items():
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), *flags]
        argv += ["--format", "raw", "--output", str(out), "--nonblocking"]
        try:
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as e:  # no py-spy here: the block's figures stand without its samples
            print(f"  py-spy wrote nothing to {out.name}: {type(e).__name__}: {e}", flush=True)
            continue
        spies.append((out, spy))
    if spies:
        time.sleep(1.0)
    try:
        yield
    finally:
        for _, spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        for out, spy in spies:
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                err = "did not exit"
            if not out.exists():
                print(f"  py-spy wrote nothing to {out.name}: {err.strip()[-300:]}", flush=True)


def service_env(redis_url: str, model: Path, home: Path, **settings: str) -> dict[str, str]:
    """This process's environment plus what every LocalMoE process of the run needs; settings are
    extra LOCALMOE_* variables. Makes the run's API key (admin, no rate or backlog limit that a
    benchmark could hit) and passes it as LOCALMOE_API_KEY (see `auth`)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    unlimited = KeyLimits(max_queued_jobs=10**9, max_queued_tokens=10**12, rate_per_s=1e9, burst=10**9)
    key = create_key(client, "benchmark", Scope.ADMIN, unlimited).secret
    client.close()
    return {
        **os.environ,
        "LOCALMOE_API_KEY": key,
        "LOCALMOE_LIMITS__MAX_QUEUED_JOBS": str(10**9),
        "LOCALMOE_LIMITS__MAX_QUEUED_TOKENS": str(10**12),
        "LOCALMOE_REDIS_URL": redis_url,
        "LOCALMOE_MODEL_DIR": str(model),
        "LOCALMOE_HOME": str(home),
        "LOCALMOE_LOG_LEVEL": "warning",
        **settings,
    }


def auth(env: dict[str, str]) -> dict[str, str]:
    """Request headers carrying the run's API key."""
    return {"Authorization": f"Bearer {env['LOCALMOE_API_KEY']}"}


def start_worker(name: str, env: dict[str, str], quiet: bool = False, cpus: set[int] | None = None) -> Proc:
    """`localmoe worker --name name`; `cpus`: the only cores it and every process it starts (its
    engine's) may run on."""
    out = subprocess.DEVNULL if quiet else None
    argv = [sys.executable, "-m", "localmoe", "worker", "--name", name]
    return subprocess.Popen(argv, env=env, stdout=out, stderr=out, preexec_fn=pinned(cpus))


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """Popen's preexec_fn that keeps the child (and all it starts) on `cpus`; None for no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def wait_workers_ready(client: redis.Redis, names: list[str], procs: Sequence[Proc] = ()) -> None:
    """Until every named worker's heartbeat says its engine is warm; RuntimeError as soon as one of
    `procs` (their processes) has exited instead."""
    while not all(
        (raw := client.get(keys.worker(n))) and WorkerInfo.model_validate_json(raw).ready for n in names
    ):
        if gone := [p.args for p in procs if p.poll() is not None]:
            raise RuntimeError(f"a worker exited before its engine was ready: {gone}")
        time.sleep(0.1)


def start_api(env: dict[str, str], ready: bool = True) -> tuple[Proc, str]:
    """uvicorn on a free loopback port; returns once /readyz answers 200 (a warm worker is known,
    and the scheduler has read the registry), or with ready=False once /healthz does."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--log-level", "warning"]
    proc: Proc = subprocess.Popen([*argv, "--no-access-log"], env=env)
    api = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{api}/{'readyz' if ready else 'healthz'}", headers=auth(env)).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def stop(procs: list[Proc]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)
