"""The token stream of a job: one Redis stream entry per event, written by the worker's relay,
read by the API's SSE and websocket relays. Entry ids ("1732870000000-3") are the event ids
clients resume from.

token:  {"type": "token", "text": <new text>, "n": <tokens it took>, "a": <attempt>, "s": <entry number>,
         "lp": <JSON [[token id, logprob, [[id, logprob], ...]], ...] for those n tokens, when asked>,
         and for a job of several sequences (JobSpec.n > 1) only: "i": <its sequence's index>,
         "f": <how the sequence ended, on its last entry>}
resume: {"type": "resume", "a": <attempt>}   a new attempt continues the text of the earlier ones
done:   {"type": "done", "data": <DoneEvent JSON>}   always the last entry, written exactly once

A job whose worker died is run again (workers/reaper.py); the new attempt writes `resume`
atomically with reading the text so far (scheduler/record.py RESUME) and continues from it. Readers
drop token entries of an attempt older than the last `resume` they passed: a stale worker that
keeps writing after it lost its job adds nothing a client sees. Clients see token and done only.

A job with n > 1 writes its n sequences' entries interleaved in the one stream, each naming its
sequence (`i`); a sequence's last entry says how it ended (`f`: stop, length, abort, error), so a
reader can close that sequence before the job's `done`, and a new attempt knows which sequences
to continue. A job of one sequence writes neither field: its entries are as they always were.

`s` numbers an attempt's token entries 1, 2, 3… (all its sequences' together): a relay that
retries a write whose reply it lost (Redis restarting after it ran the write) writes the same
entries again, and readers drop every token entry whose `s` is not above the last one they passed
for that attempt.

The feed (keys.FEED): every script that appends to job streams does it through FEED_LUA's
`append`, then `publish()` adds ONE feed entry listing what it appended, in order:
`{"p": <the previous feed entry's id, "" for the first>, "d": <JSON [[stream, id, field, value,
...], ...]>}`. A reader of the feed alone sees every entry of every job stream, as XREAD would
return them, at one entry per relay batch instead of one per stream per batch: on the 2-core box
an XREAD over 64 streams cost Redis 13–15 µs per entry it returned, four times the XADD that wrote
the entry. The job streams stay the record (replay, resume, catch-up); the feed is trimmed to
about FEED_MAXLEN entries, and `p` lets a reader notice that it fell further behind than that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel

from scheduler import keys
from scheduler.jobs import Job, JobStatus, Usage

FEED_KEYS = [keys.FEED, keys.FEED_LAST]  # the last two KEYS of every script using FEED_LUA
# Feed entries kept (about: trimmed by whole nodes). A relay batch is one entry, ~110 bytes per
# token it carries: at most ~30 MB for 256-token batches, and some 8 s of a GPU's steps; a reader
# further behind than that catches up from the job streams (api/stream_hub.py).
FEED_MAXLEN = 1024

# Lua for every script that writes job streams. The script's last two KEYS are keys.FEED and
# keys.FEED_LAST. `append(stream, fields)`: XADD fields (a flat {field, value, ...} table) to the
# job stream and stage its feed record; → the entry id. `stage(head, id, tail)`: stage the record
# of an entry the caller added itself, given as the JSON around its id (feed_record_json: built in
# Python, not as Lua tables for cjson, it costs Redis a third as much per token: bench/feed_cost.py).
# `publish()`: one feed entry for everything staged (none if nothing was); call it
# once, after the last append.
FEED_LUA = f"""
local feed_parts, feed_n = {{}}, 0
local function stage(head, id, tail)
  feed_parts[feed_n + 1] = head
  feed_parts[feed_n + 2] = id
  feed_parts[feed_n + 3] = tail
  feed_n = feed_n + 3
end
local function append(stream, fields)
  local id = redis.call('XADD', stream, '*', unpack(fields))
  local record = cjson.encode({{stream, id, unpack(fields)}})
  stage(',', '', record)
  return id
