"""POST /v1/completions: text completion of one prompt, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api import sse
from api.auth import ApiKey, Caller
from api.deps import Services, ServicesDep
from api.openai.errors import ERRORS, OpenAIRoute
from api.openai.logprobs import completion_logprobs, token_texts
from api.openai.protocol import Completion, CompletionChoice, CompletionRequest, UsageInfo
from api.openai.serving import STREAMED, IdempotencyKey, accept_request, check_model, usage_so_far
from api.openai.streaming import sse_chunk, stream_job, wait_for_job
from scheduler.jobs import Job
from scheduler.stream import DoneEvent, TokenEvent

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


@router.post("/completions", response_model=Completion, responses={**STREAMED, **ERRORS})
async def completions(
    body: CompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Text completion of one prompt, whole or streamed (`stream: true`)."""
    return await text_completion(body, services, caller, request, idempotency_key)


async def text_completion(
    body: CompletionRequest,
    services: Services,
    caller: ApiKey,
    request: Request | None = None,
    idempotency_key: str | None = None,
    accepted: Callable[[Job], None] | None = None,
) -> Response:
    """The route's answer; without `request` (a batch's line) the job outlives a cancelled caller.
    `accepted`: told of the job once it is accepted (before its answer is waited for)."""
    model = check_model(body.model, services)
    body.refuse_unsupported()
    spec = body.job_spec(body.text, 16 if body.max_tokens is None else body.max_tokens)
    job = await accept_request(body, spec, caller, services, idempotency_key)
    if accepted is not None:
        accepted(job)
    rid, created = f"cmpl-{job.id}", int(time.time())

    def completion(text: str, finish_reason: str | None) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return Completion(id=rid, created=created, model=model, choices=[choice])

    texts = token_texts(services.counter.tokenizer)
    lead = body.text if body.echo else ""

    if not body.stream:
        result = await wait_for_job(request, services, job)
        answer = completion(lead + result.text, result.done.finish_reason)
        if body.logprobs is not None:
            answer.choices[0].logprobs, _ = completion_logprobs(result.logprobs, texts, len(lead))
        answer.usage = UsageInfo.of(result.done)
        return JSONResponse(answer.model_dump(), headers={"Location": f"/v1/jobs/{job.id}"})

    omit = None if body.include_usage else {"usage"}
    so_far = usage_so_far(job) if body.continuous_usage else None

    def finish(done: DoneEvent) -> bytes:
        end = completion("", done.finish_reason)
        if body.continuous_usage:
            end.usage = UsageInfo.of(done)
        last = sse_chunk(end, omit)
        if body.include_usage:  # a last chunk: no choices, the usage
            usage = UsageInfo.of(done)
            last += sse_chunk(Completion(id=rid, created=created, model=model, choices=[], usage=usage))
        return last

    template = sse.Template(completion(sse.MARK, None), omit)
    head = sse_chunk(completion(body.text, None), omit) if body.echo else b""
    offset = len(lead)

    def with_logprobs(event: TokenEvent, generated: int) -> bytes:
        nonlocal offset
        chunk = completion(event.text, None)
        chunk.choices[0].logprobs, offset = completion_logprobs(event.logprobs or [], texts, offset)
        if so_far is not None:
            chunk.usage = UsageInfo.counted(job.usage.prompt_tokens, generated)
        return sse_chunk(chunk, omit)

    logprobs = with_logprobs if body.logprobs is not None else None
    return stream_job(services, job, template, finish, head, usage=so_far, render=logprobs)
