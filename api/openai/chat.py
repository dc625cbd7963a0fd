"""POST /v1/chat/completions: the assistant's next message (text, tool calls, a reasoning model's
reasoning), whole or streamed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api import sse
from api.auth import ApiKey, Caller
from api.deps import Services, ServicesDep
from api.openai.answer import AnswerFormat
from api.openai.chat_template import render_chat
from api.openai.errors import ERRORS, OpenAIError, OpenAIRoute
from api.openai.logprobs import chat_logprobs, prompt_logprobs, token_texts
from api.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    UsageInfo,
)
from api.openai.reasoning import Call, Piece
from api.openai.serving import STREAMED, IdempotencyKey, accept_request, check_model, usage_so_far
from api.openai.streaming import Choices, sse_chunk, stream_job, wait_for_job
from moe_core import structured
from scheduler.jobs import Job
from scheduler.stream import DoneEvent, TokenEvent
from scheduler.structured import StructuredOutputs

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


def _default_max_tokens(services: Services, prompt: str) -> int:
    """No max_tokens: up to the rest of the context, within the server's limit (as vLLM)."""
    room = services.counter.max_context - services.counter.count(prompt)
    return max(1, min(services.settings.limits.max_tokens, room))


@router.post("/chat/completions", response_model=ChatCompletion, responses={**STREAMED, **ERRORS})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """The assistant's next message, whole or streamed (`stream: true`). The prompt is the
    model's chat template applied to `messages` (and `tools`), or ChatML when the model has none.
    With tools, calls the model writes come back as `tool_calls` (api/openai/tools.py); a
    reasoning model's thinking as `reasoning` (api/openai/reasoning.py)."""
    return await chat_completion(body, services, caller, request, idempotency_key)


