"""api/stream_hub.py on a real Redis: one XREAD of the feed for every followed stream, fanned out
in order, exactly once, to followers that join at any point; a gap in the feed is caught up from
the streams themselves. Writers go through FEED_LUA, as every writer of job streams does."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from typing import cast

import orjson
import redis.asyncio as aioredis

from api.stream_hub import Entry, StreamHub
from localmoe.redis_server import RedisServer
from scheduler import keys
from scheduler.stream import FEED_KEYS, FEED_LUA, feed_record_json

# KEYS: streams, then FEED_KEYS. ARGV: one JSON field list per stream ([field, value, ...]).
# Every stream gets its entry and the whole call is one feed entry, as a relay batch is.
APPEND = (
    FEED_LUA
    + """
for i = 1, #KEYS - 2 do append(KEYS[i], cjson.decode(ARGV[i])) end
publish()
"""
)


async def _write(client: aioredis.Redis, entries: dict[str, dict[str, str]]) -> None:
    """One entry per stream, all in one feed entry."""
    script = client.register_script(APPEND)
    flat = [orjson.dumps([x for kv in f.items() for x in kv]).decode() for f in entries.values()]
    await script(keys=[*entries, *FEED_KEYS], args=flat)


async def _write_each(client: aioredis.Redis, stream: str, start: int, end: int) -> None:
    for i in range(start, end):
        await _write(client, {stream: {"i": str(i)}})


async def _collect(hub: StreamHub, stream: str, after: str, n: int, out: list[str]) -> None:
    async for batch in hub.follow(stream, after, quiet_s=10):
        out += [fields["i"] for _, fields in batch]
        if len(out) >= n:
            return


def _streams(n: int) -> list[str]:
    return [keys.events(f"test-hub-{uuid.uuid4().hex}") for _ in range(n)]


def test_followers_share_one_reader(redis_server: RedisServer) -> None:
    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        streams = _streams(3)
        try:
            # Stream 0 has history; one follower reads it from the start, one joins live later.
            await _write_each(client, streams[0], 0, 5)
            early: list[str] = []
            tasks = [asyncio.create_task(_collect(hub, streams[0], "0-0", 20, early))]
            others: dict[str, list[str]] = {s: [] for s in streams[1:]}
            tasks += [asyncio.create_task(_collect(hub, s, "0-0", 15, others[s])) for s in streams[1:]]
            await asyncio.sleep(0.2)
            for i in range(5, 12):
                await _write(client, {s: {"i": str(i)} for s in streams})
            await asyncio.sleep(0.2)
            # A late follower from the start of stream 0: catch-up by XRANGE, then live, no gap or repeat.
            late: list[str] = []
            tasks.append(asyncio.create_task(_collect(hub, streams[0], "0-0", 20, late)))
            for i in range(12, 20):
                await _write(client, {s: {"i": str(i)} for s in streams})
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            expected = [str(i) for i in range(20)]
            assert early == expected and late == expected
            assert all(got == [str(i) for i in range(5, 20)] for got in others.values())
            # 15 writes, each to all 3 streams: one feed entry each, read at most once each.
            assert hub.reads <= 15, hub.reads
            await asyncio.sleep(0.05)
            assert hub._followers == {}  # nobody follows any more
            assert hub.resyncs == 0
        finally:
            await hub.close()
            await client.delete(*streams)
            await client.aclose()

    asyncio.run(main())


def test_a_batch_for_many_streams_is_one_read(redis_server: RedisServer) -> None:
    """100 followers joined while the reader waits in XREAD; one write to their 100 streams (one
    feed entry, as a relay batch) reaches every one of them, promptly, in one read."""

    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        streams = _streams(100)
        try:
            got: dict[str, list[str]] = {s: [] for s in streams}
            followers = [asyncio.create_task(_collect(hub, s, "0-0", 1, got[s])) for s in streams]
            await asyncio.sleep(0.3)  # every follower has joined; the reader is inside XREAD BLOCK
            reads, started = hub.reads, time.monotonic()
            await _write(client, {s: {"i": s[-12:]} for s in streams})
            await asyncio.wait_for(asyncio.gather(*followers), 3)
            assert time.monotonic() - started < 1.0  # not the XREAD's 5 s block
            assert all(got[s] == [s[-12:]] for s in streams)
            assert hub.reads == reads + 1
        finally:
            await hub.close()
            await client.delete(*streams)
            await client.aclose()

    asyncio.run(main())


def test_a_gap_in_the_feed_is_caught_up_from_the_stream(redis_server: RedisServer) -> None:
    """Entries that never reached this reader through the feed (it was trimmed past the reader, or
    Redis lost it): the next feed entry names another predecessor, and each follower reads its
    stream again from where it stood; nothing is missed or repeated."""

    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        stream, other = _streams(2)
        try:
            got: list[str] = []
            follower = asyncio.create_task(_collect(hub, stream, "0-0", 7, got))
            await _write_each(client, stream, 0, 2)
            await asyncio.sleep(0.2)
            assert got == ["0", "1"]
            for i in (2, 3, 4):  # written, but their feed entries are gone
                await client.xadd(stream, {"i": str(i)})
            await client.delete(keys.FEED_LAST)  # the next feed entry names none: a gap
            await _write(client, {other: {"i": "x"}, stream: {"i": "5"}})
            await _write_each(client, stream, 6, 7)
            await asyncio.wait_for(follower, 3)
            assert got == [str(i) for i in range(7)]
            assert hub.resyncs == 1
        finally:
            await hub.close()
            await client.delete(stream, other)
            await client.aclose()

    asyncio.run(main())


def test_a_quiet_stream_yields_an_empty_batch(redis_server: RedisServer) -> None:
    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        try:
            stream = _streams(1)[0]
            started = time.monotonic()
            async for batch in hub.follow(stream, "0-0", quiet_s=0.3):
                assert batch == []
                break
            assert 0.25 < time.monotonic() - started < 2
        finally:
            await hub.close()
            await client.aclose()

    asyncio.run(main())


def test_leaving_and_following_again_from_earlier_leaves_no_gap(redis_server: RedisServer) -> None:
    """A client that disconnects and resumes from an earlier event (SSE Last-Event-ID) while entries
    keep coming: nothing between the old point and the new entries is skipped or repeated."""

    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        try:
            for trial in range(20):
                stream = _streams(1)[0]
                await _write_each(client, stream, 0, 6)
                ids = [entry_id for entry_id, _ in cast(list[Entry], await client.xrange(stream))]
                first = hub.follow(stream, "0-0", quiet_s=5)
                seen = [fields["i"] async for batch in _take(first, 1) for _, fields in batch]
                await first.aclose()  # gone after its first batch
                writer = asyncio.create_task(_write_each(client, stream, 6, 12))
                got: list[str] = []
                await asyncio.wait_for(_collect(hub, stream, ids[1], 10, got), 5)
                await writer
                assert seen == [str(i) for i in range(6)], trial
                assert got == [str(i) for i in range(2, 12)], (trial, got)
                await client.delete(stream)
        finally:
            await hub.close()
            await client.aclose()

    asyncio.run(main())


def test_feed_records_are_the_entries_as_written(redis_server: RedisServer) -> None:
    """Both ways of staging a record (Lua's cjson in `append`, Python's JSON around the id in
    `stage`) give the entry as XRANGE returns it, whatever the text holds."""
    text = 'a "quote", a \\ backslash, a / slash, a\nnewline, \t, ünïcödé, 字, 🙂, \x01'

    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        a, b = _streams(2)
        fields = {"type": "token", "text": text, "n": "2", "a": "1", "s": "7"}
        head, tail = feed_record_json(b, fields)
        script = client.register_script(
            FEED_LUA
            + """
append(KEYS[1], cjson.decode(ARGV[1]))
local id = redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(ARGV[1])))
stage(ARGV[2], id, ARGV[3])
publish()
"""
        )
        try:
            flat = orjson.dumps([x for kv in fields.items() for x in kv]).decode()
            await script(keys=[a, b, *FEED_KEYS], args=[flat, head, tail])
            [(feed_id, feed_fields)] = cast(list[Entry], await client.xrevrange(keys.FEED, count=1))
            records = orjson.loads(feed_fields["d"])
            want = []
            for stream in (a, b):
                [(entry_id, got)] = cast(list[Entry], await client.xrange(stream))
                assert got == fields
                want.append([stream, entry_id, *(x for kv in got.items() for x in kv)])
            assert records == want
            assert await client.get(keys.FEED_LAST) == feed_id
        finally:
            await client.delete(a, b)
            await client.aclose()

    asyncio.run(main())


async def _take(batches: AsyncGenerator[list[Entry]], n: int) -> AsyncGenerator[list[Entry]]:
    for _ in range(n):
        yield await anext(batches)
