"""Server-sent events on the wire, written without a framework in between.

A relay hands over what one read of a job's stream brought: every event in it becomes its own SSE
event (a client that keeps up gets one per token), and the batch goes out as one body chunk, one
send through the ASGI stack. Chunk JSON is the model's own rendering, made once per stream with a
marker where the text goes (`Template`), then filled per token with orjson: a pydantic model per
token cost more than everything else the API does for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from scheduler.stream import DoneEvent, StreamEvent, TokenEvent

PING = b": ping\n\n"  # a comment line: keeps proxies from closing a quiet stream; clients skip it
DONE = b"data: [DONE]\n\n"  # OpenAI's end of stream
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MARK = "\x00text\x00"  # stands for the text in a Template's model; JSON renders it "\u0000text\u0000"
USAGE_SLOT = b'"usage":null'  # where a Template's model, rendered with usage None, takes the usage so far


def response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={**HEADERS, **(headers or {})})


def data(payload: bytes | str) -> bytes:
    """One `data:` event. JSON has no raw newline, so one line holds it."""
    return b"data: " + (payload if isinstance(payload, bytes) else payload.encode()) + b"\n\n"


def job_event(entry_id: str, event: StreamEvent) -> bytes:
    """A job stream's event: `event: token|done`, its data without `type`, and the id to resume from."""
    if isinstance(event, TokenEvent):
        data = (
            {"text": event.text}
            if event.logprobs is None
            else {"text": event.text, "logprobs": event.logprobs}
        )
        kind, payload = b"token", orjson.dumps(data)
    else:
        kind, payload = b"done", done_json(event)
    return b"event: " + kind + b"\ndata: " + payload + b"\nid: " + entry_id.encode() + b"\n\n"


def sequence_job_event(entry_id: str, event: StreamEvent) -> bytes:
    """`job_event` for a job with n > 1: a token event's data also names its sequence (`index`) and,
    on the sequence's last, how it ended (`finish_reason`)."""
    if not isinstance(event, TokenEvent):
        return job_event(entry_id, event)
    data: dict[str, object] = {"index": event.index, "text": event.text}
    if event.logprobs is not None:
        data["logprobs"] = event.logprobs
    if event.finish_reason is not None:
        data["finish_reason"] = event.finish_reason
    return b"event: token\ndata: " + orjson.dumps(data) + b"\nid: " + entry_id.encode() + b"\n\n"


def done_json(event: DoneEvent) -> bytes:
    return orjson.dumps(event.model_dump(mode="json", exclude={"type"}))


class Template:
    """`model` rendered to JSON once, with MARK as the text: `fill(text)` is the same JSON with
    `text` in its place (a `data:` event), at the cost of escaping one string."""

    def __init__(self, model: BaseModel, exclude: set[str] | None = None) -> None:
        rendered = model.model_dump_json(exclude=exclude).encode()
        marker = orjson.dumps(MARK)
        if rendered.count(marker) != 1:
            raise ValueError("the model must hold MARK exactly once")
        head, tail = rendered.split(marker)
        self.head, self.tail = b"data: " + head, tail + b"\n\n"
        before, slot, after = self.tail.partition(USAGE_SLOT)
        self._usage = (before + b'"usage":', after) if slot else None

    def fill(self, text: str) -> bytes:
        return self.head + orjson.dumps(text) + self.tail

    def fill_usage(self, text: str, usage: bytes) -> bytes:
        """fill(text) with `usage` (JSON) in the model's usage field: vLLM's continuous usage."""
        if self._usage is None:
            raise ValueError("the model was rendered without a usage field")
        return self.head + orjson.dumps(text) + self._usage[0] + usage + self._usage[1]
