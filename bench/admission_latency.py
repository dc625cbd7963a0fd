"""How long does the API take to refuse a job (429) when the backlog is full or the key is over
its rate, against accepting one (202)? The goal: a refusal decided in under 50 ms.

    python -m bench.admission_latency [--requests 400] [--threads 8]

A real API process and Redis, no worker (admitted jobs stay in the backlog): first a key limited
to 1 submission per second is refused by the rate limiter (429, timed), then the backlog is
filled through the API (202s, timed), then every further submission is refused for the full
backlog (429, timed). Each phase runs from one client and then from `--threads` client processes at once;
p50 / p99 / max per phase, and the refusal ÷ acceptance ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import redis

from api.auth import KeyLimits, Scope, create_key
from bench.harness import auth, service_env, start_api, stop
from localmoe.redis_server import RedisServer
from moe_build.checkpoint import build_checkpoint

BODY = {"prompt": "def fibonacci(n):\n    ", "max_tokens": 16}


def timed(http: httpx.Client, n: int, expect: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.post("/v1/jobs", json=BODY)
        out.append(time.perf_counter() - t0)
        assert r.status_code == expect, (r.status_code, r.text)
    return out


def _client_run(api: str, headers: dict[str, str], n: int, expect: int) -> list[float]:
    with httpx.Client(base_url=api, headers=headers, timeout=30) as http:
        return timed(http, n, expect)


def concurrent(api: str, headers: dict[str, str], n: int, clients: int, expect: int) -> list[float]:
    """`clients` processes at once (threads of one process would measure their own GIL)."""
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        parts = pool.starmap(_client_run, [(api, headers, n // clients, expect)] * clients)
    return [x for part in parts for x in part]


def summary(name: str, xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=100)
    p50, p99, top = q[49] * 1e3, q[98] * 1e3, max(xs) * 1e3
    return f"{name:<34} n={len(xs):<4} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  max {top:6.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    n = args.requests
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-admission-"))
    print(f"[1/4] building the small model in {tmp}", flush=True)
    model = build_checkpoint(tmp / "model", progress=False)
    with RedisServer(tmp / "redis") as server:
        env = service_env(server.url, model, tmp)
        env["LOCALMOE_LIMITS__MAX_QUEUED_JOBS"] = str(2 * n)  # filled by the two accepting phases
        client = redis.Redis.from_url(server.url, decode_responses=True)
        limited = create_key(client, "limited", Scope.USER, KeyLimits(rate_per_s=1.0, burst=1)).secret
        print("[2/4] starting the API (no worker: admitted jobs stay queued)", flush=True)
        proc, api = start_api(env, ready=False)
        try:
            with httpx.Client(base_url=api, headers=auth(env), timeout=30) as http:
                timed(http, 20, 202)  # warm-up: connections, tokenizer, scripts
                client.hset("localmoe:queued:count", "*", 0)  # the warm-up's jobs do not count
                print("[3/4] a key over its rate (1 per second)", flush=True)
                bearer = {"Authorization": f"Bearer {limited}"}
                with httpx.Client(base_url=api, headers=bearer, timeout=30) as h:
                    timed(h, 1, 202)
                    rate_limited = timed(h, n, 429)
                print(f"[4/4] {n} accepted, then {n} refused, one client then {args.threads}", flush=True)
                many = f"{args.threads} clients"
                rows = {
                    "accepted (202), 1 client": timed(http, n - 20, 202),
                    f"accepted (202), {many}": concurrent(api, auth(env), 20 + n, args.threads, 202),
                }
                while http.post("/v1/jobs", json=BODY).status_code == 202:  # top the backlog up
                    pass
                rows["backlog full (429), 1 client"] = timed(http, n, 429)
                rows[f"backlog full (429), {many}"] = concurrent(api, auth(env), n, args.threads, 429)
                rows["rate limited (429), 1 client"] = rate_limited
        finally:
            stop([proc])
            client.close()
    for name, xs in rows.items():
        print(summary(name, xs))
    accept = statistics.median(rows["accepted (202), 1 client"])
    refuse = statistics.median(rows["backlog full (429), 1 client"])
    print(f"refusal / acceptance (p50, 1 client): {refuse / accept:.2f}")


if __name__ == "__main__":
    main()
