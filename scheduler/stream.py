"""The token stream of a job: one Redis stream entry per event, written by the worker's relay,
read by the API's SSE and websocket relays. Entry ids ("1732870000000-3") are the event ids
clients resume from.

token:  {"type": "token", "text": <new text>, "n": <tokens it took>, "a": <attempt>, "s": <entry number>}
resume: {"type": "resume", "a": <attempt>}   a new attempt continues the text of the earlier ones
done:   {"type": "done", "data": <DoneEvent JSON>}   always the last entry, written exactly once

A job whose worker died is run again (workers/reaper.py); the new attempt writes `resume`
atomically with reading the text so far (workers/tasks.py RESUME) and continues from it. Readers
drop token entries of an attempt older than the last `resume` they passed: a stale worker that
keeps writing after it lost its job adds nothing a client sees. Clients see token and done only.

`s` numbers an attempt's token entries 1, 2, 3…: a relay that retries a write whose reply it lost
(Redis restarting after it ran the write) writes the same entries again, and readers drop
every token entry whose `s` is not above the last one they passed for that attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from scheduler.jobs import Job, JobStatus, Usage


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A piece of a job's text. Made once per token per reader from a str Redis returned: a plain
    record, not a model (pydantic's model_construct cost more than the rest of a token's relay)."""

    text: str
    type: Literal["token"] = "token"


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    status: JobStatus
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage = Usage()

    @classmethod
    def of(cls, job: Job) -> DoneEvent:
        return cls(status=job.status, finish_reason=job.finish_reason, error=job.error, usage=job.usage)


StreamEvent = TokenEvent | DoneEvent


def token_fields(text: str, n: int = 1, attempt: int = 1, seq: int | None = None) -> dict[str, str]:
    fields = {"type": "token", "text": text, "n": str(n), "a": str(attempt)}
    if seq is not None:
        fields["s"] = str(seq)
    return fields


def done_fields(event: DoneEvent) -> dict[str, str]:
    return {"type": "done", "data": event.model_dump_json()}


def parse_entry(fields: dict[str, str]) -> StreamEvent:
    if fields.get("type") == "done":
        return DoneEvent.model_validate_json(fields["data"])
    return TokenEvent(fields.get("text", ""))


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
