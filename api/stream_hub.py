"""One reader per API process for every job stream its clients follow: it reads the feed.

Every write to a job's events stream is also listed in the feed (keys.FEED, scheduler/stream.py
FEED_LUA): one feed entry per script that wrote, a relay batch being one entry for all its jobs'
tokens. The hub runs one `XREAD` of the feed and fans out, in-process, what concerns the streams
this process's clients follow. Before the feed it ran one XREAD over every followed stream: one
entry per stream per engine step, which cost Redis 13–15 µs per entry read on the 2-core box
(`bench/redis_cost.py`), most of Redis's time per streamed token, and cost this process the
parsing of a nested reply per stream.

Invariants:
* Every follower gets every entry of its stream after its own start, in order, exactly once:
  it joins while the reader holds a feed position (no await between the two), then reads what its
  stream already holds by XRANGE (catch-up); entries written after that XRANGE are in feed entries
  after the position it joined at. It drops what it already passed (entry ids only grow).
* `cursor` is the last feed entry read; each feed entry names its predecessor (`p`). One that
  names another is behind a gap (the feed was trimmed past this reader, or Redis lost it in a
  restart): every follower then catches up from its stream by XRANGE again.
* The reader runs while anyone follows; a new follower after none fixes the position first.
* A follower that got nothing for `quiet_s` gets an empty batch: one timer for the whole hub
  checks every follower's last delivery (a timer per wait cost a tenth of the API's time under load).
* A follower's queue holds batches (one per XREAD reply); it is bounded by the stream itself (a
  job's stream is at most max_tokens entries long), not by the client's speed.

Redis errors: the reader retries with backoff and resumes from its cursor (a gap resyncs);
followers only see a quiet period (and JobStore.events then checks that the job still exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from scheduler import keys

log = logging.getLogger(__name__)

BLOCK_MS = 5_000  # one XREAD waits at most this long
COUNT = 256  # feed entries per XREAD (a relay batch each)

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
    queue: asyncio.Queue[list[Entry] | None] = field(default_factory=asyncio.Queue)  # None: resync
    fed_at: float = 0.0  # loop time of the last batch put in its queue (or of its joining)


class StreamHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._cursor: str | None = None  # the last feed entry read; None while the reader is stopped
        self._starting = asyncio.Lock()
        self._followers: dict[str, set[_Follower]] = {}  # stream key → its followers here
        self._changed = asyncio.Event()  # the reader has a position to read from again
        self._task: asyncio.Task[None] | None = None
        self._quiet: asyncio.TimerHandle | None = None  # the next sweep for quiet followers
        self._closed = False
        self.reads = 0  # XREAD calls that returned entries (tests, metrics)
        self.resyncs = 0  # gaps in the feed seen (tests)

    async def follow(self, stream: str, after: str, quiet_s: float) -> AsyncGenerator[list[Entry]]:
        """Batches of `stream`'s entries after `after`, in order, for as long as the caller iterates;
        an empty batch after `quiet_s` seconds without one."""
        await self._position()
        follower = _Follower(quiet_s, fed_at=asyncio.get_running_loop().time())
        self._join(stream, follower)  # no await since the position was fixed: see the invariants
        try:
            catch_up = True  # first, what the stream holds already
            while True:
                if catch_up:
                    read = functools.partial(self.client.xrange, stream, f"({after}")
                    batch = cast(list[Entry], await retrying(read))
                    catch_up = False
                else:
                    got = await follower.queue.get()
                    if got is None:  # the feed had a gap: catch up from the stream again
                        catch_up = True
                        continue
                    if not got:  # quiet for quiet_s (see _sweep_quiet)
                        self._ensure_reader()
                        yield []
                        continue
                    batch = got
                if batch and _id(batch[0][0]) <= _id(after):  # passed some of it already
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
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)

    # ------------------------------------------------------------------------------ internals

    async def _position(self) -> None:
        """Make sure the reader holds a feed position (the feed's newest entry, when it starts)."""
        if self._cursor is not None:
            return
        async with self._starting:
            if self._cursor is None:
                last = await retrying(lambda: self.client.get(keys.FEED_LAST))
                self._cursor = cast(str | None, last) or "0-0"
                self._changed.set()

    def _join(self, stream: str, follower: _Follower) -> None:
        self._followers.setdefault(stream, set()).add(follower)
        self._ensure_reader()
        if self._quiet is None:
            self._schedule_sweep(follower.quiet_s)

    def _leave(self, stream: str, follower: _Follower) -> None:
        followers = self._followers.get(stream)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            del self._followers[stream]

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

    async def _read_forever(self) -> None:
        delay = 0.1
        while not self._closed:
            if self._cursor is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            cursor = self._cursor
            try:
                reply = cast(
                    list[tuple[str, list[Entry]]],
                    await self.client.xread({keys.FEED: cursor}, count=COUNT, block=BLOCK_MS),
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
            if reply:
                self.reads += 1
                self._deliver(cursor, reply[0][1])
            if not self._followers:
                self._cursor = None  # nobody follows: the next follower starts from the feed's end

    def _deliver(self, cursor: str, entries: list[Entry]) -> None:
        """Fan the feed entries read after `cursor` out to the followers of their streams."""
        batches: dict[str, list[Entry]] = {}
        gap = False
        followers = self._followers
        for feed_id, fields in entries:
            gap = gap or fields.get("p", "") != (cursor if cursor != "0-0" else "")
            cursor = feed_id
            for record in orjson.loads(fields["d"]):  # [stream, id, field, value, ...]
                stream = record[0]
                if stream in followers:
                    entry = (record[1], dict(zip(record[2::2], record[3::2], strict=True)))
                    batches.setdefault(stream, []).append(entry)
        self._cursor = cursor
        now = asyncio.get_running_loop().time()
        if gap:  # entries fell out of the feed before this read: every follower catches up itself
            self.resyncs += 1
            log.warning("the stream reader fell behind the feed; followers catch up from their streams")
            for fs in followers.values():
                for f in fs:
                    f.queue.put_nowait(None)
        for stream, batch in batches.items():
            for f in followers[stream]:
                f.fed_at = now
                f.queue.put_nowait(batch)
