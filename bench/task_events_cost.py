"""What Flower's task events cost the relay: its writes with and without them, alternating.

The relay's own work for a batch of jobs, on a real Redis (a subscriber reads every event message,
as Flower does): `jobs` jobs claimed (track), then `tokens` steps of one token each for all of
them, the last one ending them, each step one relay write (RELAY). With task events on, the claims'
events ride on the first write and each terminal event on the last (scheduler/task_events.py).
Reports, per mode, the median time of the whole batch (this process's Python side plus Redis's
script time, both on this box); the median difference within a rep (on and off back to back, each
first in turn), per batch and per job; and the ratio of the fastest batches (the least disturbed
on a shared box).

    python -m bench.task_events_cost [--jobs 64] [--tokens 64] [--reps 20] [--no-reader]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from host.settings import FlowerSettings
from localmoe.redis_server import RedisServer
from moe_core.engine import Delta, FinishReason
from scheduler import keys, task_events
from scheduler.jobs import Job, JobSpec, JobStatus, job_to_hash
from workers.relay import Held, Relay


def batch(client: redis.Redis, relay: Relay, jobs: int, tokens: int) -> float:
    """Seconds for one batch: claims, then `tokens` writes of one step each."""
    held = []
    pipe = client.pipeline(transaction=False)
    for i in range(jobs):
        spec = JobSpec(prompt=f"def f{i}(x):\n    return x", max_tokens=tokens)
        job = Job(spec=spec, status=JobStatus.RUNNING)
        job.worker, job.attempt = "bench", 1
        pipe.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
        pipe.hset(keys.running("bench"), job.id, "inc 1")
        held.append(Held(job, 1))
    pipe.execute()
    started = time.perf_counter()
    for h in held:
        relay.track(h)
    for step in range(tokens):
        last = FinishReason.LENGTH if step == tokens - 1 else None
        relay._write_with_retry([[Delta(h.job.id, " x", [7], 9, step + 1, last) for h in held]])
    elapsed = time.perf_counter() - started
    client.flushdb()
    return elapsed


def subscribe(url: str, received: Any) -> None:
    """In a process of its own, as Flower: every event message is delivered and read."""
    pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("/*.celeryev/*")
    for _ in pubsub.listen():
        with received.get_lock():
            received.value += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-reader", action="store_true", help="no subscriber: Redis publishes to nobody")
    args = ap.parse_args()
    with RedisServer(Path(tempfile.mkdtemp(prefix="localmoe-bench-")) / "redis") as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        ctx = mp.get_context("spawn")
        received = ctx.Value("i", 0)
        reader = ctx.Process(target=subscribe, args=(server.url, received), daemon=True)
        if not args.no_reader:
            reader.start()
            while not client.execute_command("PUBSUB", "NUMPAT"):  # subscribed before the first batch
                time.sleep(0.05)
        relays = {
            on: Relay(client, 600, node=task_events.node_name("bench"), flower=FlowerSettings(task_events=on))
            for on in (False, True)
        }
        times: dict[bool, list[float]] = {False: [], True: []}
        batch(client, relays[True], args.jobs, args.tokens)  # warm-up (scripts loaded, caches)
        for rep in range(args.reps):
            for events in (False, True) if rep % 2 else (True, False):
                times[events].append(batch(client, relays[events], args.jobs, args.tokens))
        seen, deadline = -1, time.monotonic() + 2
        while reader.is_alive() and received.value != seen and time.monotonic() < deadline:
            seen = received.value  # the reader is a process of its own: let it read the last events
            time.sleep(0.1)
        if reader.is_alive():
            reader.terminate()
        off, on = statistics.median(times[False]), statistics.median(times[True])
        paired = statistics.median(b - a for a, b in zip(times[False], times[True], strict=True))
        writes = args.tokens
        print(
            f"{args.reps} reps of {args.jobs} jobs × {args.tokens} writes; "
            f"event messages read: {received.value}\n"
            f"  events off: {off * 1000:7.2f} ms per batch ({off / writes * 1000:.3f} ms per write)\n"
            f"  events on:  {on * 1000:7.2f} ms per batch ({on / writes * 1000:.3f} ms per write)\n"
            f"  on ÷ off {on / off:.4f}; within a rep (median of on - off): {paired * 1000:+.2f} ms per "
            f"batch, {paired / args.jobs * 1e6:+.1f} µs per job; fastest batches: on ÷ off "
            f"{min(times[True]) / min(times[False]):.4f}"
        )


if __name__ == "__main__":
    main()
