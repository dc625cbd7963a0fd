"""scheduler/redis_client.py: hiredis packs whole commands, byte for byte what redis-py's own packer
sends, and what hiredis refuses goes to redis-py's packer (its errors unchanged)."""

from __future__ import annotations

import pytest
import redis
from redis.connection import Connection

from localmoe.redis_server import RedisServer
from scheduler.redis_client import FastPacker, connect

COMMANDS = [
    ("SET", "k", "plain"),
    ("HSET", "job:1", "spec", '{"prompt": "def f(x):\\n    return \\u00e9"}', "cost", 3.5, "attempt", 0),
    ("EVALSHA", "ab" * 20, 2, "k1", "k2", -7, 1e20, "é—漢字"),
    (b"LPUSH", b"q", b"\x00\xffraw"),
    ("CLIENT SETNAME", "relay"),  # a name with a space: redis-py splits it
    ("SET", "k", memoryview(b"view")),  # hiredis refuses a memoryview: redis-py's packer takes it
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_packs_what_redis_py_packs(args: tuple[object, ...]) -> None:
    assert b"".join(FastPacker().pack(*args)) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("value", [True, None, object()])
def test_refuses_what_redis_py_refuses(value: object) -> None:
    with pytest.raises(redis.DataError) as ours:
        FastPacker().pack("SET", "k", value)
    with pytest.raises(redis.DataError) as theirs:
        Connection().pack_command("SET", "k", value)
    assert str(ours.value) == str(theirs.value)


def test_a_connected_client_packs_with_it(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, decode_responses=True)
    try:
        client.hset("packer:h", mapping={"text": "é—漢字", "n": 3, "x": 0.25})
        pipe = client.pipeline(transaction=False)
        pipe.hgetall("packer:h")
        pipe.delete("packer:h")
        assert pipe.execute() == [{"text": "é—漢字", "n": "3", "x": "0.25"}, 1]
        conn = client.connection_pool.get_connection()
        try:
            assert isinstance(conn._command_packer, FastPacker)
        finally:
            client.connection_pool.release(conn)
    finally:
        client.close()
