"""The token stream of a job: one Redis stream entry per event, written by the worker's relay,
read by the API's SSE and websocket relays. Entry ids ("1732870000000-3") are the event ids
clients resume from.

token:  {"type": "token", "text": <new text>, "n": <tokens it took>, "a": <attempt>}
resume: {"type": "resume", "a": <attempt>}   a new attempt continues the text of the earlier ones
done:   {"type": "done", "data": <DoneEvent JSON>}   always the last entry, written exactly once

A job whose worker died is run again (workers/reaper.py); the new attempt writes `resume`
atomically with reading the text so far (workers/tasks.py RESUME) and continues from it. Readers
drop token entries of an attempt older than the last `resume` they passed: a stale worker that
keeps writing after it lost its job adds nothing a client sees. Clients see token and done only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from scheduler.jobs import Job, JobStatus, Usage


class TokenEvent(BaseModel):
    type: Literal["token"] = "token"
    text: str


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


def token_fields(text: str, n: int = 1, attempt: int = 1) -> dict[str, str]:
    return {"type": "token", "text": text, "n": str(n), "a": str(attempt)}


def done_fields(event: DoneEvent) -> dict[str, str]:
    return {"type": "done", "data": event.model_dump_json()}


def parse_entry(fields: dict[str, str]) -> StreamEvent:
    if fields.get("type") == "done":
        return DoneEvent.model_validate_json(fields["data"])
    return TokenEvent(text=fields.get("text", ""))


class Fence:
    """Reads a stream in order and says which entries a client sees (see the module docstring)."""

    def __init__(self) -> None:
        self.attempt = 1

    def visible(self, fields: dict[str, str]) -> StreamEvent | None:
        kind = fields.get("type")
        if kind == "resume":
            self.attempt = max(self.attempt, int(fields.get("a", "1")))
            return None
        if kind == "token" and int(fields.get("a", "1")) < self.attempt:
            return None  # written by an attempt that had already lost the job
        return parse_entry(fields)