async def chat_completion(
    body: ChatCompletionRequest,
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
    tools = body.offered_tools
    for i, tool in enumerate(tools):  # a schema no engine could decode under is bad input
        params = tool.function.parameters
        if params is not None and (error := structured.check("json", json.dumps(params))):
            raise OpenAIError(400, f"the function's parameters schema cannot be used: {error}", f"tools.{i}")
    model_dir = services.settings.resolved_model_dir
    rendered = await render_chat(
        model_dir,
        body.messages,
        body.add_generation_prompt,
        tools,
        body.template_variables,
        body.continue_final_message,
    )
    prompt, calls_format = rendered.prompt, rendered.calls
    keep_special = calls_format.body == "harmony" or (
        bool(tools) and calls_format.marked_by(services.counter.special_tokens)
    )  # the format's markers are special tokens of this model: their text must reach the parser
    calls_format = calls_format.bound([(t.function.name, t.function.parameters) for t in tools])
    parallel = body.parallel_tool_calls is not False
    forced = [(t.function.name, t.function.parameters) for t in body.forced_tools]
    if forced:  # the calls are JSON under a grammar, whatever the model's own format
        calls_format = calls_format.forced()
    structure = StructuredOutputs(grammar=calls_format.grammar(forced, parallel)) if forced else None
    max_tokens = body.requested_max_tokens or _default_max_tokens(services, prompt)
    spec = body.job_spec(prompt, max_tokens, rendered.stop, structure)
    # a harmony model's answer is channels, a thinking model's opens with its reasoning: split
    # them even without tools. Constrained decoding holds here from the first token (vLLM with a
    # reasoning parser starts it after the reasoning), so a constrained answer has no reasoning.
    think = rendered.think and spec.constraint is None
    answer = AnswerFormat(calls_format, bool(tools), think, think and rendered.inside_think, parallel)
    split, reasoned = answer.splits, body.include_reasoning
    if keep_special:
        spec.skip_special_tokens = False
    job = await accept_request(body, spec, caller, services, idempotency_key)
    if accepted is not None:
        accepted(job)
    rid, created = f"chatcmpl-{job.id}", int(time.time())
    n, prompt_tokens = spec.n, job.usage.prompt_tokens

    texts = token_texts(services.counter.tokenizer)
    wants_logprobs = body.requested_logprobs is not None
    last = body.messages[-1]  # echo: the answer leads with an assistant message it continues
    lead = last.text if body.echo and last.role == "assistant" else ""

    def tool_calls(calls: list[Call], first: int, choice: int) -> list[ToolCall]:
        return [
            ToolCall(
                id=_call_id(job.id, first + i, choice),
                function=ToolCallFunction(name=name, arguments=arguments),
            )
            for i, (name, arguments) in enumerate(calls)
        ]

    def finish_reason(reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" else reason

    if not body.stream:
        result = await wait_for_job(request, services, job)
        whole = ChatCompletion(
            id=rid, created=created, model=model, choices=[], usage=UsageInfo.of(result.done)
        )
        if spec.prompt_logprobs is not None and (scored := await services.store.prompt_logprobs(job.id)):
            whole.prompt_logprobs = prompt_logprobs(scored, texts)
        for k, out in enumerate(result.outputs):
            piece = answer.parse(out.text) if split else Piece(content=out.text)
            content, calls = lead + piece.content, piece.calls
            message = AssistantMessage(
                content=(content or None) if calls else content,
                tool_calls=tool_calls(calls, 0, k),
                reasoning=(piece.reasoning or None) if reasoned else None,
            )
            choice = ChatChoice(
                index=k, message=message, finish_reason=finish_reason(out.finish_reason, bool(calls))
            )
            if wants_logprobs:
                choice.logprobs = chat_logprobs(out.logprobs, texts)
            whole.choices.append(choice)
        return JSONResponse(whole.model_dump(), headers={"Location": f"/v1/jobs/{job.id}"})

    omit = None if body.include_usage else {"usage"}
    so_far = usage_so_far(job) if body.continuous_usage else None
    # per choice: its answer split so far (the calls it made)
    answers = [answer.stream() for _ in range(n)] if split else None

    def chunk(delta: ChatDelta, finish_reason: str | None = None, index: int = 0) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    def piece_chunks(piece: Piece, index: int) -> bytes:
        """What a piece of choice `index` adds: its reasoning, its content, then the calls it
        completed (whole)."""
        assert answers is not None
        calls = piece.calls
        first = len(answers[index].calls) - len(calls)  # calls given out before these
        out = b""
        if piece.reasoning and reasoned:
            out += sse_chunk(chunk(ChatDelta(reasoning=piece.reasoning), index=index), omit)
        if piece.content:
            out += sse_chunk(chunk(ChatDelta(content=piece.content), index=index), omit)
        if calls:
            deltas = [
                ToolCallDelta(index=first + i, id=c.id, function=c.function)
                for i, c in enumerate(tool_calls(calls, first, index))
            ]
            out += sse_chunk(chunk(ChatDelta(tool_calls=deltas), index=index), omit)
        return out

    def end(index: int, reason: str | None, usage: UsageInfo) -> bytes:
        """The chunks that end choice `index`: calls still held back, then its finish reason."""
        last = piece_chunks(answers[index].flush(), index) if answers is not None else b""
        called = bool(answers and answers[index].calls)
        closing = chunk(ChatDelta(), finish_reason(reason, called), index)
        if body.continuous_usage:
            closing.usage = usage
        return last + sse_chunk(closing, omit)

    def finish(done: DoneEvent) -> bytes:
        unended = choices.unended if choices is not None else {0}
        last = b"".join(end(k, done.finish_reason, UsageInfo.of(done)) for k in sorted(unended))
        if body.include_usage:  # a last chunk: no choices, the usage
            usage = UsageInfo.of(done)
            closing = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
            last += sse_chunk(closing)
        return last

    head = b""
    for k in range(n):  # each choice opens with the role
        first = chunk(ChatDelta(role="assistant", content=""), index=k)
        if so_far is not None:
            first.usage = UsageInfo.counted(prompt_tokens, 0)
        head += sse_chunk(first, omit)
        if lead:
            head += sse_chunk(chunk(ChatDelta(content=lead), index=k), omit)
    templates = [sse.Template(chunk(ChatDelta(content=sse.MARK), index=k), omit) for k in range(n)]

    def with_logprobs(event: TokenEvent, generated: int) -> bytes:
        piece = chunk(ChatDelta(content=event.text), index=event.index)
        piece.choices[0].logprobs = chat_logprobs(event.logprobs or [], texts)
        if so_far is not None:
            piece.usage = UsageInfo.counted(prompt_tokens, generated)
        return sse_chunk(piece, omit)

    def with_split(event: TokenEvent, generated: int) -> bytes:
        assert answers is not None
        k = event.index
        piece = answers[k].feed(event.text)
        if wants_logprobs or so_far is not None:  # the event's chunk carries them, content or not
            reasoning = (piece.reasoning or None) if reasoned else None
            carrier = chunk(ChatDelta(content=piece.content, reasoning=reasoning), index=k)
            if wants_logprobs:
                carrier.choices[0].logprobs = chat_logprobs(event.logprobs or [], texts)
            if so_far is not None:
                carrier.usage = UsageInfo.counted(prompt_tokens, generated)
            return sse_chunk(carrier, omit) + piece_chunks(Piece(calls=piece.calls), k)
        return piece_chunks(piece, k)

    render = with_split if split else with_logprobs if wants_logprobs else None
    choices = Choices(templates, end, prompt_tokens, so_far, render) if n > 1 else None
    return stream_job(services, job, templates[0], finish, head, usage=so_far, render=choices or render)


def _call_id(job_id: str, index: int, choice: int = 0) -> str:
    """A call's id: the same each time the job's answer is read (a replay, a reconnect); unique
    among the choices of a job with n > 1."""
    return f"call_{job_id[:20]}_{index}" if choice == 0 else f"call_{job_id[:20]}_{choice}_{index}"
