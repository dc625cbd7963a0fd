"""What the service costs on top of its engine.

The same workload (64 jobs × 64 new tokens, greedy, so both paths generate the same tokens) runs
straight into an engine in this process and through the whole service (HTTP → API → Redis →
Celery worker → engine → Redis), alternating, in one run. Prints, per round and as medians:
throughput ratio service ÷ engine (goal ≥ 0.90) and the added time to first token per job,
p50 and p99 (goals ≤ 5 ms and ≤ 20 ms).

Both paths see the same arrivals: job i arrives at i × gap (default 5 ms, i.e. 200 jobs/s). Engine
TTFT: arrival → the step that made its first token returns. Service TTFT: the client's send time
→ first_token_at in the job's record (the relay writes the first token to Redis). Throughput:
tokens ÷ (first arrival → last token). Both engines run with the same torch thread count.

    python -m bench.service_vs_engine [--jobs 64] [--tokens 64] [--rounds 5] [--gap-ms 5] [--events]

--events: what Flower's task events cost. Flower runs beside the service (as `localmoe up` runs it)
and every round runs the service three times after the engine, in an order that rotates by round:
task events off, on (the relay's, per job: scheduler/task_events.py; switched through the live
config) and Celery's own per-message events (switched by Celery's enable_events / disable_events
control commands). Each switch is checked with a probe job before the round. Prints, per mode, the
median over rounds of its throughput ÷ the same round's events-off throughput (goal ≥ 0.98 for the
default, relay) and of its added TTFT p50 minus events off's (goal ≤ 1 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis
import torch

from bench.harness import auth, service_env, start_api, start_worker, stop, wait_workers_ready
from host import config_store
from host.heap import freeze_heap
from host.settings import Settings
from localmoe.redis_server import RedisServer, free_port
from moe_build.checkpoint import build_checkpoint
from moe_core.engine import Engine, GenerationRequest, SamplingParams
from scheduler import keys
from scheduler.jobs import JobStatus, job_from_hash
from scheduler.queue import make_celery
from workers.engine_setup import construct


def prompts(n: int) -> list[str]:
    heads = [
        "def fibonacci(n):\n",
        "The service accepts a job and",
        "class Queue:\n    def push(self, x):\n",
        "In a mixture of experts, the router",
        "for line in open(path):\n",
    ]
    return [f"{heads[i % len(heads)]}# {i}\n" if i % 2 else f"{heads[i % len(heads)]} {i}" for i in range(n)]


def run_engine(engine: Engine, texts: list[str], tokens: int, gap: float) -> tuple[float, list[float], int]:
    """Job i arrives at i × gap seconds and is added at the next step boundary, as the worker's
    loop admits jobs; its TTFT counts from its arrival.
    → (tokens/s from the first arrival to the last token, TTFT per job in s, tokens generated)."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    generated = 0
    while len(added) < len(texts) or engine.has_unfinished():
        now = time.perf_counter()
        while len(added) < len(texts) and now - start >= len(added) * gap:
            i = len(added)
            engine.add_request(GenerationRequest(str(i), texts[i], params))
            added[str(i)] = start + i * gap  # its arrival: the wait for the step boundary counts
        if not engine.has_unfinished():
            time.sleep(max(0.0, start + len(added) * gap - time.perf_counter()))
            continue
        for d in engine.step():
            if d.token_ids and d.request_id not in first:
                first[d.request_id] = time.perf_counter()
            generated += len(d.token_ids)
    elapsed = time.perf_counter() - start
    return generated / elapsed, [first[k] - added[k] for k in sorted(added, key=int)], generated


