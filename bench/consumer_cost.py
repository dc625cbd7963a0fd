"""What a worker's Celery consumer costs per message, and how long a job waits for its claim.

At a high arrival rate spread over several API processes, each API process mostly sends one job
per message, and the worker's one consumer process pays its per-message costs (the BRPOP, the
task's request and thread, the hand-over to the runtime process, which claims the jobs) once per
job. This sends `--jobs` one-job `run_jobs` messages at `--rate` per second, as the API's
Enqueuer would (the job's record first), to a real worker (`localmoe worker`, the small model,
`max_tokens` 1), and reports the consumer process's CPU time per job (and the runtime process's)
and the delay from send to claim (`timings.started_at`), p50 / p99.

    python -m bench.consumer_cost [--jobs 600] [--rate 300] [--rounds 3] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import redis

from bench.harness import py_spy, service_env, start_worker, stop, wait_workers_ready
from localmoe.redis_server import RedisServer
from moe_build.checkpoint import build_checkpoint
from scheduler import keys, record
from scheduler.jobs import Job, JobSpec
from scheduler.queue import make_celery

TERMINAL = ("succeeded", "failed", "cancelled")


def one_round(
    url: str, client: redis.Redis, consumer: psutil.Process, jobs: int, rate: float
) -> dict[str, float]:
    app = make_celery(url)
    batch = [
        Job(spec=JobSpec(prompt=f"def f{i}(x):\n", max_tokens=1), queue=keys.SHARED_QUEUE)
        for i in range(jobs)
    ]
    record.create(client, batch, ttl_s=3600)  # the record exists before its message, as the API writes it
    cpu0 = sum(consumer.cpu_times()[:2])
    runtime0 = _runtime_cpu(consumer)
    start = time.time()
    sent: list[float] = []
    try:
        with app.producer_or_acquire() as producer:
            for i, job in enumerate(batch):
                time.sleep(max(0.0, start + i / rate - time.time()))
                sent.append(time.time())
                args = [[job.model_dump(mode="json")]]
                app.send_task(
                    keys.RUN_JOBS_TASK, args=args, queue=keys.SHARED_QUEUE, priority=1, producer=producer
                )
    finally:
        app.close()
    deadline = time.time() + 120
    while time.time() < deadline:
        statuses = [json.loads(client.hget(keys.job(j.id), "status") or '""') for j in batch[-8:]]
        if all(s in TERMINAL for s in statuses):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # the last acknowledgements
    cpu = sum(consumer.cpu_times()[:2]) - cpu0
    runtime = _runtime_cpu(consumer) - runtime0
    delays = []
    for job, at in zip(batch, sent, strict=True):
        started = json.loads(client.hget(keys.job(job.id), "timings.started_at") or "null")
        if started:
            delays.append((started - at) * 1000)
    q = statistics.quantiles(delays, n=100, method="inclusive")
    return {
        "cpu_us_per_job": cpu / jobs * 1e6,
        "runtime_cpu_us_per_job": runtime / jobs * 1e6,
        "claim_p50_ms": q[49],
        "claim_p99_ms": q[98],
    }


def _runtime_cpu(consumer: psutil.Process) -> float:
    """CPU seconds of the worker's runtime process so far (it claims the jobs the consumer hands it)."""
    return sum(sum(c.cpu_times()[:2]) for c in consumer.children() if c.name() == "lm-runtime")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--rate", type=float, default=300.0, help="messages per second")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", help="py-spy (GIL-holding samples, raw) the consumer into this file")
    ap.add_argument("--out", help="write the rounds here as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-consumer-"))
    print(f"[1/3] building the small model in {tmp / 'model'}", flush=True)
    model = build_checkpoint(tmp / "model", progress=False)
    with RedisServer(tmp / "redis") as server:
        env = service_env(
            server.url, model, tmp, LOCALMOE_ENGINE__MAX_BATCH_SIZE="256", LOCALMOE_LOG_LEVEL="warning"
        )
        print("[2/3] starting a worker", flush=True)
        worker = start_worker("consumer-cost", env, quiet=True)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        spy = None
        try:
            wait_workers_ready(client, ["consumer-cost"])
            consumer = psutil.Process(worker.pid)
            one_round(server.url, client, consumer, min(args.jobs, 100), args.rate)  # warm-up, untimed
            if args.profile:
                argv = [py_spy(), "record", "-p", str(worker.pid), "-r", "200", "--gil", "-f", "raw"]
                spy = subprocess.Popen(
                    [*argv, "-o", args.profile, "--nonblocking"], stdout=subprocess.DEVNULL
                )
            print(
                f"[3/3] {args.rounds} rounds of {args.jobs} one-job messages at {args.rate:g}/s", flush=True
            )
            rounds = []
            for r in range(args.rounds):
                rounds.append(one_round(server.url, client, consumer, args.jobs, args.rate))
                x = rounds[-1]
                cpu, p50, p99 = x["cpu_us_per_job"], x["claim_p50_ms"], x["claim_p99_ms"]
                print(f"  round {r + 1}: consumer CPU {cpu:6.0f} µs/job (runtime "
                      f"{x['runtime_cpu_us_per_job']:4.0f})  send → claim p50 {p50:6.1f} ms  "
                      f"p99 {p99:6.1f} ms", flush=True)  # fmt: skip
        finally:
            if spy is not None:
                spy.send_signal(2)  # py-spy writes what it sampled
                spy.wait(30)
            stop([worker])
            client.close()
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"median: consumer CPU {median['cpu_us_per_job']:.0f} µs/job (runtime "
          f"{median['runtime_cpu_us_per_job']:.0f}), send → claim p50 "
          f"{median['claim_p50_ms']:.1f} ms, p99 {median['claim_p99_ms']:.1f} ms")  # fmt: skip
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "rounds": rounds, "median": median}, indent=1)
        )


if __name__ == "__main__":
    main()
