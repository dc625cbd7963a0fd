"""One API process under many concurrent streaming clients (RELIABILITY.md, "Load: 1,000
streaming clients").

    python -m bench.stream_load [--clients 1000] [--ws-share 0.5] [--jobs N] [--tokens 32]
                                [--baseline 10] [--batch 128]

Starts its own Redis and ONE API process, then runs two phases in the same run: a baseline
(--baseline clients, one job each) and the load (--clients clients following --jobs jobs; by
default one job per client). Each phase:

1. submits its jobs through the API while no worker runs (they wait in the shared queue);
2. opens every client at once — SSE (a bare asyncio HTTP/1.1 client) or websocket
   (`websockets`, key in the `bearer.<key>` subprotocol), --ws-share of them websockets — and
   waits until each has its 200 / accepted handshake, so that every token it receives is live;
3. starts one CPU worker on the small model; it drains the queue, the clients receive;
4. stops the worker and checks every client against its job: handshake 200, no dropped
   connection, entry ids strictly increasing (no duplicate), one `done` last with status
   succeeded, the text equal to the job's output (GET /v1/jobs/{id}).

Relay latency: client receive time − the entry's write time, which is the millisecond in its
Redis stream id (Redis and this process read the same clock; the id's millisecond is floored,
so a latency reads up to 1 ms high). The API process's RSS and CPU are sampled every 0.2 s
(psutil), with Redis' `connected_clients`; the client's own event-loop lag is sampled too, since
it is part of every latency measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis
import websockets
from websockets.asyncio.client import connect as ws_connect

from bench.harness import Proc, auth, service_env, start_api, start_worker, stop
from localmoe.redis_server import RedisServer
from moe_build.checkpoint import build_checkpoint

HEADS = ["def parse(line):\n", "The queue holds", "class Cache:\n", "A router picks", "for x in items:\n"]


@dataclass
class Client:
    """What one streaming client saw. error: None, or why it failed."""

    kind: str  # "sse" or "ws"
    job: str
    connect_s: float | None = None
    ids: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    done: dict[str, object] | None = None
    error: str | None = None

    def receive(self, entry_id: str, kind: str, data: dict[str, object]) -> None:
        now_ms = time.time() * 1000
        if self.done is not None:
            self.error = self.error or "event after done"
        if self.ids and _id_key(entry_id) <= _id_key(self.ids[-1]):
            self.error = self.error or f"entry {entry_id} not after {self.ids[-1]} (duplicate or reordered)"
        self.ids.append(entry_id)
        self.latency_ms.append(now_ms - int(entry_id.split("-")[0]))
        if kind == "token":
            self.text.append(str(data["text"]))
        elif kind == "done":
            self.done = data
        else:
            self.error = self.error or f"unknown event {kind!r}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


class Gate:
    """Counts clients whose handshake finished (either way); `all_in` is set when every one has."""

    def __init__(self, n: int) -> None:
        self.n, self.count = n, 0
        self.all_in = asyncio.Event()

    def arrive(self) -> None:
        self.count += 1
        if self.count >= self.n:
            self.all_in.set()


async def follow_sse(api: str, key: str, c: Client, gate: Gate) -> None:
    """GET .../events over a bare asyncio socket: httpx (h11 under httpx's stream) cost this
    2-core box enough client CPU per event to make the clients' own lag dominate the latencies."""
    host, _, port = api.removeprefix("http://").partition(":")
    t0 = time.perf_counter()
    arrived = False
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        writer.write(
            f"GET /v1/jobs/{c.job}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        c.connect_s = time.perf_counter() - t0
        gate.arrive()
        arrived = True
        if not head.startswith("http/1.1 200"):
            c.error = f"HTTP {head[9:12]}"
            return
        if "transfer-encoding: chunked" not in head:
            c.error = "not a chunked stream"
            return
        buffer = b""
        while size := int((await reader.readline()).split(b";")[0], 16):  # 0: the last chunk
            buffer += (await reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for raw in events:
                fields = {}
                for line in raw.decode().split("\n"):
                    if line and not line.startswith(":"):  # ":" starts a keep-alive comment
                        name, _, value = line.partition(":")
                        fields[name] = value[1:] if value.startswith(" ") else value
                if fields:
                    c.receive(fields["id"], fields["event"], json.loads(fields["data"]))
        if c.done is None:
            c.error = c.error or "stream ended without done"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, KeyError, ValueError) as e:
        c.error = c.error or f"{type(e).__name__}: {e}"
    finally:
        if not arrived:
            gate.arrive()
        if writer is not None:
            writer.close()


async def follow_ws(base_ws: str, key: str, c: Client, gate: Gate) -> None:
    t0 = time.perf_counter()
    arrived = False
    try:
        async with ws_connect(
            f"{base_ws}/v1/jobs/{c.job}/stream",
            subprotocols=[websockets.Subprotocol("localmoe"), websockets.Subprotocol(f"bearer.{key}")],
            open_timeout=120,
            proxy=None,
        ) as ws:
            c.connect_s = time.perf_counter() - t0
            gate.arrive()
            arrived = True
            async for message in ws:
                data = json.loads(message)
                c.receive(str(data.pop("id")), str(data.pop("type")), data)
            if ws.close_code != 1000:
                c.error = c.error or f"closed {ws.close_code} {ws.close_reason}"
        if c.done is None:
            c.error = c.error or "closed without done"
    except (OSError, websockets.WebSocketException, TimeoutError, KeyError, ValueError) as e:
        c.error = c.error or f"{type(e).__name__}: {e}"
    finally:
        if not arrived:
            gate.arrive()


class Sampler(threading.Thread):
    """The API process's RSS, CPU time and open files, and Redis' connected clients, every 0.2 s."""

    def __init__(self, pid: int, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.proc, self.client = psutil.Process(pid), client
        self.rss: list[int] = []
        self.fds: list[int] = []
        self.redis_clients: list[int] = []
        self.cpu: list[tuple[float, float]] = []  # (wall clock, API CPU seconds)
        self.box: list[float] = []  # the whole machine's CPU busy %, both cores
        self.waits: list[tuple[float, float]] = []  # (wall clock, API seconds runnable but not running)
        self.halt = threading.Event()

    def cpu_s(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def run_queue_s(self) -> float:
        """Seconds the API's threads have waited for a CPU (/proc/<pid>/task/*/schedstat, field 2)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError):
                continue
        return total / 1e9

    def run(self) -> None:
        while not self.halt.wait(0.2):
            self.rss.append(self.proc.memory_info().rss)
            self.cpu.append((time.time(), self.cpu_s()))
            self.box.append(psutil.cpu_percent())
            self.waits.append((time.time(), self.run_queue_s()))
            self.fds.append(self.proc.num_fds())
            self.redis_clients.append(int(self.client.info("clients")["connected_clients"]))


async def loop_lag(lags: list[float], halt: asyncio.Event) -> None:
    """How late a 50 ms sleep wakes up in the clients' event loop (ms)."""
    while not halt.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.05)
        lags.append((time.perf_counter() - t0 - 0.05) * 1000)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


@dataclass
class Result:
    clients: int
    jobs: int
    errors: Counter[str]
    events: int
    latency_ms: list[float]
    connect_s: list[float]
    lag_ms: list[float]
    rss_before: int
    rss_peak: int
    rss_after: int
    cpu_s: float
    client_cpu_s: float
    box_busy: float  # the machine's mean CPU busy % while streaming
    api_wait_s: float  # the API's time runnable but waiting for a CPU
    stream_s: float
    fds_peak: int
    redis_clients_peak: int


async def submit(http: httpx.AsyncClient, n: int, tokens: int) -> list[str]:
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        body = {"prompt": f"{HEADS[i % len(HEADS)]}# {i}\n", "max_tokens": tokens, "ignore_eos": True}
        async with sem:
            r = await http.post("/v1/jobs", json=body)
        r.raise_for_status()
        return str(r.json()["id"])

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def phase(
    api: str,
    env: dict[str, str],
    api_pid: int,
    client: redis.Redis,
    args: argparse.Namespace,
    n: int,
    jobs: int,
) -> Result:
    key = env["LOCALMOE_API_KEY"]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=api, headers=auth(env), limits=limits, timeout=timeout) as http:
        ids = await submit(http, jobs, args.tokens)
        kinds = ["ws"] * round(n * args.ws_share) + ["sse"] * (n - round(n * args.ws_share))
        random.Random(n).shuffle(kinds)
        clients = [Client(kind, ids[i % jobs]) for i, kind in enumerate(kinds)]
        sampler = Sampler(api_pid, client)
        rss_before = sampler.proc.memory_info().rss
        gate, halt, lags = Gate(n), asyncio.Event(), list[float]()
        lag_task = asyncio.create_task(loop_lag(lags, halt))
        base_ws = api.replace("http://", "ws://")
        t_open = time.perf_counter()
        sampler.start()
        tasks = [
            asyncio.create_task(
                follow_sse(api, key, c, gate) if c.kind == "sse" else follow_ws(base_ws, key, c, gate)
            )
            for c in clients
        ]
        await gate.all_in.wait()
        print(
            f"    {n} clients connected in {time.perf_counter() - t_open:.1f} s; starting the worker",
            flush=True,
        )
        me = psutil.Process()
        cpu0, mine0, t0 = sampler.cpu_s(), sum(me.cpu_times()[:2]), time.perf_counter()
        worker = start_worker("load", env, quiet=True)
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
        except TimeoutError:
            print(f"    gave up after {args.timeout} s", flush=True)
        stream_s, cpu = time.perf_counter() - t0, sampler.cpu_s() - cpu0
        client_cpu = sum(me.cpu_times()[:2]) - mine0
        halt.set()
        await lag_task
        stop([worker])
        sampler.halt.set()
        sampler.join()
        await asyncio.sleep(1.0)  # closed connections' buffers go back
        rss_after = sampler.proc.memory_info().rss
        outputs = await final_outputs(http, ids)
    if args.timeline:
        timeline(clients, sampler.cpu, sampler.waits)
    errors: Counter[str] = Counter()
    for c in clients:
        if c.error is None and c.done is not None:
            if c.done.get("status") != "succeeded":
                c.error = f"job {c.done.get('status')}"
            elif "".join(c.text) != outputs[c.job]:
                c.error = "text differs from the job's output"
        if c.error is not None:
            errors[f"{c.kind}: {c.error[:120]}"] += 1
        elif c.done is None:
            errors[f"{c.kind}: unfinished"] += 1
    return Result(
        clients=n,
        jobs=jobs,
        errors=errors,
        events=sum(len(c.ids) for c in clients),
        latency_ms=[x for c in clients for x in c.latency_ms],
        connect_s=[c.connect_s for c in clients if c.connect_s is not None],
        lag_ms=lags,
        rss_before=rss_before,
        rss_peak=max(sampler.rss, default=rss_before),
        rss_after=rss_after,
        cpu_s=cpu,
        client_cpu_s=client_cpu,
        stream_s=stream_s,
        fds_peak=max(sampler.fds, default=0),
        redis_clients_peak=max(sampler.redis_clients, default=0),
        box_busy=statistics.fmean(sampler.box) if sampler.box else float("nan"),
        api_wait_s=sampler.waits[-1][1] - sampler.waits[0][1] if sampler.waits else 0.0,
    )


async def final_outputs(http: httpx.AsyncClient, ids: list[str]) -> dict[str, str]:
    sem = asyncio.Semaphore(32)

    async def one(job_id: str) -> tuple[str, str]:
        async with sem:
            r = await http.get(f"/v1/jobs/{job_id}")
        return job_id, str(r.json().get("output")) if r.status_code == 200 else f"<HTTP {r.status_code}>"

    return dict(await asyncio.gather(*(one(i) for i in ids)))


def timeline(clients: list[Client], cpu: list[tuple[float, float]], waits: list[tuple[float, float]]) -> None:
    """Per second of streaming (by entry write time): events, relay latency p50/p99, API CPU."""
    by_s: dict[int, list[float]] = {}
    for c in clients:
        for entry_id, lat in zip(c.ids, c.latency_ms, strict=True):
            by_s.setdefault(int(entry_id.split("-")[0]) // 1000, []).append(lat)
    for sec in sorted(by_s):
        inside = [(t, u) for t, u in cpu if sec <= t < sec + 1]
        (t0, u0), (t1, u1) = (inside[0], inside[-1]) if inside else ((0.0, 0.0), (0.0, 0.0))
        busy = f"{100 * (u1 - u0) / (t1 - t0):.0f} %" if t1 > t0 else "?"
        queued = [w for t, w in waits if sec <= t < sec + 1]
        wait = f"{100 * (queued[-1] - queued[0]) / (t1 - t0):.0f} %" if t1 > t0 and queued else "?"
        latencies = by_s[sec]
        print(
            f"      s{sec - min(by_s):3d}: {len(latencies):5d} events  p50 {pct(latencies, 50):7.1f} ms  "
            f"p99 {pct(latencies, 99):7.1f} ms  API CPU {busy}, waiting for a CPU {wait}",
            flush=True,
        )


def report(r: Result) -> None:
    mib = 1 << 20
    print(
        f"  {r.clients} clients / {r.jobs} jobs: errors {sum(r.errors.values())}, events {r.events}\n"
        f"    relay latency p50 {pct(r.latency_ms, 50):.1f} ms  p99 {pct(r.latency_ms, 99):.1f} ms  "
        f"max {max(r.latency_ms, default=float('nan')):.1f} ms\n"
        f"    connect p50 {pct(r.connect_s, 50) * 1000:.0f} ms  p99 {pct(r.connect_s, 99) * 1000:.0f} ms\n"
        f"    API RSS before {r.rss_before / mib:.0f} MiB  peak {r.rss_peak / mib:.0f} MiB  "
        f"after {r.rss_after / mib:.0f} MiB  ({(r.rss_peak - r.rss_before) / max(r.clients, 1) / 1024:.0f} "
        f"KiB per client)\n"
        f"    API CPU {r.cpu_s:.1f} s over {r.stream_s:.1f} s streaming "
        f"({100 * r.cpu_s / r.stream_s:.0f} % of "
        f"a core), {1e6 * r.cpu_s / max(r.events, 1):.0f} µs per event; open files peak {r.fds_peak}; "
        f"Redis clients peak {r.redis_clients_peak}\n"
        f"    machine CPU busy {r.box_busy:.0f} % (mean, 2 cores); "
        f"the API waited {r.api_wait_s:.1f} s for a CPU\n"
        f"    clients' own CPU {r.client_cpu_s:.1f} s; their loop lag p99 {pct(r.lag_ms, 99):.1f} ms  "
        f"max {max(r.lag_ms, default=0):.1f} ms",
        flush=True,
    )
    for what, count in r.errors.most_common(8):
        print(f"    error ×{count}: {what}", flush=True)


def raise_open_files(need: int) -> None:
    """Clients and the API (which inherits this limit) each hold one socket per stream."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    print(
        f"    open-files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} (needed ~{need})", flush=True
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--ws-share", type=float, default=0.5, help="share of clients on the websocket")
    ap.add_argument("--jobs", type=int, help="jobs the load phase's clients follow (default: one per client)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per job (ignore_eos)")
    ap.add_argument("--baseline", type=int, default=10, help="clients (one job each) of the baseline phase")
    ap.add_argument("--batch", type=int, default=128, help="the worker's engine.max_batch_size")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a phase may stream")
    ap.add_argument("--timeline", action="store_true", help="print latency and API CPU per second")
    args = ap.parse_args()
    raise_open_files(4 * args.clients + 256)
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-load-"))
    print(f"[1/4] building the small model in {tmp}", flush=True)
    model = build_checkpoint(tmp / "model", progress=False)
    with RedisServer(tmp / "redis") as server:
        env = service_env(server.url, model, tmp, LOCALMOE_ENGINE__MAX_BATCH_SIZE=str(args.batch))
        client = redis.Redis.from_url(server.url, decode_responses=True)
        procs: list[Proc] = []
        try:
            print("[2/4] starting the API (workers start per phase, once every client is in)", flush=True)
            api_proc, api = start_api(env, ready=False)
            procs.append(api_proc)
            print(f"    API pid {api_proc.pid} at {api}", flush=True)
            results = []
            for step, (n, jobs) in enumerate([(args.baseline, args.baseline), (args.clients, args.jobs)], 3):
                jobs = jobs or n
                print(f"[{step}/4] {n} clients ({args.ws_share:.0%} websocket) on {jobs} jobs", flush=True)
                results.append(asyncio.run(phase(api, env, api_proc.pid, client, args, n, jobs)))
                report(results[-1])
        finally:
            stop(procs)
            client.close()
    base, load = results
    print(
        f"load ÷ baseline: relay p50 ×{pct(load.latency_ms, 50) / pct(base.latency_ms, 50):.1f}  "
        f"p99 ×{pct(load.latency_ms, 99) / pct(base.latency_ms, 99):.1f}  "
        f"connect p99 ×{pct(load.connect_s, 99) / pct(base.connect_s, 99):.1f}  "
        f"RSS peak ×{load.rss_peak / base.rss_peak:.2f}; errors {sum(load.errors.values())}",
        flush=True,
    )


if __name__ == "__main__":
    main()
