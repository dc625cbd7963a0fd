"""What Redis spends per streamed token, by command, through the whole service.

Redis is one thread that every stage shares (the queue, the claims, the relay's writes, the API's
stream reads); each µs it spends per token is a µs of delay for every round trip behind it. This
starts Redis, a worker (the small model, torch engine) and an API process, streams `--requests`
completions of `--tokens` tokens each through `POST /v1/completions` (`stream: true`, all open at
once), and reads Redis's own accounting (`INFO commandstats`, reset before the streams start):
µs of Redis time per token, per command. Commands a script runs are counted under the script
(EVALSHA) and again under their own name.

    python -m bench.redis_cost [--requests 64] [--tokens 64] [--api-processes 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.harness import auth, service_env, start_api, start_worker, stop, wait_workers_ready
from localmoe.redis_server import RedisServer
from moe_build.checkpoint import build_checkpoint


def stream(api: str, headers: dict[str, str], prompt: str, tokens: int, events: list[int]) -> None:
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{api}/v1/completions", headers=headers, json=body, timeout=600) as r:
        r.raise_for_status()
        events.append(sum(1 for line in r.iter_lines() if line.startswith("data: {")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--api-processes", type=int, default=1)
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-redis-cost-"))
    print(f"[1/3] building the small model in {tmp / 'model'}", flush=True)
    model = build_checkpoint(tmp / "model", progress=False)
    with RedisServer(tmp / "redis") as server:
        env = service_env(
            server.url,
            model,
            tmp,
            LOCALMOE_ENGINE__MAX_BATCH_SIZE=str(max(args.requests, 1)),
            LOCALMOE_API_PROCESSES=str(args.api_processes),
        )
        client = redis.Redis.from_url(server.url, decode_responses=True)
        print("[2/3] starting a worker and the API", flush=True)
        worker = start_worker("redis-cost", env, quiet=True)
        procs = [worker]
        try:
            wait_workers_ready(client, ["redis-cost"])
            api_proc, api = start_api(env)
            procs.append(api_proc)
            print(f"[3/3] {args.requests} streams × {args.tokens} tokens", flush=True)
            client.config_resetstat()
            events: list[int] = []
            threads = [
                threading.Thread(target=stream, args=(api, auth(env), f"def f{i}(x):\n", args.tokens, events))
                for i in range(args.requests)
            ]
            started = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.time() - started
            stats = client.info("commandstats")
        finally:
            stop(procs)
            client.close()
    tokens = args.requests * args.tokens
    by_command = {
        name.removeprefix("cmdstat_"): {
            "calls": s["calls"],
            "us_per_call": s["usec_per_call"],
            "us_per_token": s["usec"] / tokens,
        }
        for name, s in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])
    }
    total = sum(v["us_per_token"] for v in by_command.values())
    print(f"{tokens} tokens in {seconds:.1f} s ({len(events)} streams, {sum(events)} chunks)")
    print(f"Redis: {total:.1f} µs per token over every command (scripts' own commands counted twice)")
    for name, v in list(by_command.items())[:10]:
        calls, per_call, per_token = v["calls"], v["us_per_call"], v["us_per_token"]
        print(f"  {name:18s} {calls:7d} calls  {per_call:8.1f} µs/call  {per_token:6.2f} µs/token")
    if args.out:
        result = {"args": vars(args), "tokens": tokens, "seconds": seconds, "chunks": sum(events)}
        Path(args.out).write_text(json.dumps({**result, "by_command": by_command}, indent=1))


if __name__ == "__main__":
    main()