def run_service(
    pool: ThreadPoolExecutor,
    api: str,
    client: redis.Redis,
    texts: list[str],
    tokens: int,
    gap: float,
    label: str = "",
) -> tuple[float, list[float], int]:
    """The same arrivals as HTTP requests, one client thread per in-flight request (httpx's sync
    client: its async client spent ~4 ms per request here, the sync one 0.5 ms).
    TTFT: the client's send time → the first token in Redis."""
    start = time.time()
    sent: list[float] = [0.0] * len(texts)

    def post(i: int) -> str:
        time.sleep(max(0.0, start + i * gap - time.time()))
        http = _client(api)
        sent[i] = time.time()
        r = http.post("/v1/jobs", json={"prompt": texts[i], "max_tokens": tokens, "ignore_eos": True})
        return str(r.json()["id"])

    ids = list(pool.map(post, range(len(texts))))
    while True:
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(job_id), "status")
        if all(s is not None and JobStatus(json.loads(s)).terminal for s in pipe.execute()):
            break
        time.sleep(0.05)
    jobs = [job_from_hash(client.hgetall(keys.job(i))) for i in ids]  # type: ignore[arg-type]
    assert all(j.status == "succeeded" for j in jobs), [j.error for j in jobs if j.error]
    t1 = max(j.timings.finished_at or 0 for j in jobs)
    generated = sum(j.usage.completion_tokens for j in jobs)
    ttft = [(j.timings.first_token_at or 0) - t for j, t in zip(jobs, sent, strict=True)]
    stages = {
        "http": [(j.timings.queued_at or 0) - t for j, t in zip(jobs, sent, strict=True)],
        "queue": [(j.timings.started_at or 0) - (j.timings.queued_at or 0) for j in jobs],
        "engine": [(j.timings.first_token_at or 0) - (j.timings.started_at or 0) for j in jobs],
    }
    print(
        f"    {label}where the service's TTFT goes, p50 / max (ms): "
        + "  ".join(f"{k} {pct(v, 50) * 1000:.1f} / {max(v) * 1000:.1f}" for k, v in stages.items()),
        flush=True,
    )
    return generated / (t1 - start), ttft, generated


_local = threading.local()
_local_headers: dict[str, str] = {}  # the run's API key, set once the service is up


def _client(api: str) -> httpx.Client:
    if not hasattr(_local, "http"):
        # Idle connections are dropped after 2 s, before uvicorn closes them (its keep-alive is 5 s):
        # a request sent on a connection the server is closing fails with "Server disconnected
        # without sending a response" (it did, on the H200, between a warm-up and the first round).
        limits = httpx.Limits(keepalive_expiry=2.0)
        _local.http = httpx.Client(base_url=api, timeout=60, headers=_local_headers, limits=limits)
    return _local.http


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--device", help="the in-process engine's device; the worker's is LOCALMOE_ENGINE__DEVICE"
    )
    ap.add_argument(
        "--backend", default="torch", choices=["torch", "vllm", "deepspeed"], help="the engine of both paths"
    )
    ap.add_argument(
        "--gpu-share",
        type=float,
        default=0.4,
        help="vLLM: each of the two engines (worker, in-process) takes this share of the GPU",
    )
    ap.add_argument("--dtype", default="float32", help="float32 keeps greedy tokens identical on both paths")
    ap.add_argument("--model-dir", help="serve this model instead of building the small one")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="job i arrives at i × gap (both paths)")
    ap.add_argument(
        "--events", action="store_true", help="task events off / relay / Celery's, alternating (see above)"
    )
    args = ap.parse_args()
    texts = prompts(args.jobs)
    settings = Settings()
    settings.engine.backend = args.backend
    settings.engine.dtype = args.dtype
    settings.engine.max_batch_size = args.jobs
    settings.engine.vllm.gpu_memory_utilization = args.gpu_share
    gap = args.gap_ms / 1000
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-bench-"))
    print(f"[1/4] building the small model in {tmp}", flush=True)
    model = Path(args.model_dir) if args.model_dir else build_checkpoint(tmp / "model", progress=False)
    with RedisServer(tmp / "redis") as server:
        env = service_env(
            server.url,
            model,
            tmp,
            LOCALMOE_ENGINE__MAX_BATCH_SIZE=str(args.jobs),
            LOCALMOE_ENGINE__DTYPE=args.dtype,
            LOCALMOE_ENGINE__BACKEND=args.backend,
            LOCALMOE_ENGINE__VLLM__GPU_MEMORY_UTILIZATION=str(args.gpu_share),
        )
        print("[2/4] starting a worker and the API", flush=True)
        procs = [start_worker("bench", env, quiet=True)]
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            wait_workers_ready(client, ["bench"])
            api_proc, api = start_api(env)
            _local_headers.update(auth(env))
            procs.append(api_proc)
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            if device == "cpu":
                torch.set_num_threads(settings.engine.resolved_cpu_threads())  # as the worker does
            engine = construct(args.backend, model, device, settings.engine)
            engine.load()
            freeze_heap()  # as the worker's engine process does once loaded
            with ThreadPoolExecutor(args.jobs) as pool:
                if args.events:
                    procs.append(start_flower(env))
                    compare_events(engine, pool, api, client, texts, args, gap, Events(client, server.url))
                else:
                    compare(engine, pool, api, client, texts, args, gap)
        finally:
            stop(procs)
            client.close()


