"""What each worker's prefix cache probably holds: the prompt blocks recently routed to it.

A prompt's token ids are cut into blocks of the engine's KV block size; block i's hash covers
blocks 0..i (chained: hash((hash of block i-1, *tokens of block i))), so two prompts share block
i's hash only when every token up to its end is the same, which is when an engine with automatic
prefix caching (vLLM's) can reuse that block's KV. Python's hash of a tuple of ints is not salted
(only str and bytes hashes are): every API process computes the same values.

Every API process keeps a PrefixIndex: per worker, the hashes of the blocks recently sent there,
at most about as many as the engine's KV cache holds and none older than the expiry (an engine
evicts its least recently used blocks; the index forgets the least recently sent ones). Its own
routes are added at once (Scheduler._take).
The other API processes learn them through one Redis stream (keys.PREFIX_SENT), where the
Enqueuer writes, in the pipeline that records a batch's jobs, one entry per worker routed to:

    w: worker name   o: the writing process's origin id   h: base64 of the hashes (int64, native order)

Each process's registry thread reads the stream from where it left off (`pull`) and skips its own
entries. A worker that restarted (a new started_at) starts with an empty cache here too.
"""

from __future__ import annotations

import base64
import time
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from scheduler import keys

STREAM_MAXLEN = 100_000  # entries kept in keys.PREFIX_SENT (approximate trimming)
PULL_COUNT = 2_000  # entries one XREAD takes


def block_hashes(ids: Sequence[int], block_size: int, max_blocks: int) -> list[int]:
    """The chained hashes of the prompt's first full blocks (at most max_blocks of them)."""
    out: list[int] = []
    parent = 0
    end = min(len(ids) // block_size, max_blocks) * block_size
    for start in range(0, end, block_size):
        parent = hash((parent, *ids[start : start + block_size]))
        out.append(parent)
    return out


@dataclass(frozen=True)
class Sent:
    """Blocks of one job's prompt, routed to `worker`."""

    worker: str
    hashes: Sequence[int]


class _Held:
    """The block hashes sent to one worker, in two generations: every touch goes into `new`; once
    `new` holds half the capacity, or is half the ttl old, it becomes `old` and the previous `old`
    is dropped. So the last capacity/2 to capacity blocks sent are kept, none much older than the
    ttl, and every operation is a C-speed set operation. A touch adds a whole prefix (blocks 0..n),
    so what is held is prefix-closed: a prompt's held blocks are a leading run of them."""

    def __init__(self, started_at: float, now: float) -> None:
        self.started_at = started_at
        self.new: set[int] = set()
        self.old: set[int] = set()
        self.new_since = now

    def touch(self, hashes: Sequence[int], now: float, capacity: int) -> None:
        self.new.update(hashes)
        if len(self.new) >= capacity // 2:
            self.rotate(now)

    def rotate(self, now: float) -> None:
        self.old, self.new, self.new_since = self.new, set(), now

    def matched(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are held (a binary search: held ones lead)."""
        new, old = self.new, self.old
        lo, hi = 0, len(hashes)  # hashes[:lo] held; hashes[hi:] not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            h = hashes[mid - 1]
            if h in new or h in old:
                lo = mid
            else:
                hi = mid - 1
        return lo


class PrefixIndex:
    """Per worker, the blocks of prompts recently routed to it (see the module docstring).

    ttl_s: a block counts as cached at most this long after it was last sent; default_capacity:
    blocks kept per worker whose engine does not say how many its KV cache holds. Not thread-safe:
    the Scheduler calls it under its lock.
    """

    def __init__(self, ttl_s: float, default_capacity: int) -> None:
        self.ttl_s = ttl_s
        self.default_capacity = default_capacity
        self.origin = uuid.uuid4().hex[:12]
        self._held: dict[str, _Held] = {}
        self._capacity: dict[str, int] = {}
        self._last_id = ""  # the stream entry read last; "" before the first pull

    def known(self, worker: str, started_at: float, capacity: int | None) -> None:
        """The worker's registry record: a new started_at empties what it held (a restarted engine
        holds nothing); capacity: blocks its KV cache holds, when known."""
        held = self._held.get(worker)
        if held is None or held.started_at != started_at:
            self._held[worker] = _Held(started_at, time.time())
        self._capacity[worker] = min(capacity or self.default_capacity, self.default_capacity)

    def touch(self, worker: str, hashes: Sequence[int], now: float) -> None:
        held = self._held.get(worker)
        if held is None:
            held = self._held[worker] = _Held(0.0, now)
        held.touch(hashes, now, self._capacity.get(worker, self.default_capacity))

    def matched(self, worker: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` were sent to `worker` recently."""
        held = self._held.get(worker)
        return held.matched(hashes) if held is not None and hashes else 0

    def expire(self, now: float) -> None:
        for held in self._held.values():
            if now - held.new_since >= self.ttl_s / 2:
                held.rotate(now)

    def apply(self, entries: list[tuple[str, str, str]], now: float) -> None:
        """Touch the blocks of stream entries (worker, origin, packed hashes) other processes wrote."""
        for worker, origin, packed in entries:
            if origin != self.origin:
                self.touch(worker, unpack(packed), now)

    def pull(self, client: redis.Redis, now: float) -> list[tuple[str, str, str]]:
        """The stream entries written since the last pull (the last ttl_s of them the first time).
        Reads Redis: call it outside the Scheduler's lock, then `apply` under it."""
        if not self._last_id:
            self._last_id = f"{int((now - self.ttl_s) * 1000)}-0"
        out: list[tuple[str, str, str]] = []
        while True:
            reply: Any = client.xread({keys.PREFIX_SENT: self._last_id}, count=PULL_COUNT)
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                self._last_id = entry_id
                out.append((fields.get("w", ""), fields.get("o", ""), fields.get("h", "")))
            if len(entries) < PULL_COUNT:
                return out

    def stage(self, pipe: redis.client.Pipeline, sent: Sequence[Sent]) -> None:
        """Add to `pipe` the stream entries for jobs routed in one batch: one per worker."""
        by_worker: dict[str, list[int]] = {}
        for s in sent:
            by_worker.setdefault(s.worker, []).extend(s.hashes)
        for worker, hashes in by_worker.items():
            fields = {"w": worker, "o": self.origin, "h": pack(hashes)}
            pipe.xadd(keys.PREFIX_SENT, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]


def pack(hashes: Sequence[int]) -> str:
    return base64.b64encode(array("q", hashes).tobytes()).decode()


def unpack(packed: str) -> list[int]:
    return array("q", base64.b64decode(packed)).tolist()
