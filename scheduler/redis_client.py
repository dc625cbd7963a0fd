"""The synchronous Redis client every long-lived LocalMoE process writes through (the API's
Enqueuer, a worker's relay and webhook sender): redis-py, with the whole command packed by hiredis.

redis-py's hiredis packer first passes every argument through its Encoder in a Python generator,
then hands the tuple to `hiredis.pack_command`, which itself accepts str (as UTF-8), bytes, int and
float (as their repr) and refuses the rest with TypeError. For the relay's FEED call (a few
arguments per job of a step) and a job record's HSET (27 fields) that Python pass was most of the
packing: sampled on the H200, half of the relay process's time went through redis-py's packer (the
hiredis call itself a fifth of that), and a tenth of an API process's during intake; hiredis alone
packs a record's HSET in 3.6 µs against 31 µs on the 2-core box. `FastPacker` calls hiredis
directly and hands anything it refuses (a bool, None, a memoryview) or a command name with a space
("CLIENT SETNAME") to redis-py's own packer, which encodes or raises exactly as before.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis
from redis.connection import Encoder, HiredisRespSerializer, PythonRespSerializer

_CUTOFF = 6000  # redis-py's buffer cutoff for its Python packer


class FastPacker:
    """A redis-py command packer (`Connection(command_packer=...)`); str arguments are encoded as
    UTF-8 (strict), as redis-py's default Encoder does."""

    def __init__(self) -> None:
        encode = Encoder("utf-8", "strict", False).encode
        self._fallback = HiredisRespSerializer(PythonRespSerializer(_CUTOFF, encode).pack, encode)

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        if not ((isinstance(name, str) and " " in name) or (isinstance(name, bytes) and b" " in name)):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return self._fallback.pack(*args)


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """redis.Redis.from_url(url, **kwargs), its connections packing with FastPacker."""
    return redis.Redis.from_url(url, command_packer=FastPacker(), **kwargs)