def compare(
    engine: Engine,
    pool: ThreadPoolExecutor,
    api: str,
    client: redis.Redis,
    texts: list[str],
    args: argparse.Namespace,
    gap: float,
) -> None:
    """Warm-up, then rounds alternating engine and service; the same client threads every round,
    so their connections are warm, as long-lived clients' are."""
    print("[3/4] warm-up round (untimed)", flush=True)
    run_engine(engine, texts, args.tokens, gap)
    run_service(pool, api, client, texts, args.tokens, gap)
    ratios, p50s, p99s = [], [], []
    print(
        f"[4/4] {args.rounds} timed rounds of {args.jobs} jobs × {args.tokens} tokens, one arrival every "
        f"{args.gap_ms} ms; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    for r in range(args.rounds):
        e_tps, e_ttft, e_n = run_engine(engine, texts, args.tokens, gap)
        s_tps, s_ttft, s_n = run_service(pool, api, client, texts, args.tokens, gap)
        assert e_n == s_n, f"different work: engine {e_n} tokens, service {s_n}"
        added = [(s - e) * 1000 for s, e in zip(s_ttft, e_ttft, strict=True)]
        ratios.append(s_tps / e_tps)
        p50s.append(pct(added, 50))
        p99s.append(pct(added, 99))
        print(
            f"  round {r + 1}: engine {e_tps:7.0f} tok/s  service {s_tps:7.0f} tok/s  "
            f"ratio {ratios[-1]:.3f}  TTFT engine p50 {pct(e_ttft, 50) * 1000:6.1f} ms  "
            f"service p50 {pct(s_ttft, 50) * 1000:6.1f} ms  added p50 {p50s[-1]:6.1f} ms  "
            f"p99 {p99s[-1]:6.1f} ms",
            flush=True,
        )
    print(
        f"median over {args.rounds} rounds: throughput service/engine {statistics.median(ratios):.3f}"
        f" (goal ≥ 0.90); added TTFT p50 {statistics.median(p50s):.1f} ms (goal ≤ 5),"
        f" p99 {statistics.median(p99s):.1f} ms (goal ≤ 20)"
    )


MODES = ("off", "relay", "celery")  # task events: none, the relay's per job, Celery's per message


class Events:
    """Switches the worker's task events between MODES, and checks the switch with a probe job:
    which event messages its run publishes (the relay's, or the Celery consumer's)."""

    def __init__(self, client: redis.Redis, url: str) -> None:
        self.client = client
        self.app = make_celery(url)
        self.settings = Settings()
        self.mode = ""
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self.pubsub.psubscribe(f"/{db}.celeryev/task.*")

    def switch(self, mode: str, api: str) -> None:
        if mode == self.mode:
            return
        relay = mode == "relay"
        config_store.set_values(self.client, self.settings, {"flower.task_events": relay}, by="bench")
        (self.app.control.enable_events if mode == "celery" else self.app.control.disable_events)()
        deadline = time.monotonic() + 30
        while self.probe(api) != mode:  # the worker's config poll takes up to 2 s
            assert time.monotonic() < deadline, f"task events did not switch to {mode}"
            time.sleep(0.25)
        self.mode = mode

    def probe(self, api: str) -> str:
        """The mode a probe job's run shows."""
        while self.pubsub.get_message(timeout=0.01):  # what earlier runs published
            pass
        job_id = _client(api).post("/v1/jobs", json={"prompt": "probe", "max_tokens": 1}).json()["id"]
        status = keys.job(job_id)
        while not (raw := self.client.hget(status, "status")) or not JobStatus(json.loads(raw)).terminal:
            time.sleep(0.01)
        seen = set()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.05)
            if message:  # both send task.multi lists; Celery's dispatcher base64-encodes its body
                encoding = json.loads(message["data"])["properties"].get("body_encoding")
                seen.add("celery" if encoding == "base64" else "relay")
        return "off" if not seen else "/".join(sorted(seen))


