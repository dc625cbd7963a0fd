"""One run of one batch, from the status it is in to a terminal one. batch_runs.py decides which
API process runs a batch (the lease); a run may be its first or take over from one that died.

Each line becomes an ordinary job (a completions line with a list of prompts: one job per prompt,
answered together) through the function the synchronous route runs (chat.chat_completion /
completions.text_completion or several_completions → serving.accept_request → api.jobs.accept:
validation, admission, routing, the queue), at `low` priority unless the line names one (capped
by the key as ever) at the `batch` priority unless the line names another: the tier below `low`,
admitted only while the workers have spare capacity (api/admission.py); no more lines at once
than the key may have in flight over every API process (`batches.per_key_lines_in_flight`,
batch_store.py TAKE_LINE). Its answer, exactly what the endpoint would have answered, is one
line of the output file (status 200) or of the error file (any other status):

    {"id": "batch_req_…", "custom_id": …, "response": {"status_code", "request_id", "body"}, "error": null}

Lines that never ran (cancelled, expired) go to the error file with `response` null and
`error` {code: batch_cancelled | batch_expired, message}. A line refused for backpressure or for
want of spare capacity (429) or an unavailable queue (503), or met by Redis restarting, is not an
error: it waits and is sent again, so a batch never runs faster than admission lets it.

Resuming: a line's result goes to the batch's ledger (batch_store.py) once, and a run sends only
the lines not in it. Each line's job is submitted with the Idempotency-Key `line_key(batch,
custom_id)` (a list's prompt i: that key + "-i", `line_keys`): a line whose job a dead run
submitted is answered by that job, found again by the key, not submitted twice (only where the key
is gone: past limits.idempotency_ttl_s, or taken by a run that died before the job was made,
ABANDONED_S ago). Two runs may overlap for a moment (one stalled past its lease, another took the
batch over): a key is only ever freed by the claim that took it (a refusal) or once abandoned, so
the second finds the first's job and never submits the line again; the ledger keeps a line's first
answer. The result files are written from the ledger, in the input's order, each run into parts of
its own moved into place under ids made from the batch's: a run that dies while writing them leaves
nothing that the next run does not write over, and two runs finishing at once do not remove each
other's parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from fastapi import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from api.admission import Refused
from api.auth import ApiKey
from api.deps import Services
from api.jobs import KeyConflict, forget_idempotency, idempotent_job_id
from api.openai.batch_input import BatchRequestLine
from api.openai.batch_store import BatchRecord
from api.openai.chat import chat_completion
from api.openai.completions import prompt_keys, several_completions, text_completion
from api.openai.errors import OpenAIError, error_response, from_http, validation_error
from api.openai.protocol import BatchError, BatchErrors, BatchStatus, ChatCompletionRequest, CompletionRequest
from api.stream_hub import RESTARTING, retrying
from scheduler.backlog import Verdict
from scheduler.jobs import Job, Priority
from scheduler.webhooks import BatchEventType, Delivery, make_delivery

log = logging.getLogger(__name__)

S = BatchStatus
WATCH_S = 0.5  # how often a run looks for a cancel (another API process may have written it)
TURN_S = 0.1  # how often a line held back (no spare capacity, the key's limit) asks again: the
# workers' slots come free one by one, each idle until a line takes it (half this, on average),
# unless a line of the same run ends first: its slot is free then, and the waiting line asks at once
ABANDONED_S = 10  # a line's key that names no job this long after it was taken: its run died taking it
PACING = (429, 503)  # refusals that pace a line (it is sent again after Retry-After), not answer it
MAX_ERRORS = 10  # validation errors listed on a failed batch
READ_CHUNK = 1000  # ledger lines read at once while writing the result files


def line_key(batch_id: str, custom_id: str) -> str:
    """The Idempotency-Key of a line's job (visible ASCII, as the header must be)."""
    return f"{batch_id}/{hashlib.sha256(custom_id.encode()).hexdigest()}"


def line_keys(batch: BatchRecord, line: BatchRequestLine) -> list[str]:
    """The Idempotency-Keys of every job the line may have: its key, or for a completions line
    with a list of prompts one per prompt (completions.prompt_keys). A line the endpoint refuses
    as invalid made no job: its one key names none."""
    key = line_key(batch.id, line.custom_id)
    if batch.endpoint != "/v1/completions":
        return [key]
    try:
        prompts = len(CompletionRequest.model_validate(line.body).prompts)
    except ValidationError:
        return [key]
    return prompt_keys(key, prompts) if prompts > 1 else [key]


