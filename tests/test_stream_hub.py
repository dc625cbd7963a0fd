"""api/stream_hub.py on a real Redis: one XREAD for every followed stream, fanned out in order,
exactly once, to followers that join at any point; a new stream is read at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator

import redis.asyncio as aioredis

from api.stream_hub import Entry, StreamHub
from localmoe.redis_server import RedisServer


async def _collect(hub: StreamHub, stream: str, after: str, n: int, out: list[str]) -> None:
    async for batch in hub.follow(stream, after, quiet_s=10):
        out += [fields["i"] for _, fields in batch]
        if len(out) >= n:
            return


def test_followers_share_one_reader(redis_server: RedisServer) -> None:
    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        streams = [f"test:hub:{uuid.uuid4().hex}" for _ in range(3)]
        try:
            # Stream 0 has history; one follower reads it from the start, one joins live later.
            for i in range(5):
                await client.xadd(streams[0], {"i": str(i)})
            early: list[str] = []
            tasks = [asyncio.create_task(_collect(hub, streams[0], "0-0", 20, early))]
            others: dict[str, list[str]] = {s: [] for s in streams[1:]}
            tasks += [asyncio.create_task(_collect(hub, s, "0-0", 15, others[s])) for s in streams[1:]]
            await asyncio.sleep(0.2)
            for i in range(5, 12):
                for s in streams:
                    await client.xadd(s, {"i": str(i)})
            await asyncio.sleep(0.2)
            # A late follower from the start of stream 0: catch-up by XRANGE, then live, no gap or repeat.
            late: list[str] = []
            tasks.append(asyncio.create_task(_collect(hub, streams[0], "0-0", 20, late)))
            for i in range(12, 20):
                for s in streams:
                    await client.xadd(s, {"i": str(i)})
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            expected = [str(i) for i in range(20)]
            assert early == expected and late == expected
            assert all(got == [str(i) for i in range(5, 20)] for got in others.values())
            # 19 bursts of writes, 3 streams: the followers shared the reads (one per 3 streams at most).
            assert hub.reads < 3 * 20, hub.reads
            # Nobody follows any more: the hub forgets the streams.
            await asyncio.sleep(0.05)
            assert hub._cursor == {}
        finally:
            await hub.close()
            await client.delete(*streams)
            await client.aclose()

    asyncio.run(main())


def test_a_new_stream_is_read_at_once(redis_server: RedisServer) -> None:
    """The reader is blocked on one quiet stream (for up to 5 s); a second stream followed then is
    served within a fraction of that, through the wake stream."""

    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        quiet, busy = (f"test:hub:{uuid.uuid4().hex}" for _ in range(2))
        try:
            waiting = asyncio.create_task(_collect(hub, quiet, "0-0", 1, []))
            await asyncio.sleep(0.3)  # the reader is now inside XREAD BLOCK on `quiet`
            got: list[str] = []
            follower = asyncio.create_task(_collect(hub, busy, "0-0", 1, got))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await client.xadd(busy, {"i": "x"})
            await asyncio.wait_for(follower, 3)
            assert got == ["x"] and time.monotonic() - started < 1.0
            waiting.cancel()
        finally:
            await hub.close()
            assert not await client.exists(hub.wake_stream)
            await client.delete(quiet, busy)
            await client.aclose()

    asyncio.run(main())


def test_a_burst_of_new_streams_costs_one_wake_per_read(redis_server: RedisServer) -> None:
    """100 streams followed at once while the reader waits in XREAD: it is woken once (not once
    per stream, each wake a read over every followed stream), and every stream is served."""

    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        quiet = f"test:hub:{uuid.uuid4().hex}"
        streams = [f"test:hub:{uuid.uuid4().hex}" for _ in range(100)]
        try:
            waiting = asyncio.create_task(_collect(hub, quiet, "0-0", 1, []))
            await asyncio.sleep(0.3)  # the reader is now inside XREAD BLOCK on `quiet`
            wakes, reads = hub.wakes, hub.reads
            got: dict[str, list[str]] = {s: [] for s in streams}
            followers = [asyncio.create_task(_collect(hub, s, "0-0", 1, got[s])) for s in streams]
            await asyncio.sleep(0.2)
            assert hub.wakes == wakes + 1
            pipe = client.pipeline(transaction=False)
            for s in streams:
                pipe.xadd(s, {"i": s[-4:]})
            await pipe.execute()
            await asyncio.wait_for(asyncio.gather(*followers), 3)
            assert all(got[s] == [s[-4:]] for s in streams)
            assert hub.wakes == wakes + 1 and hub.reads <= reads + 3
            waiting.cancel()
        finally:
            await hub.close()
            await client.delete(quiet, *streams)
            await client.aclose()

    asyncio.run(main())


def test_a_quiet_stream_yields_an_empty_batch(redis_server: RedisServer) -> None:
    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        try:
            stream = f"test:hub:{uuid.uuid4().hex}"
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
    keep coming: the read that was out for the old position must not skip what lies between."""

    async def main() -> None:
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(client)
        try:
            for trial in range(20):
                stream = f"test:hub:{uuid.uuid4().hex}"
                ids = [await client.xadd(stream, {"i": str(i)}) for i in range(6)]
                first = hub.follow(stream, "0-0", quiet_s=5)
                seen = [fields["i"] async for batch in _take(first, 1) for _, fields in batch]
                await first.aclose()  # gone after its first batch: the hub's cursor is past ids[2]
                writer = asyncio.create_task(_write(client, stream, 6, 12))
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


async def _take(batches: AsyncGenerator[list[Entry]], n: int) -> AsyncGenerator[list[Entry]]:
    for _ in range(n):
        yield await anext(batches)


async def _write(client: aioredis.Redis, stream: str, start: int, end: int) -> None:
    for i in range(start, end):
        await client.xadd(stream, {"i": str(i)})