def start_flower(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`localmoe flower`, as `localmoe up` runs it beside the service (it reads every event)."""
    port = free_port()
    flower_env = {**env, "LOCALMOE_FLOWER_PORT": str(port), "LOCALMOE_FLOWER_PASSWORD": "bench"}
    proc = subprocess.Popen([sys.executable, "-m", "localmoe", "flower"], env=flower_env)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/workers", auth=("admin", "bench")).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "flower exited"
        time.sleep(0.1)


def compare_events(
    engine: Engine,
    pool: ThreadPoolExecutor,
    api: str,
    client: redis.Redis,
    texts: list[str],
    args: argparse.Namespace,
    gap: float,
    events: Events,
) -> None:
    """Warm-up, then rounds: the engine, then the service in each mode (the order rotates)."""
    print("[3/4] warm-up round (untimed), every mode", flush=True)
    run_engine(engine, texts, args.tokens, gap)
    for mode in MODES:
        events.switch(mode, api)
        run_service(pool, api, client, texts, args.tokens, gap, f"{mode:6} ")
    print(
        f"[4/4] {args.rounds} timed rounds of {args.jobs} jobs × {args.tokens} tokens, one arrival every "
        f"{args.gap_ms} ms; torch threads {torch.get_num_threads()}; task events {', '.join(MODES)}",
        flush=True,
    )
    tps: dict[str, list[float]] = {m: [] for m in MODES}
    added_p50: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        e_tps, e_ttft, e_n = run_engine(engine, texts, args.tokens, gap)
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            events.switch(mode, api)
            s_tps, s_ttft, s_n = run_service(pool, api, client, texts, args.tokens, gap, f"{mode:6} ")
            assert e_n == s_n, f"different work: engine {e_n} tokens, service {s_n} ({mode})"
            tps[mode].append(s_tps)
            added_p50[mode].append(pct([(s - e) * 1000 for s, e in zip(s_ttft, e_ttft, strict=True)], 50))
        print(
            f"  round {r + 1}: engine {e_tps:7.0f} tok/s  "
            + "  ".join(
                f"{m} {tps[m][-1]:7.0f} tok/s ({tps[m][-1] / e_tps:.3f}) added p50 {added_p50[m][-1]:5.1f} ms"
                for m in MODES
            ),
            flush=True,
        )
    events.switch("relay", api)  # the default, for whoever looks at the worker afterwards
    off = tps["off"]
    for mode in MODES[1:]:
        ratio = statistics.median(t / o for t, o in zip(tps[mode], off, strict=True))
        extra = statistics.median(a - o for a, o in zip(added_p50[mode], added_p50["off"], strict=True))
        print(
            f"task events {mode} against off, median over {args.rounds} rounds: throughput {ratio:.3f} "
            f"(goal ≥ 0.98), added TTFT p50 {extra:+.1f} ms (goal ≤ 1)"
        )


if __name__ == "__main__":
    main()
