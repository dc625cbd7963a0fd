"""The OpenAI router: /v1/models, /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
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
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    UsageInfo,
)
from api.openai.streaming import sse_chunk, stream_job, wait_for_job
from api.openai.tools import Call, ToolStream
from moe_core import structured
from scheduler.jobs import Job, JobSpec
from scheduler.stream import DoneEvent, TokenEvent
from scheduler.structured import StructuredOutputs

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
    return stream_job(services, job, template, finish, head, usage=so_far, render=logprobs)


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
    model's chat template applied to `messages` (and `tools`), or ChatML when the model has none.
    With tools, calls the model writes come back as `tool_calls` (api/openai/tools.py)."""
    model = check_model(body.model, services)
    body.refuse_unsupported()
    tools = body.offered_tools
    for i, tool in enumerate(tools):  # a schema no engine could decode under is bad input
        params = tool.function.parameters
        if params is not None and (error := structured.check("json", json.dumps(params))):
            raise OpenAIError(400, f"the function's parameters schema cannot be used: {error}", f"tools.{i}")
    model_dir = services.settings.resolved_model_dir
    prompt, implied_stop, calls_format = await render_chat(model_dir, body.messages, tools=tools)
    parallel = body.parallel_tool_calls is not False
    forced = [(t.function.name, t.function.parameters) for t in body.forced_tools]
    structure = StructuredOutputs(grammar=calls_format.grammar(forced, parallel)) if forced else None
    max_tokens = body.requested_max_tokens or _default_max_tokens(services, prompt)
    spec = body.job_spec(prompt, max_tokens, implied_stop, structure)
    job = await _accept(body, spec, caller, services, idempotency_key)
    rid, created = f"chatcmpl-{job.id}", int(time.time())

    texts = token_texts(services.counter.tokenizer)
    wants_logprobs = body.requested_logprobs is not None

    def tool_calls(calls: list[Call], first: int) -> list[ToolCall]:
        return [
            ToolCall(
                id=_call_id(job.id, first + i), function=ToolCallFunction(name=name, arguments=arguments)
            )
            for i, (name, arguments) in enumerate(calls)
        ]

    def finish_reason(done: DoneEvent, called: bool) -> str | None:
        return "tool_calls" if called and done.finish_reason == "stop" else done.finish_reason

    if not body.stream:
        result = await wait_for_job(request, services, job)
        done = result.done
        content, calls = calls_format.parse(result.text) if tools else (result.text, [])
        calls = calls if parallel else calls[:1]
        message = AssistantMessage(
            content=(content or None) if calls else content, tool_calls=tool_calls(calls, 0)
        )
        choice = ChatChoice(message=message, finish_reason=finish_reason(done, bool(calls)))
        if wants_logprobs:
            choice.logprobs = chat_logprobs(result.logprobs, texts)
        answer = ChatCompletion(
            id=rid, created=created, model=model, choices=[choice], usage=UsageInfo.of(done)
        )
        return JSONResponse(answer.model_dump(), headers={"Location": f"/v1/jobs/{job.id}"})

    omit = None if body.include_usage else {"usage"}
    so_far = _usage_so_far(job) if body.continuous_usage else None
    calls_seen = ToolStream(calls_format) if tools else None

    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    def calls_chunk(content: str, calls: list[Call]) -> bytes:
        """What a piece of the answer adds: its content, then the calls it completed (whole)."""
        assert calls_seen is not None
        if not parallel:
            calls = calls[: max(0, 1 - (len(calls_seen.calls) - len(calls)))]
        out = sse_chunk(chunk(ChatDelta(content=content)), omit) if content else b""
        if calls:
            first = len(calls_seen.calls) - len(calls)
            deltas = [
                ToolCallDelta(index=first + i, id=c.id, function=c.function)
                for i, c in enumerate(tool_calls(calls, first))
            ]
            out += sse_chunk(chunk(ChatDelta(tool_calls=deltas)), omit)
        return out

    def finish(done: DoneEvent) -> bytes:
        last = calls_chunk(*calls_seen.flush()) if calls_seen is not None else b""
        end = chunk(ChatDelta(), finish_reason(done, bool(calls_seen and calls_seen.calls)))
        if body.continuous_usage:
            end.usage = UsageInfo.of(done)
        last += sse_chunk(end, omit)
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

    def with_tools(event: TokenEvent, generated: int) -> bytes:
        assert calls_seen is not None
        content, calls = calls_seen.feed(event.text)
        if wants_logprobs or so_far is not None:  # the event's chunk carries them, content or not
            piece = chunk(ChatDelta(content=content))
            if wants_logprobs:
                piece.choices[0].logprobs = chat_logprobs(event.logprobs or [], texts)
            if so_far is not None:
                piece.usage = UsageInfo.counted(job.usage.prompt_tokens, generated)
            return sse_chunk(piece, omit) + calls_chunk("", calls)
        return calls_chunk(content, calls)

    render = with_tools if tools else with_logprobs if wants_logprobs else None
    return stream_job(services, job, template, finish, head, usage=so_far, render=render)


def _call_id(job_id: str, index: int) -> str:
    """A call's id: the same each time the job's answer is read (a replay, a reconnect)."""
    return f"call_{job_id[:20]}_{index}"