async def answer(
    services: Services,
    caller: ApiKey,
    batch: BatchRecord,
    line: BatchRequestLine,
    accepted: Callable[[Job], None] | None = None,
    freed: asyncio.Event | None = None,
) -> tuple[int, Any, str | None]:
    """The synchronous endpoint's answer to the line: (status, JSON body, the job's id if one ran).
    `accepted`: told of the line's job once it is accepted. `freed`: set when another line of the
    run ends; a line refused for want of spare capacity asks again then (or after TURN_S)."""
    key = line_key(batch.id, line.custom_id)
    while True:
        if freed is not None:
            freed.clear()  # set from here on: a slot came free since this attempt began
        try:
            response = await _call(services, caller, batch.endpoint, line.body, key, accepted)
            location = response.headers.get("location", "")
            return response.status_code, orjson.loads(response.body), location.rsplit("/", 1)[-1] or None
        except ValidationError as e:
            v = validation_error(e.errors())
            refusal = error_response(v.status, v.message, v.param)
        except OpenAIError as e:
            refusal = error_response(e.status, e.message, e.param, e.code)
        except RESTARTING:
            await asyncio.sleep(1)  # as the routes answer it: 503, Retry-After 1
            continue
        except Refused as e:
            if e.verdict is Verdict.NO_SPARE:
                if freed is None:
                    await asyncio.sleep(TURN_S)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(freed.wait(), TURN_S)
                continue
            await asyncio.sleep(float((e.headers or {}).get("Retry-After", 1)))
            continue
        except KeyConflict as e:  # a key of the line names no job yet, or another body
            await _unclaim(services, caller, batch, line, e.key, str(e.detail))
            continue
        except HTTPException as e:
            if e.status_code in PACING:
                await asyncio.sleep(float((e.headers or {}).get("Retry-After", 1)))
                continue
            refusal = from_http(e)
        return refusal.status_code, orjson.loads(refusal.body), None


async def _unclaim(
    services: Services, caller: ApiKey, batch: BatchRecord, line: BatchRequestLine, key: str, why: str
) -> None:
    """The line's `key` (a list of prompts has one per prompt) names no job, or was taken with
    another body. A claim younger than ABANDONED_S may be another run's acceptance under way (that
    run lost its lease a moment ago and has not yet stopped): its job is found at the next attempt.
    Older, the run that took it died before making the job: the key is freed and the line submitted
    again (its other prompts' jobs are found by their own keys)."""
    claimed = await idempotent_job_id(services, caller, key)
    if claimed is not None and not await forget_idempotency(services, caller, key, claimed, ABANDONED_S):
        await asyncio.sleep(TURN_S)
        return
    log.warning("batch %s, line %r: %s; submitting it again", batch.id, line.custom_id, why)


async def _call(
    services: Services,
    caller: ApiKey,
    endpoint: str,
    body: dict[str, Any],
    key: str,
    accepted: Callable[[Job], None] | None,
) -> Response:
    body = {"priority": Priority.BATCH.value, **body}
    if endpoint == "/v1/chat/completions":
        chat = ChatCompletionRequest.model_validate(body)
        _refuse_stream(chat.stream)
        return await chat_completion(chat, services, caller, idempotency_key=key, accepted=accepted)
    text = CompletionRequest.model_validate(body)
    _refuse_stream(text.stream)
    if len(text.prompts) > 1:  # a job each, under the keys line_keys names; a refusal part way that
        # sends the line again keeps the jobs accepted before it, found again then by their keys
        return await several_completions(text, services, caller, None, key, accepted, keep=_sent_again)
    return await text_completion(text, services, caller, idempotency_key=key, accepted=accepted)


def _sent_again(refusal: BaseException) -> bool:
    """Whether `answer` sends the line again after `refusal` (pacing, a key's claim, Redis
    restarting), or the run is stopping (the next run, or _stop_lines, takes the line's jobs on):
    then the jobs its list of prompts accepted so far are kept. Any other refusal is the line's
    answer, and they are cancelled, as the synchronous route cancels them."""
    if isinstance(refusal, (Refused, KeyConflict, asyncio.CancelledError, *RESTARTING)):
        return True
    return isinstance(refusal, HTTPException) and refusal.status_code in PACING


