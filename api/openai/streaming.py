"""A job's answer for an OpenAI route: waited for whole, or relayed from its Redis stream as
OpenAI's server-sent chunks. A client that goes away before the end cancels its job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api import sse
from api.deps import Services
from api.openai.errors import ErrorInfo, ErrorResponse, OpenAIError
from api.openai.protocol import UsageInfo
from scheduler.jobs import Job, JobStatus
from scheduler.stream import DoneEvent, SequenceToken, TokenEvent

# --- waiting for a job, and noticing a client that left --------------------------------------------


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel(services: Services, job_id: str) -> None:
    with anyio.CancelScope(shield=True):  # runs even while this request is being cancelled
        await services.store.cancel(job_id)


@dataclass
class Output:
    """One sequence's answer (a choice)."""

    text: str
    logprobs: list[Any]  # per token [id, logprob, [[id, logprob], ...]], when the job asked
    finish_reason: str | None


@dataclass
class Answer:
    done: DoneEvent
    outputs: list[Output]  # per sequence: spec.n of them


async def _collect(services: Services, job: Job) -> Answer:
    n = job.spec.n
    pieces: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[Any]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n  # a sequence's end, before the job's (n > 1)
    async for _, event in services.store.events(job.id):
        if isinstance(event, SequenceToken):
            k = event.index
            pieces[k].append(event.text)
            logprobs[k] += event.logprobs or ()
            reasons[k] = event.finish_reason or reasons[k]
        elif isinstance(event, TokenEvent):  # a job of one sequence
            pieces[0].append(event.text)
            logprobs[0] += event.logprobs or ()
        else:
            outputs = [
                Output("".join(p), lps, reason or event.finish_reason)
                for p, lps, reason in zip(pieces, logprobs, reasons, strict=True)
            ]
            return Answer(event, outputs)
    raise OpenAIError(500, f"job {job.id} expired before it finished")


async def wait_for_job(request: Request | None, services: Services, job: Job) -> Answer:
    """The job's whole text and logprobs per sequence, and its done event. A client that
    disconnects first cancels it. Without a request (a batch's line) the job outlives its waiter:
    a batch run that stops leaves its lines' jobs running for the run that takes the batch over
    (it finds them again by their Idempotency-Key), and cancels them itself when the batch is
    cancelled."""
    return (await wait_for_jobs(request, services, [job]))[0]


async def wait_for_jobs(request: Request | None, services: Services, jobs: list[Job]) -> list[Answer]:
    """wait_for_job for several jobs of one request (a list of prompts): a client that disconnects
    first cancels every one of them."""
    if request is None:
        return [_unless_failed(a) for a in await asyncio.gather(*(_collect(services, j) for j in jobs))]
    result: asyncio.Future[list[Answer]] = asyncio.ensure_future(
        asyncio.gather(*(_collect(services, j) for j in jobs))
    )
    watcher: asyncio.Future[Any] = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        finished = result.done()
        if not finished:  # the client left (or this request was cancelled)
            result.cancel()
            for job in jobs:
                await _cancel(services, job.id)
    if not finished:  # no one will read this answer
        raise OpenAIError(499, "the client disconnected; its job was cancelled")
    return [_unless_failed(a) for a in result.result()]


def _unless_failed(answer: Answer) -> Answer:
    if answer.done.status is JobStatus.FAILED:
        raise OpenAIError(500, f"generation failed: {answer.done.error or 'unknown error'}")
    return answer


def sse_chunk(payload: BaseModel, exclude: set[str] | None = None) -> bytes:
    return sse.data(payload.model_dump_json(exclude=exclude))


def _stream_error(done: DoneEvent) -> bytes:
    info = ErrorInfo(message=f"generation failed: {done.error or 'unknown error'}", type="server_error")
    return sse_chunk(ErrorResponse(error=info))


@dataclass
class JobRelay:
    """What turns one job's stream into OpenAI chunks (stream_job's arguments): `head` first,
    `token.fill(text)` per piece of text, `finish(done)` for the end (an error event if the job
    failed). With `usage` (completion tokens so far → usage JSON), every token chunk carries it.
    With `render` (logprobs, tool calls, n > 1), it renders each token event's chunk(s) instead,
    given the tokens so far (of every sequence), text or not, and a sequence's last event (b"":
    nothing). With `head_after`, what it makes is the head, made once the stream has its first
    entries (before them)."""

    job: Job
    token: sse.Template
    finish: Callable[[DoneEvent], bytes]
    head: bytes = b""
    usage: Callable[[int], bytes] | None = None
    render: Callable[[TokenEvent, int], bytes] | None = None
    head_after: Callable[[], Awaitable[bytes]] | None = None
    done: DoneEvent | None = None  # the job's done event, once relayed

    @property
    def failed(self) -> bool:
        return self.done is not None and self.done.status is JobStatus.FAILED


