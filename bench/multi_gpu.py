"""Several GPUs of one box: per-GPU workers under a mixed load (does the scheduler spread it, and
does a killed worker lose a job?), and one tensor-parallel worker against per-GPU replicas.

    python -m bench.multi_gpu --model ref-model --mode replicas [--kill]   # one worker per GPU
    python -m bench.multi_gpu --model ref-model --mode tp                  # one worker, TP = all GPUs
    python -m bench.multi_gpu --model ref-model --mode tp --backend deepspeed   # the same with DeepSpeed

Redis, the API and the workers run as the service runs them (bench/harness.py). The workload is
the same seeded arrival sequence in every mode: `--jobs` jobs, Poisson arrivals at `--rate` per
second, half code and half prose prompts, 75 % short (`--short` tokens) and 25 % long (`--long`),
EOS ignored so every mode generates the same token count. Prints, per mode: throughput (tokens/s
from the first arrival to the last job's end), completion latency p50 / p95 (arrival → done),
and per worker: jobs run, tokens, mean GPU utilization (NVML, sampled from the registry every
0.5 s while jobs run). With --kill, one worker is killed with SIGKILL when 40 % of the jobs have
arrived; the ledger then checks every accepted job ended `succeeded` exactly once and counts
the jobs that needed a second attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.harness import auth, service_env, start_api, start_worker, stop, wait_workers_ready
from localmoe.redis_server import RedisServer

CODE = ["def merge_sort(items):\n", "class LRUCache:\n    def __init__(self, size):\n", "for row in rows:\n"]
TEXT = ["The quarterly report shows that", "Mixture-of-experts models route each token", "Dear team,"]


def arrivals(n: int, rate: float, short: int, long: int, seed: int) -> list[tuple[float, str, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        head = rng.choice(CODE if i % 2 else TEXT)
        out.append((t, f"{head} # {i}", long if rng.random() < 0.25 else short))
    return out


def gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len(visible.split(","))
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def run(args: argparse.Namespace) -> dict[str, object]:
    gpus = gpu_count()
    assert gpus >= 2, f"{gpus} GPU(s) visible: this benchmark needs several"
    plan = arrivals(args.jobs, args.rate, args.short, args.long, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-multigpu-"))
    with RedisServer(tmp / "redis") as server:
        env = service_env(
            server.url,
            Path(args.model),
            tmp,
            LOCALMOE_ENGINE__BACKEND=args.backend,
            LOCALMOE_ENGINE__DTYPE="bfloat16",
            LOCALMOE_ENGINE__MAX_BATCH_SIZE=str(args.batch),
            LOCALMOE_ENGINE__VLLM__GPU_MEMORY_UTILIZATION=str(args.gpu_share),
            LOCALMOE_METRICS__WORKER_PORT="0",
        )
        if args.mode == "tp":
            layout = {"tp": ",".join(str(i) for i in range(gpus))}
            extra = {f"LOCALMOE_ENGINE__{args.backend.upper()}__TENSOR_PARALLEL_SIZE": str(gpus)}
        else:
            layout = {f"gpu{i}": str(i) for i in range(gpus)}
            extra = {}
        print(f"[1/3] {args.mode}: starting {len(layout)} worker(s) on {gpus} GPUs", flush=True)
        t0 = time.monotonic()
        procs = {n: start_worker(n, {**env, **extra, "CUDA_VISIBLE_DEVICES": d}) for n, d in layout.items()}
        client = redis.Redis.from_url(server.url, decode_responses=True)
        api_proc = None
        try:
            wait_workers_ready(client, list(layout))
            print(f"      workers ready in {time.monotonic() - t0:.0f} s", flush=True)
            api_proc, api = start_api(env)
            http = httpx.Client(base_url=api, headers=auth(env), timeout=120)
            # A worker whose engine failed to load serves on the next one in its preference list:
            # the figures would then be that engine's. Refuse them.
            engines = {w["name"]: (w["engine"], w["engine_reason"]) for w in http.get("/v1/workers").json()}
            print(f"      engines: {engines}", flush=True)
            wrong = {n: e for n, e in engines.items() if e[0] != args.backend}
            if wrong:
                raise SystemExit(f"worker(s) not on {args.backend}: {wrong}")
            for head in (CODE[0], TEXT[0]):  # warm-up: one job per modality through the path
                job = http.post("/v1/jobs", json={"prompt": head, "max_tokens": 8}).json()
                _wait(http, [job["id"]], 120)
            print(f"[2/3] {len(plan)} jobs at {args.rate}/s", flush=True)
            result = _drive(http, client, plan, procs if args.kill else None, list(layout))
        finally:
            if api_proc is not None:
                stop([api_proc])
            stop([p for p in procs.values() if p.poll() is None])
            client.close()
    result["mode"], result["backend"] = args.mode, args.backend
    return result


def _drive(
    http: httpx.Client,
    client: redis.Redis,
    plan: list[tuple[float, str, int]],
    kill: dict[str, subprocess.Popen[bytes]] | None,
    workers: list[str],
) -> dict[str, object]:
    ids: list[str | None] = [None] * len(plan)
    sent: list[float] = [0.0] * len(plan)
    start = time.perf_counter() + 0.5
    samples: dict[str, list[float]] = defaultdict(list)
    running = threading.Event()
    running.set()
    killed: list[str] = []

    def sample() -> None:
        while running.is_set():
            for w in http.get("/v1/workers").json():
                utils = [
                    g["utilization_pct"] for g in w.get("gpus", []) if g.get("utilization_pct") is not None
                ]
                if utils and w["running"]:
                    samples[w["name"]].append(statistics.mean(utils))
            time.sleep(0.5)

    def post(i: int) -> None:
        at, prompt, tokens = plan[i]
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.time()
        r = http.post("/v1/jobs", json={"prompt": prompt, "max_tokens": tokens, "ignore_eos": True})
        assert r.status_code == 202, r.text
        ids[i] = r.json()["id"]
        if kill is not None and i == int(0.4 * len(plan)) and not killed:
            victim = workers[-1]
            info = json.loads(client.get(f"localmoe:worker:{victim}") or "{}")
            proc = kill[victim]
            os.kill(proc.pid, signal.SIGKILL)
            os.kill(info["pid"], signal.SIGKILL)  # its engine process (the consumer dies with it anyway)
            killed.append(victim)
            print(f"      killed worker {victim} after {i} arrivals", flush=True)

    threading.Thread(target=sample, daemon=True).start()
    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(post, range(len(plan))))
    jobs = _wait(http, [i for i in ids if i], 900)
    running.clear()
    end = max(j["timings"]["finished_at"] for j in jobs)
    tokens = sum(j["usage"]["completion_tokens"] for j in jobs)
    latency = sorted(j["timings"]["finished_at"] - s for j, s in zip(jobs, sent, strict=True))
    per_worker: dict[str, Counter[str]] = defaultdict(Counter)
    for j in jobs:
        per_worker[j["worker"]]["jobs"] += 1
        per_worker[j["worker"]]["tokens"] += j["usage"]["completion_tokens"]
    statuses = Counter(j["status"] for j in jobs)
    return {
        "jobs": len(jobs),
        "statuses": dict(statuses),
        "lost": len(plan) - len(jobs),
        "second_attempts": sum(j["attempt"] > 1 for j in jobs),
        "killed": killed,
        "tokens_per_s": tokens / (end - min(sent)),
        "p50_s": statistics.median(latency),
        "p95_s": latency[int(0.95 * (len(latency) - 1))],
        "workers": {
            w: {**c, "gpu_util_pct": round(statistics.mean(samples[w]), 1) if samples[w] else None}
            for w, c in sorted(per_worker.items())
        },
    }


def _wait(http: httpx.Client, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"{len(ids) - len(done)} jobs not finished in {timeout} s"
        for i in ids:
            if i not in done:
                job = http.get(f"/v1/jobs/{i}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    done[i] = job
        time.sleep(0.2)
    return [done[i] for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["replicas", "tp"], default="replicas")
    ap.add_argument("--backend", choices=["vllm", "deepspeed"], default="vllm", help="every worker's engine")
    ap.add_argument("--kill", action="store_true", help="SIGKILL one worker at 40 %% of arrivals")
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--short", type=int, default=64)
    ap.add_argument("--long", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--gpu-share", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = run(args)
    print("[3/3] result", flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