def _refuse_stream(stream: bool | None) -> None:
    if stream:
        raise OpenAIError(
            400, "stream is not supported in a batch: each answer is one line of a file", "stream"
        )


def _answered(custom_id: str, status: int, body: Any, request_id: str | None) -> bytes:
    response = {"status_code": status, "request_id": request_id, "body": body}
    return _line({"custom_id": custom_id, "response": response, "error": None})


def _not_run(custom_id: str, code: str, message: str) -> bytes:
    return _line({"custom_id": custom_id, "response": None, "error": {"code": code, "message": message}})


def _line(fields: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": f"batch_req_{uuid.uuid4().hex}", **fields})


async def _write(services: Services, batch: BatchRecord, custom_id: str, line: bytes, ok: bool) -> None:
    """The line into the ledger (again while Redis restarts, for up to a minute)."""
    await retrying(lambda: services.batches.write_line(batch.id, custom_id, line, ok))


# --- the run ------------------------------------------------------------------------------------


async def run(services: Services, caller: ApiKey, batch: BatchRecord, input_path: Path) -> None:
    """The batch from the status it is in (a run that died may have left it anywhere) to a
    terminal one. `input_path`: the batch's own link to its input (FileStore.pin)."""
    store = services.batches
    await store.clear_lines(batch.owner, batch.id)  # a dead run's lines in flight are this run's now
    with input_path.open("rb") as source:
        status = await store.status(batch.id)
        if status is S.VALIDATING:
            status = await _validate(services, batch, source)
        if status is S.CANCELLING and not await store.started(batch.id):  # cancelled while validating
            await _end(services, batch, S.CANCELLED)
            status = None
        if status in (S.IN_PROGRESS, S.CANCELLING):
            stop = await _run_lines(services, caller, batch, source)
            if stop is None:
                await store.move(batch.id, S.FINALIZING)  # or a cancel came as the last line ended
            status = S.FINALIZING if stop in (None, S.CANCELLING, S.EXPIRED) else None
        if status is S.FINALIZING:
            await _finish(services, batch, source)
    if (end := await store.status(batch.id)) is None or end.terminal:  # not when another run goes on
        services.files.unpin(batch.id)


async def _validate(services: Services, batch: BatchRecord, source: BinaryIO) -> BatchStatus | None:
    """validating → in_progress (→ its new status), or failed (→ None)."""
    store = services.batches
    errors: list[BatchError] = []
    n = 0
    for n, raw in enumerate(source, 1):
        url = BatchRequestLine.model_validate_json(raw).url  # the upload checked the rest
        if url != batch.endpoint and len(errors) < MAX_ERRORS:
            message = f"the line's url {url} is not the batch's endpoint {batch.endpoint}"
            errors.append(BatchError(code="invalid_url", message=message, param="url", line=n))
    source.seek(0)
    if errors:
        await store.set_results(batch.id, None, None, BatchErrors(data=errors))
        await _end(services, batch, S.FAILED)
        return None
    await store.set_total(batch.id, n)
    await store.move(batch.id, S.IN_PROGRESS)
    return await store.status(batch.id)


def _lines(source: BinaryIO, skip: set[str]) -> Iterator[BatchRequestLine]:
    source.seek(0)
    for raw in source:
        line = BatchRequestLine.model_validate_json(raw)
        if line.custom_id not in skip:
            yield line


async def _stopped(services: Services, batch: BatchRecord) -> BatchStatus | None:
    """None while the batch's lines may run. Else why not: CANCELLING (a cancel), EXPIRED (the
    window passed), or the status another run moved it to (finalizing or a terminal one; FAILED
    for a record that is gone): nothing is left to do then."""
    status = await retrying(lambda: services.batches.status(batch.id))
    if status is S.IN_PROGRESS:
        return S.EXPIRED if time.time() >= batch.expires_at else None
    return status or S.FAILED


async def _run_lines(
    services: Services, caller: ApiKey, batch: BatchRecord, source: BinaryIO
) -> BatchStatus | None:
    """Until every line is in the ledger: answered, or written as never run when the batch is
    cancelled or its window passes. → None when every line ran, else what _stopped said. A line
    whose answer was not written (Redis gone for longer than a write waits) is sent again on the
    next pass: its job is found again by its key."""
    store = services.batches
    while True:
        stop = await _stopped(services, batch)
        if stop is None:
            stop = await _pass(services, caller, batch, _lines(source, await store.written(batch.id)))
        if stop in (S.CANCELLING, S.EXPIRED):
            await _stop_lines(services, caller, batch, _lines(source, await store.written(batch.id)), stop)
        if stop is not None or not any(True for _ in _lines(source, await store.written(batch.id))):
            return stop


async def _pass(
    services: Services, caller: ApiKey, batch: BatchRecord, lines: Iterator[BatchRequestLine]
) -> BatchStatus | None:
    """`lines`, each when its turn comes (_take_line). → None when each ran; else what _stopped
    said (the lines in flight are left: their jobs run on, for _stop_lines or the run that takes
    over)."""
    store = services.batches
    room = asyncio.Semaphore(_key_limit(services, caller))  # the tasks here; Redis counts the key's
    running: set[asyncio.Task[None]] = set()
    freed = asyncio.Event()  # a line of this run ended: its slot is free for the next

    async def one(line: BatchRequestLine, admitted: asyncio.Event) -> None:
        try:
            status, body, request_id = await answer(
                services, caller, batch, line, lambda _: admitted.set(), freed
            )
            result, ok = _answered(line.custom_id, status, body, request_id), status == 200
        except Exception as e:  # a bug: the line fails, the batch goes on
            log.exception("batch %s, line %r", batch.id, line.custom_id)
            result, ok = _not_run(line.custom_id, "server_error", f"{type(e).__name__}: {e}"), False
        finally:
            room.release()
            freed.set()
            with contextlib.suppress(*RESTARTING):
                await store.line_done(batch.owner, batch.id)
        try:
            await _write(services, batch, line.custom_id, result, ok)
        except RESTARTING:
            log.warning("batch %s, line %r: not written (Redis gone); sent again", batch.id, line.custom_id)

    stop: BatchStatus | None = None
    watched = time.monotonic()
    try:
        for line in lines:
            while not await _acquire(room, WATCH_S) and not (stop := await _stopped(services, batch)):
                pass
            if stop is None and time.monotonic() - watched > WATCH_S:
                watched = time.monotonic()
                stop = await _stopped(services, batch)
            while stop is None and not await _take_line(services, caller, batch):
                await asyncio.sleep(TURN_S)
                if time.monotonic() - watched > WATCH_S:
                    watched = time.monotonic()
                    stop = await _stopped(services, batch)
            if stop is not None:
                break
            admitted = asyncio.Event()
            task = asyncio.create_task(one(line, admitted))
            running.add(task)
            task.add_done_callback(running.discard)
            # One line at a time through intake: a line waiting for spare capacity (the batch
            # tier, or backpressure) holds the next back, so a run asks admission once a turn.
            while stop is None and not await _admitted(admitted, task, WATCH_S):
                stop = await _stopped(services, batch)
        while running and stop is None:
            await asyncio.wait(set(running), timeout=WATCH_S)
            stop = await _stopped(services, batch) if running else None
    finally:  # stopped, or this run is (its process stops, its lease was lost)
        in_flight = set(running)
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        with contextlib.suppress(*RESTARTING):  # a task cancelled before it began never counted out
            await store.clear_lines(batch.owner, batch.id)
    return stop


def _key_limit(services: Services, caller: ApiKey) -> int:
    return caller.limits.batch_lines_in_flight or services.settings.batches.per_key_lines_in_flight


async def _take_line(services: Services, caller: ApiKey, batch: BatchRecord) -> bool:
    """Whether a line may go now (then it is counted in): the key has fewer in flight than it may."""
    most = _key_limit(services, caller)
    return bool(await retrying(lambda: services.batches.take_line(batch.owner, batch.id, most)))


async def _admitted(admitted: asyncio.Event, task: asyncio.Task[None], timeout: float) -> bool:
    """Waits up to `timeout` for the line's job to be accepted (or the line to end, refused)."""
    waiter = asyncio.ensure_future(admitted.wait())
    try:
        await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return admitted.is_set() or task.done()


async def _acquire(room: asyncio.Semaphore, timeout: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await room.acquire()
            return True
    return False


async def _stop_lines(
    services: Services,
    caller: ApiKey,
    batch: BatchRecord,
    lines: Iterator[BatchRequestLine],
    stop: BatchStatus,
) -> None:
    """Each of `lines` (not in the ledger) ends as never run; the jobs one of them had (this run's
    or a dead run's; a list of prompts, one each) are cancelled."""
    code = "batch_expired" if stop is S.EXPIRED else "batch_cancelled"  # stop: EXPIRED or CANCELLING
    why = "the batch's completion window passed" if stop is S.EXPIRED else "the batch was cancelled"
    for line in lines:
        for key in line_keys(batch, line):
            if (job_id := await idempotent_job_id(services, caller, key)) is not None:
                await services.store.cancel(job_id)
        result = _not_run(line.custom_id, code, f"not run: {why}")
        await _write(services, batch, line.custom_id, result, False)


# --- the result files -----------------------------------------------------------------------------


def result_file_id(batch_id: str, kind: str) -> str:
    """The id the batch's `kind` (output | error) file gets: the same in every run."""
    return f"file-{uuid.uuid5(uuid.NAMESPACE_URL, f'localmoe:{batch_id}:{kind}').hex}"


async def _finish(services: Services, batch: BatchRecord, source: BinaryIO) -> None:
    """The result files from the ledger, then the terminal status: completed from finalizing,
    cancelled from cancelling, expired from in_progress (a run the window stopped)."""
    store = services.batches
    ids = (result_file_id(batch.id, "output"), result_file_id(batch.id, "error"))
    run = uuid.uuid4().hex[:8]  # a run that lost its lease may still be writing its own
    parts = [services.files.incoming(f"{i}-{run}") for i in ids]
    try:
        with parts[0].open("wb") as output, parts[1].open("wb") as errors:
            custom_ids = (line.custom_id for line in _lines(source, set()))
            while chunk := list(itertools.islice(custom_ids, READ_CHUNK)):
                for custom_id, line in zip(chunk, await store.lines(batch.id, chunk), strict=True):
                    if line is None:  # cannot happen: every line is in the ledger by now
                        log.error("batch %s: line %r is not in the ledger", batch.id, custom_id)
                        continue
                    ok = (orjson.loads(line)["response"] or {}).get("status_code") == 200
                    (output if ok else errors).write(line.encode() + b"\n")
        kinds = zip(ids, parts, ("output", "error"), strict=True)
        kept = [await _keep(services, batch, file_id, part, kind) for file_id, part, kind in kinds]
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    await store.set_results(batch.id, kept[0], kept[1], None)
    ends = {S.FINALIZING: S.COMPLETED, S.CANCELLING: S.CANCELLED, S.IN_PROGRESS: S.EXPIRED}
    while (status := await store.status(batch.id)) in ends and not await _end(services, batch, ends[status]):
        pass  # a cancel came in between: from cancelling then


EVENTS = {
    S.COMPLETED: BatchEventType.COMPLETED,
    S.FAILED: BatchEventType.FAILED,
    S.EXPIRED: BatchEventType.EXPIRED,
    S.CANCELLED: BatchEventType.CANCELLED,
}


async def _end(services: Services, batch: BatchRecord, to: BatchStatus) -> bool:
    """The batch → the terminal status `to`, its webhook event (when it asked for this one)
    written with it and then sent. → whether it moved."""
    at = int(time.time())
    event = await _event(services, batch, to, at)
    if not await services.batches.move(batch.id, to, at, event):
        return False
    if event is not None:
        services.notifier.send(event, outboxed=True)
    return True


async def _event(services: Services, batch: BatchRecord, to: BatchStatus, at: int) -> Delivery | None:
    """The event of the batch's end: `data` is the Batch object as the move will leave it."""
    kind = EVENTS[to]
    if batch.webhook is None or batch.webhook_endpoint is None or kind not in batch.webhook.events:
        return None
    now = await services.batches.get(batch.owner, batch.id)
    if now is None:
        return None
    ended = now.model_copy(update={"status": to, f"{to.value}_at": at})
    return make_delivery(batch.webhook_endpoint, batch.id, kind, ended.model_dump(mode="json"))


async def _keep(services: Services, batch: BatchRecord, file_id: str, part: Path, kind: str) -> str | None:
    if part.stat().st_size == 0:
        return None
    ttl_s = services.settings.limits.file_ttl_s
    await services.files.add(file_id, batch.owner, f"{batch.id}_{kind}.jsonl", "batch_output", ttl_s, part)
    return file_id