async def _chunks(services: Services, relay: JobRelay, last: bytes, cancel: bool) -> AsyncIterator[bytes]:
    """The job's chunks, those of one read of its stream joined (one send); `last` follows the
    finish (or the error event) in the final one. Returns after it: `relay.done` is set. With
    `cancel`, a consumer that stops first (Starlette cancels the generator on a disconnect, or
    closes it) cancels the job."""
    generated = 0
    token, usage, render = relay.token, relay.usage, relay.render
    try:
        if relay.head:
            yield relay.head
        late_head = relay.head_after
        async for batch in services.store.event_batches(relay.job.id):
            out = []
            if late_head is not None:
                out.append(await late_head())
                late_head = None
            for _, event in batch:
                if isinstance(event, TokenEvent):
                    generated += event.tokens
                    if render is not None:
                        if event.text or event.logprobs or event.finish_reason is not None:
                            out.append(render(event, generated))
                        continue
                    if not event.text:
                        continue
                    if usage is None:
                        out.append(token.fill(event.text))
                    else:
                        out.append(token.fill_usage(event.text, usage(generated)))
                else:  # the done event: always the stream's last
                    relay.done = event
                    out += [_stream_error(event) if relay.failed else relay.finish(event), last]
            if out:
                yield b"".join(out)
            if relay.done is not None:
                return
    finally:  # CancelledError (a disconnect) or GeneratorExit (closed unfinished)
        if cancel and relay.done is None:
            await _cancel(services, relay.job.id)


def stream_job(
    services: Services,
    job: Job,
    token: sse.Template,
    finish: Callable[[DoneEvent], bytes],
    head: bytes = b"",
    usage: Callable[[int], bytes] | None = None,
    render: Callable[[TokenEvent, int], bytes] | None = None,
    head_after: Callable[[], Awaitable[bytes]] | None = None,
) -> StreamingResponse:
    """Relays the job's stream as OpenAI chunks (JobRelay says how), then `data: [DONE]`."""
    return stream_relay(services, JobRelay(job, token, finish, head, usage, render, head_after))


def stream_relay(services: Services, relay: JobRelay) -> StreamingResponse:
    """stream_job, of a relay made already. A client that disconnects first cancels the job."""
    body = _chunks(services, relay, sse.DONE, cancel=True)
    return sse.response(body, headers={"Location": f"/v1/jobs/{relay.job.id}"})


def stream_jobs(services: Services, relays: list[JobRelay], tail: Callable[[], bytes]) -> StreamingResponse:
    """Several jobs of one request (a list of prompts) relayed as one stream, each read of a job's
    stream sent as it comes (the jobs' chunks interleave; each job's keep their order), `tail()`
    once every job is done, then `data: [DONE]`. A job that fails ends the stream with its error
    event and cancels the others; a client that disconnects first cancels every unfinished one."""

    async def body() -> AsyncIterator[bytes]:
        reads: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

        async def pump(relay: JobRelay) -> None:
            try:
                async for out in _chunks(services, relay, b"", cancel=False):
                    await reads.put(out)
            except Exception as e:  # to the reader, which raises it
                await reads.put(e)
            await reads.put(None)  # this job is done

        tasks = [asyncio.ensure_future(pump(relay)) for relay in relays]
        try:
            running = len(tasks)
            while running:
                out = await reads.get()
                if out is None:
                    running -= 1
                    continue
                if isinstance(out, BaseException):
                    raise out
                yield out
                if any(relay.failed for relay in relays):
                    yield sse.DONE
                    return
            yield tail() + sse.DONE
        finally:
            for task in tasks:
                task.cancel()
            for relay in relays:
                if relay.done is None:
                    await _cancel(services, relay.job.id)

    return sse.response(body(), headers={"Location": f"/v1/jobs/{relays[0].job.id}"})


class Choices:
    """`stream_job`'s render for a job with n > 1: a choice per sequence. Each token event's chunks
    are `render`'s (None: its text in its choice's template, with the usage so far as `usage`
    makes it); a sequence's last event adds `end(index, finish_reason, usage so far)`, the chunk
    that ends its choice. At the job's done event, `unended` are the choices still to end (all of
    them for a job cancelled before it ran)."""

    def __init__(
        self,
        templates: list[sse.Template],
        end: Callable[[int, str | None, UsageInfo], bytes],
        prompt_tokens: int,
        usage: Callable[[int], bytes] | None = None,
        render: Callable[[TokenEvent, int], bytes] | None = None,
    ) -> None:
        self.templates, self.end, self.prompt_tokens = templates, end, prompt_tokens
        self.usage, self.render = usage, render
        self.unended = set(range(len(templates)))

    def __call__(self, event: TokenEvent, generated: int) -> bytes:
        out = b""
        if self.render is not None:
            if event.text or event.logprobs:
                out = self.render(event, generated)
        elif event.text:
            template, usage = self.templates[event.index], self.usage
            text = event.text
            out = template.fill(text) if usage is None else template.fill_usage(text, usage(generated))
        if event.finish_reason is not None:
            self.unended.discard(event.index)
            so_far = UsageInfo.counted(self.prompt_tokens, generated)
            out += self.end(event.index, event.finish_reason, so_far)
        return out
