"""Token streams: SSE and websocket relays of a job's Redis stream, replayable by event id."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from api import sse
from api.auth import authenticate_websocket
from api.deps import JobDep, Services, ServicesDep
from api.protocol import refusals
from scheduler.stream import TokenEvent

router = APIRouter(prefix="/v1/jobs", tags=["streams"])

_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def resume_point(
    last_event_id: Annotated[str | None, Header(description="Resume after this event id.")] = None,
    after: Annotated[str | None, Query(description="Resume after this event id.")] = None,
) -> str:
    """The stream id to read after: the query wins over the Last-Event-ID header; none → "0-0"."""
    value = after if after is not None else last_event_id
    if not value:
        return "0-0"  # replay from the first token
    if not _EVENT_ID.match(value):
        raise HTTPException(422, "last event id must look like 1732870000000-0 (an id this API sent)")
    return value


# The answer is server-sent events; the schema says "any": it is per event.
_EVENTS: dict[int | str, dict[str, object]] = {
    200: {
        "content": {"text/event-stream": {"schema": {}}},
        "description": '`event: token` with `{"text": ...}` per piece of text (and `"logprobs"` when the '
        'job asked: per token [id, logprob, [[id, logprob], ...]]; with n > 1, `"index"`: its '
        'sequence, and on a sequence\'s last piece `"finish_reason"`), then one `event: done`; each '
        "with the `id` to resume after.",
    }
}


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={**_EVENTS, **refusals(401, 404, 422, inline=True)},
)
async def events(
    job: JobDep,
    services: ServicesDep,
    start: Annotated[str, Depends(resume_point)],
) -> StreamingResponse:
    """`event: token` with `{"text": ...}` per piece of text, then one `event: done`."""

    render = sse.job_event if job.spec.n == 1 else sse.sequence_job_event

    async def body() -> AsyncIterator[bytes]:
        async for batch in services.store.event_batches(job.id, start):
            yield b"".join(render(entry_id, event) for entry_id, event in batch) if batch else sse.PING

    return sse.response(body())


@router.websocket("/{job_id}/stream")
async def stream(websocket: WebSocket, job_id: str, after: str | None = None) -> None:
    """Messages `{"id", "type": "token", "text"}` (with n > 1 also `index`, and `finish_reason` on a
    sequence's last) then `{"id", "type": "done", ...}`; closes after done."""
    services: Services = websocket.app.state.services
    caller, subprotocol = await authenticate_websocket(websocket)
    await websocket.accept(subprotocol=subprotocol)
    if caller is None:
        await websocket.close(code=4401, reason="an API key is required (bearer.<key> subprotocol)")
        return
    job = await services.store.get(job_id) if re.match(r"^[0-9a-f]{32}$", job_id) else None
    if job is not None and not caller.admin and job.owner != caller.id:
        job = None
    if job is None:
        await websocket.close(code=4404, reason="no such job")
        return
    if after is not None and not _EVENT_ID.match(after):
        await websocket.close(code=4422, reason="bad event id")
        return
    sequences = job.spec.n > 1
    try:
        async for batch in services.store.event_batches(job.id, after or "0-0"):
            for entry_id, event in batch:  # a message per event: websocket frames are not merged
                if isinstance(event, TokenEvent):
                    message: dict[str, object] = {"id": entry_id, "type": "token", "text": event.text}
                    if event.logprobs is not None:
                        message["logprobs"] = event.logprobs
                    if sequences:
                        message["index"] = event.index
                        if event.finish_reason is not None:
                            message["finish_reason"] = event.finish_reason
                else:
                    message = {"id": entry_id, **event.model_dump(mode="json")}
                await websocket.send_text(orjson.dumps(message).decode())
        await websocket.close()
    except WebSocketDisconnect:
        return
