"""The API's view of Redis: job records, cancels, event streams and the worker registry."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from api.stream_hub import StreamHub, retrying
from scheduler import keys, record
from scheduler.jobs import Job, JobStatus, job_from_hash
from scheduler.record import CancelOutcome
from scheduler.registry import WorkerInfo, decode_workers
from scheduler.stream import DoneEvent, Fence, StreamEvent

QUIET_S = 15.0  # a stream this long without an entry: check that its job still exists


class JobStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int, hub: StreamHub | None = None) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.hub = hub or StreamHub(client)  # every stream this process follows, read at once
        self._cancel = client.register_script(record.CANCEL)

    async def get(self, job_id: str) -> Job | None:
        fields = cast(dict[str, str], await self.client.hgetall(keys.job(job_id)))
        return job_from_hash(fields) if fields else None

    async def prompt_logprobs(self, job_id: str) -> list[Any] | None:
        """The job's scored prompt (Job.prompt_logprobs): written before its first token entry, so
        there for a reader that has seen one; None if it has not been scored."""
        value = await self.client.hget(keys.job(job_id), "prompt_logprobs")
        return cast(list[Any], orjson.loads(value)) if value else None

    async def cancel(self, job_id: str) -> CancelOutcome:
        return await record.cancel(self._cancel, job_id, self.ttl_s)

    async def page(
        self, owner: str | None, status: JobStatus | None, limit: int, before: float | None
    ) -> tuple[list[Job], float | None]:
        """Jobs newest first: the owner's (None: everyone's), with `status` if given, queued
        before `before` (a cursor: the previous page's last queued_at). → (jobs, next cursor)."""
        listing = keys.owner_jobs(owner) if owner else keys.ALL_JOBS
        last = before  # the score of the last entry read: the next read starts below it
        floor = time.time() - self.ttl_s
        found: list[Job] = []
        scanned = 0
        while len(found) < limit and scanned < 2_000:  # a status filter reads at most this many
            upper = "+inf" if last is None else f"({last!r}"
            chunk = cast(
                list[tuple[str, float]],
                await self.client.zrevrangebyscore(
                    listing, upper, floor, start=0, num=max(limit, 50), withscores=True
                ),
            )
            if not chunk:
                return found, None
            pipe = self.client.pipeline(transaction=False)
            for job_id, _ in chunk:
                pipe.hgetall(keys.job(job_id))
            for (job_id, score), fields in zip(chunk, await pipe.execute(), strict=True):
                scanned += 1
                last = score
                if not fields:  # expired: its listing entry goes too
                    await self.client.zrem(listing, job_id)
                    continue
                job = job_from_hash(fields)
                if status is None or job.status is status:
                    found.append(job)
                    if len(found) == limit:
                        return found, score
        return found, last

    async def events(self, job_id: str, after: str = "0-0") -> AsyncIterator[tuple[str, StreamEvent]]:
        """Every event a client sees after `after` (a stream id), live, until the done event."""
        async for batch in self.event_batches(job_id, after):
            for item in batch:
                yield item

    async def event_batches(
        self, job_id: str, after: str = "0-0"
    ) -> AsyncIterator[list[tuple[str, StreamEvent]]]:
        """The events of `events`, a batch per read of the job's stream: one token per engine step
        while this reader keeps up, several when it fell behind (a relay writes every batch it
        gets in one send: behind, it catches up in fewer, larger writes; no event is merged into
        another). An empty batch after QUIET_S seconds without an event (a keep-alive's cue).
        A Redis restart only pauses it: it reconnects and goes on from the last entry it read."""
        fence = Fence()
        stream = keys.events(job_id)
        if after != "0-0":  # resuming: learn the attempts fenced off before that point
            for _, fields in await retrying(lambda: self.client.xrange(stream, "-", after)):
                fence.visible(fields)
        async with contextlib.aclosing(self.hub.follow(stream, after, QUIET_S)) as batches:
            async for batch in batches:
                if not batch:  # quiet: make sure the job still exists, then keep waiting
                    if not await retrying(lambda: self.client.exists(keys.job(job_id))):
                        return
                    yield []
                    continue
                out: list[tuple[str, StreamEvent]] = []
                for entry_id, fields in batch:
                    event = fence.visible(fields)
                    if event is None:
                        continue
                    out.append((entry_id, event))
                    if isinstance(event, DoneEvent):
                        yield out
                        return
                if out:
                    yield out

    async def workers(self, fresh_only: bool = True) -> list[WorkerInfo]:
        names = cast(list[str], await self.client.zrange(keys.WORKERS, 0, -1))
        if not names:
            return []
        raw = await self.client.mget([keys.worker(n) for n in names])
        return decode_workers(raw, time.time(), fresh_only)
