"""The token stream of a job: one Redis stream entry per event, written by the worker's relay,
read by the API's SSE and websocket relays. Entry ids ("1732870000000-3") are the event ids
clients resume from.

token: {"type": "token", "text": <new text>}
done:  {"type": "done", "data": <DoneEvent JSON>}   always the last entry, written exactly once
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


def token_fields(text: str) -> dict[str, str]:
    return {"type": "token", "text": text}


def done_fields(event: DoneEvent) -> dict[str, str]:
    return {"type": "done", "data": event.model_dump_json()}


def parse_entry(fields: dict[str, str]) -> StreamEvent:
    if fields.get("type") == "done":
        return DoneEvent.model_validate_json(fields["data"])
    return TokenEvent(text=fields.get("text", ""))
