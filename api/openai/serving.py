"""The OpenAI router: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api import sse
from api.auth import ApiKey, Caller
from api.deps import Services, ServicesDep
from api.jobs import accept
from api.openai.chat_template import render_chat
from api.openai.errors import ERRORS, OpenAIError, OpenAIRoute, validation_error
from api.openai.logprobs import chat_logprobs, completion_logprobs, token_texts
from api.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    UsageInfo,
)
from api.openai.streaming import sse_chunk, stream_job, wait_for_job
from scheduler.jobs import Job, JobSpec
from scheduler.stream import DoneEvent, TokenEvent

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


def served_model(services: Services) -> str:
    """The served model's name: its directory's."""
    return services.settings.resolved_model_dir.name


def _model_card(services: Services) -> ModelCard:
    model_dir = services.settings.resolved_model_dir
    created = int((model_dir / "config.json").stat().st_mtime) if (model_dir / "config.json").exists() else 0
    return ModelCard(id=model_dir.name, created=created)


def check_model(requested: str | None, services: Services) -> str:
    served = served_model(services)
    if requested is not None and requested != served:
        raise OpenAIError(
            404,
            f"The model `{requested}` does not exist; this server serves `{served}`.",
            "model",
            "model_not_found",
        )
    return served


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(services: ServicesDep, _caller: Caller) -> ModelList:
    """The one model this service runs."""
    return ModelList(data=[_model_card(services)])


@router.get("/models/{model}", response_model=ModelCard, responses=ERRORS)
async def get_model(model: str, services: ServicesDep, _caller: Caller) -> ModelCard:
    check_model(model, services)
    return _model_card(services)


async def _accept(
    body: SamplingRequest, spec: JobSpec, caller: ApiKey, services: Services, idempotency_key: str | None
) -> Job:
    """`api.jobs.accept`, its refusals naming this request's fields (max_completion_tokens...)."""
    try:
        job, _replayed = await accept(spec, caller, services, idempotency_key)
    except HTTPException as e:
        if e.status_code == 422 and isinstance(e.detail, list):
            raise validation_error(e.detail, body.renames()) from e
        raise
    return job


IdempotencyKey = Annotated[
    str | None, Header(description="Retry-safe submission: the same key and body give the same job.")
]


# --- /v1/completions ---------------------------------------------------------------------------


# With `stream: true` the answer is server-sent events: each `data:` a chunk object (OpenAI's
# `*.chunk` shapes), the last one the text `[DONE]`. The schema says "any": it is per event.
_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {}}}, "description": "The answer."}
}


@router.post("/completions", response_model=Completion, responses={**_STREAMED, **ERRORS})
async def completions(
    body: CompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Text completion of one prompt, whole or streamed (`stream: true`)."""
    model = check_model(body.model, services)
    body.refuse_unsupported()
    spec = body.job_spec(body.text, 16 if body.max_tokens is None else body.max_tokens)
    job = await _accept(body, spec, caller, services, idempotency_key)
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
    so_far = _usage_so_far(job) if body.continuous_usage else None

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
    return stream_job(services, job, template, finish, head, usage=so_far, with_logprobs=logprobs)


def _usage_so_far(job: Job) -> Callable[[int], bytes]:
    """vLLM's continuous usage: completion tokens so far → the usage JSON a chunk carries."""
    prompt = job.usage.prompt_tokens

    def usage(generated: int) -> bytes:
        return orjson.dumps(
            {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
        )

    return usage


# --- /v1/chat/completions ----------------------------------------------------------------------


def _default_max_tokens(services: Services, prompt: str) -> int:
    """No max_tokens: up to the rest of the context, within the server's limit (as vLLM)."""
    room = services.counter.max_context - services.counter.count(prompt)
    return max(1, min(services.settings.limits.max_tokens, room))


@router.post("/chat/completions", response_model=ChatCompletion, responses={**_STREAMED, **ERRORS})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """The assistant's next message, whole or streamed (`stream: true`). The prompt is the
    model's chat template applied to `messages`, or ChatML when the model has none."""
    model = check_model(body.model, services)
    body.refuse_unsupported()
    prompt, implied_stop = await render_chat(services.settings.resolved_model_dir, body.messages)
    max_tokens = body.requested_max_tokens
    spec = body.job_spec(prompt, max_tokens or _default_max_tokens(services, prompt), implied_stop)
    job = await _accept(body, spec, caller, services, idempotency_key)
    rid, created = f"chatcmpl-{job.id}", int(time.time())

    texts = token_texts(services.counter.tokenizer)
    wants_logprobs = body.requested_logprobs is not None

    if not body.stream:
        result = await wait_for_job(request, services, job)
        done = result.done
        choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=done.finish_reason)
        if wants_logprobs:
            choice.logprobs = chat_logprobs(result.logprobs, texts)
        answer = ChatCompletion(
            id=rid, created=created, model=model, choices=[choice], usage=UsageInfo.of(done)
        )
        return JSONResponse(answer.model_dump(), headers={"Location": f"/v1/jobs/{job.id}"})

    omit = None if body.include_usage else {"usage"}
    so_far = _usage_so_far(job) if body.continuous_usage else None

    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    def finish(done: DoneEvent) -> bytes:
        end = chunk(ChatDelta(), done.finish_reason)
        if body.continuous_usage:
            end.usage = UsageInfo.of(done)
        last = sse_chunk(end, omit)
        if body.include_usage:  # a last chunk: no choices, the usage
            usage = UsageInfo.of(done)
            end = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
            last += sse_chunk(end)
        return last

    first = chunk(ChatDelta(role="assistant", content=""))
    if so_far is not None:
        first.usage = UsageInfo.counted(job.usage.prompt_tokens, 0)
    head = sse_chunk(first, omit)
    template = sse.Template(chunk(ChatDelta(content=sse.MARK)), omit)

    def with_logprobs(event: TokenEvent, generated: int) -> bytes:
        piece = chunk(ChatDelta(content=event.text))
        piece.choices[0].logprobs = chat_logprobs(event.logprobs or [], texts)
        if so_far is not None:
            piece.usage = UsageInfo.counted(job.usage.prompt_tokens, generated)
        return sse_chunk(piece, omit)

    logprobs = with_logprobs if wants_logprobs else None
    return stream_job(services, job, template, finish, head, usage=so_far, with_logprobs=logprobs)