end
local function publish()
  if feed_n == 0 then return end
  local feed, last = KEYS[#KEYS - 1], KEYS[#KEYS]
  local prev = redis.call('GET', last) or ''
  local d = '[' .. string.sub(table.concat(feed_parts), 2) .. ']'
  local id = redis.call('XADD', feed, 'MAXLEN', '~', {FEED_MAXLEN}, '*', 'p', prev, 'd', d)
  redis.call('SET', last, id)
  feed_parts, feed_n = {{}}, 0
end
"""


def feed_record_json(stream: str, fields: dict[str, str]) -> tuple[str, str]:
    """(head, tail) for FEED_LUA's `stage`: head + id + tail is the feed record
    `[stream, id, field, value, ...]`, as JSON, led by the comma that separates records."""
    flat = [x for kv in fields.items() for x in kv]
    return ",[" + orjson.dumps(stream).decode() + ',"', '",' + orjson.dumps(flat).decode()[1:]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A piece of a job's text. Made once per token per reader from a str Redis returned: a plain
    record, not a model (pydantic's model_construct cost more than the rest of a token's relay)."""

    text: str
    tokens: int = 1  # the tokens it took (the entry's `n`): usage so far is their sum
    logprobs: list[Any] | None = (
        None  # per token: [id, logprob, [[id, logprob], ...]] (moe_core TokenLogprob)
    )
    type: Literal["token"] = "token"

    # A job of one sequence: every piece is sequence 0's, and it ends with the job (`done`).
    @property
    def index(self) -> int:
        return 0

    @property
    def finish_reason(self) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class SequenceToken(TokenEvent):
    """A piece of one sequence's text, of a job with n > 1 (a subclass: a job of one sequence
    builds its events without these two fields)."""

    index: int = 0
    finish_reason: str | None = None  # on the sequence's last piece: how it ended


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    status: JobStatus
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage = Usage()

    @classmethod
    def of(cls, job: Job) -> DoneEvent:
        return cls(status=job.status, finish_reason=job.finish_reason, error=job.error, usage=job.usage)


StreamEvent = TokenEvent | DoneEvent  # a TokenEvent may be a SequenceToken


def token_fields(
    text: str, n: int = 1, attempt: int = 1, seq: int | None = None, logprobs: list[Any] | None = None
) -> dict[str, str]:
    fields = {"type": "token", "text": text, "n": str(n), "a": str(attempt)}
    if seq is not None:
        fields["s"] = str(seq)
    if logprobs is not None:
        fields["lp"] = orjson.dumps(logprobs).decode()
    return fields


def sequence_token_fields(fields: dict[str, str], index: int, finish: str | None) -> dict[str, str]:
    """`token_fields`' entry as a sequence of a job with n > 1 writes it (i, then f on its last)."""
    fields["i"] = str(index)
    if finish is not None:
        fields["f"] = finish
    return fields


def done_fields(event: DoneEvent) -> dict[str, str]:
    return {"type": "done", "data": event.model_dump_json()}


def parse_entry(fields: dict[str, str]) -> StreamEvent:
    if fields.get("type") == "done":
        return DoneEvent.model_validate_json(fields["data"])
    lp = fields.get("lp")
    if "i" in fields:  # a sequence of a job with n > 1
        logprobs = orjson.loads(lp) if lp else None
        n, index = int(fields.get("n", "1")), int(fields["i"])
        return SequenceToken(fields.get("text", ""), n, logprobs, "token", index, fields.get("f"))
    return TokenEvent(fields.get("text", ""), int(fields.get("n", "1")), orjson.loads(lp) if lp else None)


class Fence:
    """Reads a stream in order and says which entries a client sees (see the module docstring)."""

    def __init__(self) -> None:
        self.attempt = 1
        self.last_seq: dict[int, int] = {}  # attempt → the last `s` passed

    def visible(self, fields: dict[str, str]) -> StreamEvent | None:
        kind = fields.get("type")
        if kind == "resume":
            self.attempt = max(self.attempt, int(fields.get("a", "1")))
            return None
        if kind == "token":
            attempt = int(fields.get("a", "1"))
            if attempt < self.attempt:
                return None  # written by an attempt that had already lost the job
            if "s" in fields:
                seq = int(fields["s"])
                if seq <= self.last_seq.get(attempt, 0):
                    return None  # written again by a retried write
                self.last_seq[attempt] = seq
        return parse_entry(fields)
