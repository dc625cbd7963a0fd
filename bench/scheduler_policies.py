"""Does routing pay? The same arrivals through three routing policies, on workers of unequal speed.

Two CPU workers serve the small model, one slowed by configuration (LOCALMOE_ENGINE__STEP_DELAY_S:
it sleeps after every engine step). One arrival sequence (seeded Poisson arrivals; short and long
jobs; code and text prompts) is replayed through the API once per policy, with an API process
started per policy (LOCALMOE_SCHEDULER__POLICY):

* shared: every job on the one queue both workers consume (Celery hands a job to whichever
  worker has a free batch slot);
* round_robin: worker queues in turn;
* auto: LocalMoE's scheduler (earliest expected completion from the registry).

Completion time = finished_at − queued_at, as the job's record says. Throughput = completion
tokens ÷ (first queued → last finished). Prints p50 / p95 / max completion, throughput and each
worker's share of the jobs per policy, and the ratios against the shared queue (goal: p95 ≤ 0.70×
with no loss of throughput). Policies run in turn, --rounds times, order rotated each round.

    python -m bench.scheduler_policies [--jobs 160] [--rate 14] [--slow-delay-ms 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from bench.harness import auth, service_env, start_api, start_worker, stop, wait_workers_ready
from localmoe.redis_server import RedisServer
from moe_build.checkpoint import build_checkpoint
from scheduler import keys
from scheduler.jobs import JobStatus, job_from_hash
from scheduler.registry import WorkerInfo

POLICIES = ("shared", "round_robin", "auto")
CODE = ["def parse(line):\n    ", "class Cache:\n    def get(self, key):\n", "for row in rows:\n    if"]
TEXT = ["The meeting notes say that", "Our on-premises cluster runs", "A short history of the river"]


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    prompt: str
    max_tokens: int


def arrivals(n: int, rate: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate` jobs/s; 75 % short (16 tokens), 25 % long (96); half code."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        heads = CODE if rng.random() < 0.5 else TEXT
        out.append(Arrival(t, f"{rng.choice(heads)} # {i}", 96 if rng.random() < 0.25 else 16))
    return out


@dataclass
class Outcome:
    policy: str
    p50: float
    p95: float
    worst: float
    throughput: float
    share: dict[str, int]


def run_policy(
    policy: str, api: str, client: redis.Redis, plan: list[Arrival], headers: dict[str, str]
) -> Outcome:
    ids: list[str | None] = [None] * len(plan)
    http = httpx.Client(base_url=api, timeout=30, headers=headers)
    start = time.perf_counter() + 0.2

    def post(i: int) -> None:
        delay = start + plan[i].at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        body = {"prompt": plan[i].prompt, "max_tokens": plan[i].max_tokens, "ignore_eos": True}
        r = http.post("/v1/jobs", json=body)
        r.raise_for_status()
        ids[i] = r.json()["id"]

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(post, range(len(plan))))
    http.close()
    deadline = time.monotonic() + 600
    while True:
        jobs = [job_from_hash(client.hgetall(keys.job(i))) for i in ids if i]  # type: ignore[arg-type]
        if all(j.status.terminal for j in jobs):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{policy}: jobs did not finish in 600 s")
        time.sleep(0.2)
    assert all(j.status is JobStatus.SUCCEEDED for j in jobs), "a job failed"
    done = [(j.timings.finished_at or 0) - (j.timings.queued_at or 0) for j in jobs]
    first = min(j.timings.queued_at or 0 for j in jobs)
    last = max(j.timings.finished_at or 0 for j in jobs)
    tokens = sum(j.usage.completion_tokens for j in jobs)
    done.sort()
    return Outcome(
        policy,
        statistics.median(done),
        done[int(0.95 * (len(done) - 1))],
        done[-1],
        tokens / (last - first),
        dict(sorted(Counter(j.worker or "?" for j in jobs).items())),
    )


def wait_idle(client: redis.Redis, names: list[str]) -> None:
    while True:
        infos = [WorkerInfo.model_validate_json(client.get(keys.worker(n)) or "{}") for n in names]
        if all(i.ready and i.running == 0 and i.waiting == 0 for i in infos) and not any(
            client.hlen(keys.queued(n)) for n in names
        ):
            return
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=160)
    ap.add_argument("--rate", type=float, default=14.0, help="arrivals per second")
    ap.add_argument("--slow-delay-ms", type=float, default=30.0, help="the slow worker's sleep per step")
    ap.add_argument("--batch", type=int, default=8, help="each worker's batch size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-sched-"))
    print(f"[1/3] building the small model in {tmp}", flush=True)
    model = build_checkpoint(tmp / "model", progress=False)
    plan = arrivals(args.jobs, args.rate, args.seed)
    with RedisServer(tmp / "redis") as server:
        env = service_env(
            server.url,
            model,
            tmp,
            LOCALMOE_ENGINE__MAX_BATCH_SIZE=str(args.batch),
            LOCALMOE_ENGINE__CPU_THREADS="1",
        )
        slow = {**env, "LOCALMOE_ENGINE__STEP_DELAY_S": str(args.slow_delay_ms / 1000)}
        print("[2/3] starting two workers (one slowed) ", flush=True)
        workers = [start_worker("fast", env), start_worker("slow", slow)]
        client = redis.Redis.from_url(server.url, decode_responses=True)
        results: dict[str, list[Outcome]] = {p: [] for p in POLICIES}
        try:
            wait_workers_ready(client, ["fast", "slow"])
            # warm-up through the shared queue: both workers measure their speeds
            proc, api = start_api({**env, "LOCALMOE_SCHEDULER__POLICY": "shared"})
            run_policy("warm-up", api, client, arrivals(32, args.rate, args.seed + 1), auth(env))
            stop([proc])
            for r in range(args.rounds):
                order = POLICIES[r % 3 :] + POLICIES[: r % 3]
                for policy in order:
                    wait_idle(client, ["fast", "slow"])
                    proc, api = start_api({**env, "LOCALMOE_SCHEDULER__POLICY": policy})
                    try:
                        out = run_policy(policy, api, client, plan, auth(env))
                    finally:
                        stop([proc])
                    results[policy].append(out)
                    print(
                        f"[3/3] round {r + 1} {policy:11s} p50 {out.p50:6.2f}s  p95 {out.p95:6.2f}s  "
                        f"max {out.worst:6.2f}s  {out.throughput:7.1f} tok/s  jobs {out.share}",
                        flush=True,
                    )
        finally:
            stop(workers)
            client.close()
    print("\npolicy       p50 s   p95 s   tok/s   (medians over rounds)")
    med = {
        p: (
            statistics.median(o.p50 for o in outs),
            statistics.median(o.p95 for o in outs),
            statistics.median(o.throughput for o in outs),
        )
        for p, outs in results.items()
    }
    for p, (p50, p95, tps) in med.items():
        print(f"{p:11s} {p50:7.2f} {p95:7.2f} {tps:7.1f}")
    for p in ("round_robin", "auto"):
        print(
            f"{p} ÷ shared: p95 {med[p][1] / med['shared'][1]:.2f}× (goal for auto ≤ 0.70), "
            f"throughput {med[p][2] / med['shared'][2]:.2f}×"
        )


if __name__ == "__main__":
    main()
