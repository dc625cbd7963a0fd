"""The batch tier beside interactive work: what a running batch costs interactive requests, and how
much of the box a batch gets when nothing else runs.

One worker and one API process on the small model (a Redis of the run's own). Four phases, each
after the worker is idle again:

1. interactive alone: seeded Poisson arrivals (the mix of bench/scheduler_policies.py: 75 % short,
   25 % long, half code), each a streamed `/v1/completions` request; TTFT timed at the client
   (send → first chunk with text);
2. the same arrivals while a batch of --lines chat lines runs (`POST /v1/files` + `/v1/batches`,
   the arrivals start once it is in progress): TTFT again, and the batch runs on to its end;
3. the batch alone: create → `completed` as the client polls it, its completion tokens from the
   output file;
4. the same lines as ordinary `/v1/chat/completions` requests sent at once (--at-once in flight).

Prints interactive TTFT p50 / p95 without and with the batch (goal: p95 up by at most 10 %) and
the batch's throughput alone ÷ the same requests sent at once (goal ≥ 0.9). --out also keeps, per
interactive request beside the batch, the moments it was sent, queued, claimed, its first token
written and read; --profile samples the service's processes with py-spy during phase 4.

    python -m bench.batch_tier [--lines 10000] [--jobs 160] [--rate 14] [--batch 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.harness import auth, service_env, start_api, start_worker, stop, wait_workers_ready
from bench.scheduler_policies import Arrival, arrivals, wait_idle
from bench.service_vs_vllm import cpu_times, first_of, job_marks, pct, spied_each, stage_times
from bench.stream_client import Record
from localmoe.redis_server import RedisServer
from moe_build.checkpoint import build_checkpoint

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def batch_lines(n: int, max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "messages": [{"role": "user", "content": f"def helper_{i}(values):"}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(n)
    ]


def ttft(http: httpx.Client, plan: list[Arrival]) -> list[Record]:
    """Each arrival streamed at its time; → per request, its send, first text and job as the
    client saw them (Record.ttft)."""
    out = [Record(0.0) for _ in plan]
    start = time.perf_counter() + 0.2

    def one(i: int) -> None:
        delay = start + plan[i].at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        body = {
            "prompt": plan[i].prompt,
            "max_tokens": plan[i].max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        rec = out[i] = Record(time.time())
        with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            rec.job_id = r.headers.get("Location", "").rpartition("/")[2]
            for line in r.iter_lines():
                text = line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text")
                if text and not rec.first:
                    rec.first = time.time()
        assert rec.first, "a stream without text"

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(len(plan))))
    return out


def stages(marks: list[list[float] | None]) -> dict[str, list[float]]:
    """Where the TTFTs went (bench.service_vs_vllm.stage_times) → stage → [p50, p95] in ms."""
    times = stage_times(marks)
    return {k: [round(pct(v, 50), 1), round(pct(v, 95), 1)] for k, v in times.items() if v}


def timeline(marks: list[list[float] | None]) -> list[list[float] | None]:
    """Per request, when it was sent, queued, claimed, its first token written and read (seconds
    from the phase's first send; bench.service_vs_vllm.job_marks): requests served in bursts show
    as first tokens at one moment, and the stage before it says where they waited."""
    t0 = min(m[0] for m in marks if m is not None)
    return [None if m is None else [round(x - t0, 4) for x in m] for m in marks]


@contextlib.contextmanager
def spied_service(folder: Path | None, worker: int, api: int) -> Iterator[None]:
    """py-spy (bench.service_vs_vllm.spied_each) for the block on the first process of each kind under
    the worker (consumer, runtime, engine, vLLM's core) and the API: `folder`/beside-<kind>.raw."""
    if folder is None:
        yield
        return
    procs = {**cpu_times(worker), **cpu_times(api, "api")}
    with spied_each(
        str(folder), "beside", first_of(procs, ("api", "consumer", "runtime", "engine", "vllm-core"))
    ):
        yield


def create_batch(http: httpx.Client, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    upload = http.post("/v1/files", files={"file": ("lines.jsonl", data)}, data={"purpose": "batch"})
    upload.raise_for_status()
    made = http.post(
        "/v1/batches",
        json={"input_file_id": upload.json()["id"], "endpoint": CHAT, "completion_window": "24h"},
    )
    made.raise_for_status()
    return str(made.json()["id"])


def wait_batch(http: httpx.Client, batch_id: str, until: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
    said = time.monotonic()
    while True:
        batch: dict[str, Any] = http.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in until:
            return batch
        if time.monotonic() - said >= 5:  # a progress line every 5 s
            counts = batch.get("request_counts") or {}
            done, total = counts.get("completed", 0), counts.get("total", 0)
            print(f"  batch {batch['status']}: {done}/{total} lines", flush=True)
            said = time.monotonic()
        time.sleep(0.2)


def batch_tokens(http: httpx.Client, batch: dict[str, Any]) -> int:
    assert batch["status"] == "completed" and not batch.get("error_file_id"), batch
    text = http.get(f"/v1/files/{batch['output_file_id']}/content").text
    return sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in text.splitlines())


def at_once(http: httpx.Client, lines: list[dict[str, Any]], in_flight: int) -> tuple[int, float]:
    """→ (completion tokens, seconds from the first send to the last answer)."""

    def one(line: dict[str, Any]) -> int:
        r = http.post(CHAT, json=line["body"])
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        tokens = sum(pool.map(one, lines))
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=10_000, help="the batch's lines")
    ap.add_argument("--line-tokens", type=int, default=16, help="max_tokens of each line (EOS ignored)")
    ap.add_argument("--jobs", type=int, default=160, help="interactive arrivals")
    ap.add_argument("--rate", type=float, default=14.0, help="interactive arrivals per second")
    ap.add_argument("--batch", type=int, default=16, help="the worker's batch size")
    ap.add_argument("--at-once", type=int, default=64, help="requests in flight in phase 4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    ap.add_argument("--profile", type=Path, help="py-spy the service's processes in phase 4 into this folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-batch-tier-"))
    print(f"[1/6] building the small model in {tmp}", flush=True)
    model = build_checkpoint(tmp / "model", progress=False)
    plan = arrivals(args.jobs, args.rate, args.seed)
    lines = batch_lines(args.lines, args.line_tokens)
    with RedisServer(tmp / "redis") as server:
        env = service_env(
            server.url,
            model,
            tmp,
            LOCALMOE_ENGINE__MAX_BATCH_SIZE=str(args.batch),
            LOCALMOE_ENGINE__CPU_THREADS="1",
        )
        print("[2/6] starting a worker and the API", flush=True)
        worker = start_worker("w1", env)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        procs = [worker]
        try:
            wait_workers_ready(client, ["w1"])
            api_proc, api = start_api(env)
            procs.append(api_proc)
            http = httpx.Client(base_url=api, headers=auth(env), timeout=600)
            ttft(http, arrivals(32, args.rate, args.seed + 1))  # warm-up
            wait_idle(client, ["w1"])
            print(f"[3/6] {args.jobs} interactive requests alone", flush=True)
            timed_alone = ttft(http, plan)
            alone_stages = stages(job_marks(http, timed_alone))
            wait_idle(client, ["w1"])
            print(f"[4/6] the same beside a batch of {args.lines} lines", flush=True)
            batch_id = create_batch(http, lines)
            wait_batch(http, batch_id, ("in_progress", *TERMINAL))
            with spied_service(args.profile, worker.pid, api_proc.pid):
                timed_beside = ttft(http, plan)
            wait_batch(http, batch_id)
            beside_marks = job_marks(http, timed_beside)  # one read of the jobs' timings for both
            beside_stages, beside_timeline = stages(beside_marks), timeline(beside_marks)
            wait_idle(client, ["w1"])
            print("[5/6] the batch alone", flush=True)
            started = time.perf_counter()
            batch_id = create_batch(http, lines)
            done = wait_batch(http, batch_id)
            batch_s = time.perf_counter() - started
            made_tokens = batch_tokens(http, done)
            batch_tps = made_tokens / batch_s
            wait_idle(client, ["w1"])
            print(f"[6/6] the same {args.lines} requests sent at once ({args.at_once} in flight)", flush=True)
            tokens, once_s = at_once(http, lines, args.at_once)
            once_tps = tokens / once_s
            http.close()
        finally:
            stop(procs)
            client.close()
    alone, beside = [r.ttft for r in timed_alone], [r.ttft for r in timed_beside]
    a50, a95, b50, b95 = (pct(alone, 50), pct(alone, 95), pct(beside, 50), pct(beside, 95))
    print(f"\ninteractive TTFT ({args.jobs} requests at {args.rate:g}/s), ms: p50 / p95 / mean")
    print(f"  alone          {a50 * 1e3:7.1f} / {a95 * 1e3:7.1f} / {statistics.mean(alone) * 1e3:7.1f}")
    print(f"  beside a batch {b50 * 1e3:7.1f} / {b95 * 1e3:7.1f} / {statistics.mean(beside) * 1e3:7.1f}")
    print(f"  p95 with ÷ without: {b95 / a95:.2f} (goal ≤ 1.10); p50 {b50 / a50:.2f}")
    print(f"  by stage, p50 / p95 ms: alone {alone_stages}")
    print(f"                          beside a batch {beside_stages}")
    print(
        f"batch alone: {batch_tps:.0f} tok/s ({batch_s:.1f} s); the same sent at once: {once_tps:.0f} tok/s"
    )
    print(f"  batch ÷ at once: {batch_tps / once_tps:.2f} (goal ≥ 0.90)")
    if args.out:
        figures = {
            "ttft_alone_s": alone,
            "ttft_beside_batch_s": beside,
            "stages_alone_ms": alone_stages,
            "stages_beside_batch_ms": beside_stages,
            "timeline_beside_batch_s": beside_timeline,  # sent, queued, claimed, first token, read
            "batch_tokens": made_tokens,
            "batch_tokens_per_s": batch_tps,
            "at_once_tokens": tokens,
            "at_once_tokens_per_s": once_tps,
        }
        args.out.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
