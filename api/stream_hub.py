"""One reader per API process for every job stream its clients follow.

Before this, each SSE / websocket / OpenAI stream ran its own `XREAD BLOCK` loop: one Redis round
trip per client per batch of entries and one pooled Redis connection held per open stream (one API
core relayed 3–6k events/s; RELIABILITY.md). The hub runs one `XREAD` over every followed stream
and fans what it returns out to the followers in-process.

Invariants:
* `cursor[stream]` is the last entry id the hub has read of that stream; every follower of it gets
  every entry after its own start, in order, exactly once: entries up to the cursor at the moment it
  joins by its own XRANGE (catch-up), entries after it from the hub (registration happens without
  an await between reading the cursor and joining, so nothing falls between the two).
* A stream nobody follows any more leaves the hub's read at its next round.
* A new stream must be read at once, but the hub's XREAD may be blocked for BLOCK_MS on the others:
  following a new stream adds an entry to this process's own wake stream, which every XREAD also
  reads, so the blocked read returns and the next one includes the newcomer. One wake per read is
  enough (the next read includes every stream followed by then): a burst of new requests costs one
  extra read, not one per request, each over every followed stream.
* A follower that got nothing for `quiet_s` gets an empty batch: one timer for the whole hub
  checks every follower's last delivery (a timer per wait cost a tenth of the API's time under load).
* A follower's queue holds batches (one per XREAD reply); it is bounded by the stream itself (a
  job's stream is at most max_tokens entries long), not by the client's speed.

Redis errors: the reader retries with backoff and resumes from its cursors; followers only see a
quiet period (and JobStore.events then checks that the job still exists, through its own retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis

from scheduler import keys

log = logging.getLogger(__name__)

BLOCK_MS = 5_000  # one XREAD waits at most this long
COUNT = 512  # entries per stream per XREAD
WAKE_TTL_S = 86_400  # the wake stream outlives a crashed process by a day at most

Entry = tuple[str, dict[str, str]]  # (stream entry id, fields)
RESTARTING = (aioredis.ConnectionError, aioredis.TimeoutError, aioredis.BusyLoadingError)


async def retrying(call: Callable[[], Awaitable[Any]]) -> Any:
    """`call` again while Redis is restarting (connection refused or dropped), for up to a minute;
    then the error goes to the caller."""
    delay, waited = 0.1, 0.0
    while True:
        try:
            return await call()
        except RESTARTING:
            if waited > 60:
                raise
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 2.0)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Follower:
    quiet_s: float
    queue: asyncio.Queue[list[Entry]] = field(default_factory=asyncio.Queue)
    fed_at: float = 0.0  # loop time of the last batch put in its queue (or of its joining)


class StreamHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.wake_stream = keys.api_wake(uuid.uuid4().hex[:12])
        self._wake_last = "0-0"
        self._cursor: dict[str, str] = {}  # stream key → last id read by the hub
        self._followers: dict[str, set[_Follower]] = {}
        self._changed = asyncio.Event()  # a first stream to follow, after none
        self._task: asyncio.Task[None] | None = None
        self._quiet: asyncio.TimerHandle | None = None  # the next sweep for quiet followers
        self._woken = False  # a wake was sent since the last XREAD was issued
        self._closed = False
        self.reads = 0  # XREAD calls so far (tests, metrics)
        self.wakes = 0  # wake-stream entries added so far (tests)

    async def follow(self, stream: str, after: str, quiet_s: float) -> AsyncGenerator[list[Entry]]:
        """Batches of `stream`'s entries after `after`, in order, for as long as the caller iterates;
        an empty batch after `quiet_s` seconds without one."""
        follower = _Follower(quiet_s, fed_at=asyncio.get_running_loop().time())
        new = stream not in self._cursor
        start = self._join(stream, follower, after)  # no await before it: see the invariants
        try:
            if new and not self._woken:
                self._woken = True
                await self._wake()
            elif _id(after) < _id(start):  # catch up to where the hub stood when this one joined
                entries = cast(
                    list[Entry], await retrying(lambda: self.client.xrange(stream, f"({after}", start))
                )
                if entries:
                    after = entries[-1][0]
                    yield entries
            while True:
                batch = await follower.queue.get()
                if not batch:  # quiet for quiet_s (see _sweep_quiet)
                    self._ensure_reader()
                    yield []
                    continue
                if _id(batch[0][0]) <= _id(after):  # only a follower that resumed beyond the hub
                    batch = [e for e in batch if _id(e[0]) > _id(after)]
                if batch:
                    after = batch[-1][0]
                    yield batch
        finally:
            self._leave(stream, follower)

    async def close(self) -> None:
        # The flag as well as the cancel: redis-py may turn a cancelled XREAD into a ConnectionError,
        # which the reader takes for an outage and survives.
        self._closed = True
        self._changed.set()
        if self._quiet is not None:
            self._quiet.cancel()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._wake(), 1)  # the blocked XREAD returns; the loop ends
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 2)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
        with contextlib.suppress(Exception):
            await self.client.delete(self.wake_stream)

    # ------------------------------------------------------------------------------ internals

    def _join(self, stream: str, follower: _Follower, after: str) -> str:
        """Register `follower`; returns where the hub's reading of `stream` stands."""
        if stream not in self._cursor:
            self._cursor[stream] = after  # the hub reads from the first follower's start
            self._changed.set()
        self._followers.setdefault(stream, set()).add(follower)
        self._ensure_reader()
        if self._quiet is None:
            self._schedule_sweep(follower.quiet_s)
        return self._cursor[stream]

    def _leave(self, stream: str, follower: _Follower) -> None:
        followers = self._followers.get(stream)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            del self._followers[stream]
            self._cursor.pop(stream, None)

    def _schedule_sweep(self, after_s: float) -> None:
        self._quiet = asyncio.get_running_loop().call_later(after_s, self._sweep_quiet)

    def _sweep_quiet(self) -> None:
        """An empty batch to every follower fed nothing for its quiet_s; again while any follow."""
        self._quiet = None
        if not self._followers or self._closed:
            return
        now = asyncio.get_running_loop().time()
        soonest = min(f.quiet_s for fs in self._followers.values() for f in fs)
        for followers in self._followers.values():
            for f in followers:
                if now - f.fed_at >= f.quiet_s:
                    f.fed_at = now
                    f.queue.put_nowait([])
        self._schedule_sweep(max(0.05, soonest / 4))  # a follower's quiet spell is noticed within 25 %

    def _ensure_reader(self) -> None:
        """Start the reader, or restart one that died (logged): one runs while streams are followed."""
        task = self._task
        if task is not None and not task.done():
            return
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.error("the stream reader failed; restarting it", exc_info=task.exception())
        self._task = asyncio.get_running_loop().create_task(self._read_forever(), name="stream-hub")

    async def _wake(self) -> None:
        self.wakes += 1
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.wake_stream, {"w": "1"}, maxlen=16, approximate=True)
        pipe.expire(self.wake_stream, WAKE_TTL_S)
        await retrying(pipe.execute)

    async def _read_forever(self) -> None:
        delay = 0.1
        while not self._closed:
            if not self._cursor:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams = {self.wake_stream: self._wake_last, **self._cursor}
            self._woken = False  # this read includes every stream followed so far
            try:
                reply = cast(
                    list[tuple[str, list[Entry]]],
                    await self.client.xread(streams, count=COUNT, block=BLOCK_MS),  # type: ignore[arg-type]
                )
            except RESTARTING:
                if delay == 0.1:
                    # Redis went away (a restart): every idle pooled connection is dead too. Close
                    # them now, so the requests that follow connect afresh instead of failing on one.
                    with contextlib.suppress(Exception):
                        await self.client.connection_pool.disconnect(inuse_connections=False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            self.reads += 1
            for stream, entries in reply or []:
                if stream == self.wake_stream:
                    self._wake_last = entries[-1][0]
                    continue
                if self._cursor.get(stream) != streams[stream]:
                    # Nobody follows it any more, or it was left and followed again from another
                    # point while this read was out: that reply starts at the old point (a gap for
                    # the new follower); the next read starts at the new one.
                    continue
                self._cursor[stream] = entries[-1][0]
                now = asyncio.get_running_loop().time()
                for follower in self._followers.get(stream, ()):
                    follower.fed_at = now
                    follower.queue.put_nowait(entries)
