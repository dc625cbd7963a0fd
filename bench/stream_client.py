"""A streaming HTTP client for benchmarks: request i is sent at start + i × gap and read as it
streams, timed at the client.

One round is spread over the client's processes (request i goes to process i mod procs), each one
asyncio loop with aiohttp, so that the client is not what limits a fast server: one process
parsing 25k events/s would be. Every process is told the same absolute start time.

Ways of reading a job's tokens (`kind`):
  completions  POST /v1/completions, stream: true (OpenAI; vLLM's server and LocalMoE)
  chat         POST /v1/chat/completions, stream: true
  events       POST /v1/jobs, then GET /v1/jobs/{id}/events (LocalMoE's SSE)
  ws           POST /v1/jobs, then the websocket /v1/jobs/{id}/stream (LocalMoE)
  submit       POST /v1/jobs only (intake: the 202's round trip is the whole request)

Per request the client records the send time, the first and last token event, the number of
token events (one per token when nothing merged them) and the completion tokens the server
reported at the end.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

KINDS = ("completions", "chat", "events", "ws", "submit")


@dataclass(frozen=True)
class Target:
    base: str  # http://127.0.0.1:PORT
    key: str | None = None  # bearer token (LocalMoE); None: no Authorization header
    model: str | None = None  # the OpenAI `model` field; None: left out
    pid: int = 0  # the server's top process (its CPU time is read around each round)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


@dataclass
class Record:
    """One request, times in unix seconds (time.time() of the client process)."""

    sent: float
    first: float = 0.0  # the first event carrying text; 0: none came
    last: float = 0.0  # the last event (text or the end)
    events: int = 0  # events that carried text
    tokens: int = 0  # completion tokens the server reported
    error: str = ""
    job_id: str = ""  # LocalMoE's job (every path: the OpenAI answers' Location header names it)

    @property
    def ttft(self) -> float:
        return self.first - self.sent


class Clients:
    """The client's processes, started once and kept warm across rounds (a process spawned per
    round would start late and send its first requests in a burst). `with Clients(n) as c:`."""

    def __init__(self, procs: int) -> None:
        self.procs = max(1, procs)
        self.busy = 0.0  # the last round's busiest client process: its CPU time ÷ the round's time
        ctx = multiprocessing.get_context("spawn")
        self._pool = ctx.Pool(self.procs, initializer=_use_uvloop) if self.procs > 1 else None

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *_: object) -> None:
        if self._pool is not None:
            self._pool.terminate()

    def round(self, target: Target, kind: str, prompts: list[str], tokens: int, gap: float) -> list[Record]:
        """Every prompt once, request i at start + i × gap; → one Record per prompt, in order."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        start = time.time() + 0.3  # every process is up: it only has to receive its share
        jobs = [(target, kind, prompts, tokens, gap, start, k, self.procs) for k in range(self.procs)]
        parts = self._map(_process, jobs)
        self.busy = max(part["busy"] for part in parts)
        out: list[Record | None] = [None] * len(prompts)
        for k, part in enumerate(parts):
            for j, rec in enumerate(part["records"]):
                out[k + j * self.procs] = Record(**rec)
        return [r for r in out if r is not None]

    def closed(self, target: Target, seconds: float, concurrency: int) -> list[Record]:
        """Intake: `concurrency` connections in each process POST /v1/jobs (max_tokens 1) back to
        back for `seconds`; → one Record per request (sent, last = its answer)."""
        jobs = [(target, seconds, concurrency, k) for k in range(self.procs)]
        return [Record(**rec) for part in self._map(_closed_process, jobs) for rec in part]

    def _map(self, fn: Any, jobs: list[tuple[Any, ...]]) -> list[Any]:
        if self._pool is None:
            return [fn(*jobs[0])]
        return self._pool.starmap(fn, jobs)


def _use_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def _process(
    target: Target, kind: str, prompts: list[str], tokens: int, gap: float, start: float, k: int, procs: int
) -> dict[str, Any]:
    """→ {"records": this process's share, "busy": its CPU time ÷ the time from `start` to its
    last event (near 1: the client, not the server, set the pace)}."""
    cpu = time.process_time()
    records = asyncio.run(_client(target, kind, prompts, tokens, gap, start, k, procs))
    cpu = time.process_time() - cpu
    wall = max((r.last for r in records), default=start) - start
    return {"records": [r.__dict__ for r in records], "busy": round(cpu / max(wall, 1e-3), 3)}


