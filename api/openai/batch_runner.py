"""A batch's run, in the API process that accepted it.

Each line becomes an ordinary job through the function the synchronous route runs
(chat.chat_completion / completions.text_completion → serving.accept_request → api.jobs.accept:
validation, admission, routing, the queue), at `low` priority unless the line names one (capped
by the key as ever), at most LINES_IN_FLIGHT at once. Its answer, exactly what the endpoint would
have answered, is one line of the output file (status 200) or of the error file (any other status):

    {"id": "batch_req_…", "custom_id": …, "response": {"status_code", "request_id", "body"}, "error": null}

Lines that never ran (cancelled, expired) go to the error file with `response` null and
`error` {code: batch_cancelled | batch_expired, message}. A line refused for backpressure (429)
or an unavailable queue (503) is not an error: it waits Retry-After and is sent again, so a
batch never runs faster than admission lets it.

Not yet (issue 21, items 3 and 4): a scheduler tier below `low` fed at the workers' spare
capacity, per-key limits on batches, and durability: the run lives in this process's event
loop; if the process dies, the batch stays `in_progress` (its record says so, nothing resumes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from fastapi import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from api.auth import ApiKey
from api.deps import Services
from api.openai.batch_input import BatchRequestLine
from api.openai.batch_store import BatchRecord
from api.openai.chat import chat_completion
from api.openai.completions import text_completion
from api.openai.errors import OpenAIError, error_response, from_http, validation_error
from api.openai.file_store import new_file_id
from api.openai.protocol import BatchError, BatchErrors, BatchStatus, ChatCompletionRequest, CompletionRequest
from scheduler.jobs import Priority

log = logging.getLogger(__name__)

LINES_IN_FLIGHT = 64
WATCH_S = 0.5  # how often a run looks for a cancel (another API process may have written it)
MAX_ERRORS = 10  # validation errors listed on a failed batch


async def answer(
    services: Services, caller: ApiKey, endpoint: str, body: dict[str, Any]
) -> tuple[int, Any, str | None]:
    """The synchronous endpoint's answer to `body`: (status, JSON body, the job's id if one ran)."""
    while True:
        try:
            response = await _call(services, caller, endpoint, body)
            location = response.headers.get("location", "")
            return response.status_code, orjson.loads(response.body), location.rsplit("/", 1)[-1] or None
        except ValidationError as e:
            v = validation_error(e.errors())
            refusal = error_response(v.status, v.message, v.param)
        except OpenAIError as e:
            refusal = error_response(e.status, e.message, e.param, e.code)
        except HTTPException as e:
            if e.status_code in (429, 503):  # pacing, not an answer
                await asyncio.sleep(float((e.headers or {}).get("Retry-After", 1)))
                continue
            refusal = from_http(e)
        return refusal.status_code, orjson.loads(refusal.body), None


async def _call(services: Services, caller: ApiKey, endpoint: str, body: dict[str, Any]) -> Response:
    body = {"priority": Priority.LOW.value, **body}
    if endpoint == "/v1/chat/completions":
        chat = ChatCompletionRequest.model_validate(body)
        _refuse_stream(chat.stream)
        return await chat_completion(chat, services, caller)
    text = CompletionRequest.model_validate(body)
    _refuse_stream(text.stream)
    return await text_completion(text, services, caller)


def _refuse_stream(stream: bool | None) -> None:
    if stream:
        raise OpenAIError(
            400, "stream is not supported in a batch: each answer is one line of a file", "stream"
        )


class _Results:
    """The output and error files being written (in the files directory's incoming/)."""

    def __init__(self, services: Services) -> None:
        self.files = services.files
        self.ids = (new_file_id(), new_file_id())  # output, errors
        self.parts = [self.files.incoming(i) for i in self.ids]
        self.out: list[BinaryIO] = [p.open("wb") for p in self.parts]

    def answered(self, custom_id: str, status: int, body: Any, request_id: str | None) -> None:
        response = {"status_code": status, "request_id": request_id, "body": body}
        self._write(status != 200, {"custom_id": custom_id, "response": response, "error": None})

    def never_ran(self, custom_id: str, code: str, message: str) -> None:
        self._write(
            True, {"custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}
        )

    def _write(self, error: bool, line: dict[str, Any]) -> None:
        self.out[error].write(orjson.dumps({"id": f"batch_req_{uuid.uuid4().hex}", **line}) + b"\n")

    async def keep(self, batch: BatchRecord, ttl_s: int) -> tuple[str | None, str | None]:
        """→ (output file id, error file id): each None when it has no line."""
        kept: list[str | None] = []
        for file_id, part, out, kind in zip(self.ids, self.parts, self.out, ("output", "error"), strict=True):
            out.close()
            if part.stat().st_size == 0:
                kept.append(None)
                continue
            name = f"{batch.id}_{kind}.jsonl"
            await self.files.add(file_id, batch.owner, name, "batch_output", ttl_s, part)
            kept.append(file_id)
        return kept[0], kept[1]

    def discard(self) -> None:
        for out, part in zip(self.out, self.parts, strict=True):
            out.close()
            part.unlink(missing_ok=True)


def _validate(source: BinaryIO, endpoint: str) -> tuple[int, list[BatchError]]:
    """→ (lines, the first MAX_ERRORS lines whose url is not the batch's endpoint)."""
    errors: list[BatchError] = []
    n = 0
    for n, raw in enumerate(source, 1):
        url = BatchRequestLine.model_validate_json(raw).url  # the upload checked the rest
        if url != endpoint and len(errors) < MAX_ERRORS:
            message = f"the line's url {url} is not the batch's endpoint {endpoint}"
            errors.append(BatchError(code="invalid_url", message=message, param="url", line=n))
    source.seek(0)
    return n, errors


async def run(services: Services, caller: ApiKey, batch: BatchRecord, input_path: Path) -> None:
    """The whole run of one batch, from `validating` to a terminal status."""
    store = services.batches
    ttl_s = services.settings.limits.file_ttl_s
    with input_path.open("rb") as source:  # open: a DELETE of the input file now leaves it readable
        total, errors = _validate(source, batch.endpoint)
        if errors:
            await store.set_results(batch.id, None, None, BatchErrors(data=errors))
            await store.move(batch.id, BatchStatus.FAILED)
            return
        await store.set_total(batch.id, total)
        if not await store.move(batch.id, BatchStatus.IN_PROGRESS):  # cancelled while validating
            await store.move(batch.id, BatchStatus.CANCELLED)
            return
        results = _Results(services)
        try:
            stop = await _run_lines(services, caller, batch, source, results)
            if stop is None and not await store.move(batch.id, BatchStatus.FINALIZING):
                stop = BatchStatus.CANCELLED  # a cancel came as the last line ended
            output, error = await results.keep(batch, ttl_s)
        except BaseException:
            results.discard()
            raise
    await store.set_results(batch.id, output, error, None)
    await store.move(batch.id, stop or BatchStatus.COMPLETED)


async def _run_lines(
    services: Services, caller: ApiKey, batch: BatchRecord, source: BinaryIO, results: _Results
) -> BatchStatus | None:
    """Every line of `source`, LINES_IN_FLIGHT at once. → None when all ran; CANCELLED or EXPIRED
    when the batch was stopped (the lines not answered are written as never run). Each line ends
    in exactly one of the two files, and is counted once."""
    store = services.batches
    room = asyncio.Semaphore(LINES_IN_FLIGHT)
    running: dict[asyncio.Task[None], str] = {}  # task → its line's custom_id

    async def one(line: BatchRequestLine) -> None:
        try:
            status, body, request_id = await answer(services, caller, batch.endpoint, line.body)
            results.answered(line.custom_id, status, body, request_id)
            ok = status == 200
        except Exception as e:  # Redis gone for good, a bug: the line fails, the batch goes on
            log.exception("batch %s, line %r", batch.id, line.custom_id)
            results.never_ran(line.custom_id, "server_error", f"{type(e).__name__}: {e}")
            ok = False
        finally:
            room.release()
        await store.count(batch.id, ok=ok)

    async def stopped() -> BatchStatus | None:
        if time.time() >= batch.expires_at:
            return BatchStatus.EXPIRED
        return BatchStatus.CANCELLED if await store.status(batch.id) is BatchStatus.CANCELLING else None

    stop: BatchStatus | None = None
    unsent: list[str] = []
    watched = time.monotonic()
    for raw in source:
        line = BatchRequestLine.model_validate_json(raw)
        while not await _acquire(room, WATCH_S) and not (stop := await stopped()):
            pass
        if stop is None and time.monotonic() - watched > WATCH_S:
            watched = time.monotonic()
            stop = await stopped()
        if stop is not None:
            unsent.append(line.custom_id)
            break
        task = asyncio.create_task(one(line))
        running[task] = line.custom_id
        task.add_done_callback(lambda t: running.pop(t, None))
    while running and stop is None:
        await asyncio.wait(set(running), timeout=WATCH_S)
        stop = await stopped() if running else None
    if stop is None:
        return None
    in_flight = dict(running)
    for task in in_flight:  # each cancels its job (serving's wait, without a request)
        task.cancel()
    await asyncio.gather(*in_flight, return_exceptions=True)
    unsent += [cid for task, cid in in_flight.items() if task.cancelled()]
    unsent += [BatchRequestLine.model_validate_json(raw).custom_id for raw in source]
    _never_ran(results, unsent, stop)
    for _ in unsent:
        await store.count(batch.id, ok=False)
    return stop


async def _acquire(room: asyncio.Semaphore, timeout: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await room.acquire()
            return True
    return False


def _never_ran(results: _Results, custom_ids: list[str], stop: BatchStatus) -> None:
    code = "batch_expired" if stop is BatchStatus.EXPIRED else "batch_cancelled"
    why = "the batch's completion window passed" if stop is BatchStatus.EXPIRED else "the batch was cancelled"
    for custom_id in custom_ids:
        results.never_ran(custom_id, code, f"not run: {why}")