async def _client(
    target: Target, kind: str, prompts: list[str], tokens: int, gap: float, start: float, k: int, procs: int
) -> list[Record]:
    import aiohttp

    mine = range(k, len(prompts), procs)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=target.headers) as http:
        tasks = [
            asyncio.ensure_future(_request(http, target, kind, prompts[i], tokens, start + i * gap))
            for i in mine
        ]
        return list(await asyncio.gather(*tasks))


async def _request(http: Any, target: Target, kind: str, prompt: str, tokens: int, at: float) -> Record:
    await asyncio.sleep(max(0.0, at - time.time()))
    rec = Record(sent=time.time())
    try:
        if kind in ("completions", "chat"):
            await _openai(http, target, kind, prompt, tokens, rec)
        else:
            job_id = await _submit(http, target, prompt, tokens, rec)
            if kind == "events":
                await _events(http, target, job_id, rec)
            elif kind == "ws":
                await _websocket(http, target, job_id, rec)
    except Exception as e:  # recorded, not raised: one failed request must not hide the round
        rec.error = f"{type(e).__name__}: {e}"
    return rec


def _token(rec: Record, now: float) -> None:
    if not rec.first:
        rec.first = now
    rec.events += 1
    rec.last = now


async def _openai(http: Any, target: Target, kind: str, prompt: str, tokens: int, rec: Record) -> None:
    body: dict[str, Any] = {
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if target.model:
        body["model"] = target.model
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    async with http.post(target.base + path, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {(await r.text())[:200]}")
        rec.job_id = r.headers.get("Location", "").rpartition("/")[2]  # LocalMoE's; vLLM sends none
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            now = time.time()
            if payload == b"[DONE]":
                rec.last = now
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                rec.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                delta = choice if kind == "completions" else choice.get("delta") or {}
                if delta.get("text" if kind == "completions" else "content"):
                    _token(rec, now)


async def _submit(http: Any, target: Target, prompt: str, tokens: int, rec: Record) -> str:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    async with http.post(target.base + "/v1/jobs", json=body) as r:
        if r.status != 202:
            raise RuntimeError(f"{r.status}: {(await r.text())[:200]}")
        job_id = str((await r.json())["id"])
    rec.last = time.time()  # for `submit`, the whole request
    rec.job_id = job_id
    return job_id


async def _events(http: Any, target: Target, job_id: str, rec: Record) -> None:
    event = ""
    async with http.get(f"{target.base}/v1/jobs/{job_id}/events") as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {(await r.text())[:200]}")
        async for line in r.content:
            if line.startswith(b"event: "):
                event = line[7:].strip().decode()
            elif line.startswith(b"data: "):
                now = time.time()
                data = json.loads(line[6:])
                if event == "token" and data.get("text"):
                    _token(rec, now)
                elif event == "done":
                    rec.tokens, rec.last = data["usage"]["completion_tokens"], now
                    if data.get("status") != "succeeded":
                        rec.error = f"job {data.get('status')}: {data.get('error')}"
                    break


async def _websocket(http: Any, target: Target, job_id: str, rec: Record) -> None:
    url = f"{target.base.replace('http', 'ws', 1)}/v1/jobs/{job_id}/stream"
    protocols = ["localmoe", f"bearer.{target.key}"]
    async with http.ws_connect(url, protocols=protocols) as ws:
        async for msg in ws:
            data = json.loads(msg.data)
            now = time.time()
            if data.get("type") == "token" and data.get("text"):
                _token(rec, now)
            elif data.get("type") == "done":
                rec.tokens, rec.last = data["usage"]["completion_tokens"], now
                if data.get("status") != "succeeded":
                    rec.error = f"job {data.get('status')}: {data.get('error')}"
                break


def _closed_process(target: Target, seconds: float, concurrency: int, k: int) -> list[dict[str, Any]]:
    return [r.__dict__ for r in asyncio.run(_closed(target, seconds, concurrency, k))]


async def _closed(target: Target, seconds: float, concurrency: int, k: int) -> list[Record]:
    import aiohttp

    records: list[Record] = []
    end = time.time() + seconds

    async def loop(http: Any, c: int) -> None:
        i = 0
        while time.time() < end:
            rec = Record(sent=time.time())
            try:
                await _submit(http, target, f"def f_{k}_{c}_{i}(x):\n    return", 1, rec)
            except Exception as e:
                rec.error = f"{type(e).__name__}: {e}"
            records.append(rec)
            i += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=target.headers) as http:
        await asyncio.gather(*(loop(http, c) for c in range(concurrency)))
    return records
