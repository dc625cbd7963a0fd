"""OpenAI-compatible endpoints: /v1/models, /v1/completions and /v1/chat/completions.

Every request becomes an ordinary job through `api.jobs.accept` (validation, admission, routing,
the Celery queue), so priority, backpressure and cancel work as for /v1/jobs. The answer is read
from the job's Redis stream: waited for whole, or relayed as OpenAI's server-sent chunks. A client
that goes away before the end cancels its job.

Behaviour follows vLLM's OpenAI server. Differences from OpenAI, each refused with a 400 rather
than silently ignored: one choice only (n=1), one prompt per request, no logprobs / echo / suffix
/ best_of / logit_bias / penalties / tools, and text-only message content. Extensions: `top_k`,
`priority`, `modality` and `ignore_eos`. Errors are `{"error": {message, type, param, code}}`;
bad input is a 400 (as with OpenAI), a 429 keeps its Retry-After.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from api import sse
from api.auth import ApiKey, Caller
from api.deps import Services, ServicesDep
from api.jobs import accept
from api.protocol import refusals
from scheduler.jobs import Job, JobSpec, JobStatus, Modality, Priority
from scheduler.stream import DoneEvent, TokenEvent

# --- errors: OpenAI's shape on every route of this router -----------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class OpenAIError(Exception):
    """A refusal to answer as `{"error": ...}` with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def _error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    info = ErrorInfo(message=message, type=_error_type(status), param=param, code=code or _CODES.get(status))
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def _param(loc: Sequence[Any], renames: dict[str, str] | None = None) -> str | None:
    """("body", "messages", 0, "role") → "messages.0.role"; the request's own names for a JobSpec's."""
    parts = [str(p) for p in loc if p != "body"]
    if parts and renames:
        parts[0] = renames.get(parts[0], parts[0])
    return ".".join(parts) or None


def _validation_error(errors: Sequence[Any], renames: dict[str, str] | None = None) -> OpenAIError:
    """Pydantic's errors (never echoing the input: it may be huge or not encodable) → one 400."""
    params = [_param(e.get("loc", ()), renames) for e in errors]
    message = "; ".join(
        f"{p}: {e.get('msg', '')}" if p else str(e.get("msg", ""))
        for p, e in zip(params, errors, strict=True)
    )
    return OpenAIError(400, message or "invalid request", params[0] if params else None)


def _from_http(exc: HTTPException) -> JSONResponse:
    """The shared intake's and the auth dependency's refusals. Its 422s (over a limit, over the
    context) are bad input here: 400, as OpenAI and vLLM answer them."""
    status = 400 if exc.status_code == 422 else exc.status_code
    detail = exc.detail
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        e = _validation_error(detail)
        return error_response(status, e.message, e.param, headers=exc.headers)
    return error_response(status, str(detail), headers=exc.headers)


class OpenAIRoute(APIRoute):
    """Answers every failure of its route (auth, validation, intake) in OpenAI's error format,
    leaving the app's handlers, and so every other route, as they are."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as e:
                return error_response(e.status, e.message, e.param, e.code)
            except RequestValidationError as e:
                v = _validation_error(e.errors())
                return error_response(v.status, v.message, v.param)
            except HTTPException as e:
                return _from_http(e)

        return route


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    **refusals(413),  # BodyGuard answers before the route: FastAPI's shape
    **{
        s: {"model": ErrorResponse, "description": d}
        for s, d in [
            (400, "Bad input, or an option this server does not support."),
            (401, "No or a bad API key."),
            (404, "Another model than the one served."),
            (409, "The Idempotency-Key was used with another body."),
            (429, "Rate limit or backlog full; see Retry-After."),
            (503, "The job queue is unavailable; try again."),
        ]
    },
}


# --- models ------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "localmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def served_model(services: Services) -> str:
    """The served model's name: its directory's."""
    return services.settings.resolved_model_dir.name


def _model_card(services: Services) -> ModelCard:
    model_dir = services.settings.resolved_model_dir
    created = int((model_dir / "config.json").stat().st_mtime) if (model_dir / "config.json").exists() else 0
    return ModelCard(id=model_dir.name, created=created)


def _check_model(requested: str | None, services: Services) -> str:
    served = served_model(services)
    if requested is not None and requested != served:
        raise OpenAIError(
            404,
            f"The model `{requested}` does not exist; this server serves `{served}`.",
            "model",
            "model_not_found",
        )
    return served


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(services: ServicesDep, _caller: Caller) -> ModelList:
    """The one model this service runs."""
    return ModelList(data=[_model_card(services)])


@router.get("/models/{model}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model: str, services: ServicesDep, _caller: Caller) -> ModelCard:
    _check_model(model, services)
    return _model_card(services)


# --- requests ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with the usage before [DONE].")


class SamplingRequest(BaseModel):
    """What both endpoints take. Unknown fields are refused (400), as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name (GET /v1/models); may be left out.")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Default 1.0, as OpenAI; 0 is greedy."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.0 (off).")
    n: int | None = Field(None, description="Choices per request: only 1 is supported.")
    stop: str | list[str] | None = Field(
        None, description="Up to 8 strings that end generation (not returned)."
    )
    seed: int | None = Field(None, description="Makes sampling reproducible (0 ≤ seed < 2**63).")
    stream: bool | None = Field(False, description="Server-sent chunks, ended by `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    presence_penalty: float | None = Field(None, description="Not supported: only 0.")
    frequency_penalty: float | None = Field(None, description="Not supported: only 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: only empty.")
    # extensions, as in vLLM
    top_k: int | None = Field(
        None, ge=-1, description="Extension: sample among the k likeliest; 0 or -1 is off."
    )
    ignore_eos: bool = Field(False, description="Extension: generate exactly max_tokens tokens.")
    priority: Priority | None = Field(None, description="Extension: high, normal or low (capped per key).")
    modality: Modality | None = Field(None, description="Extension: text, code or mixed; detected if absent.")

    def refuse_unsupported(self) -> None:
        """400 for options that would change the result and that this server cannot honour."""
        if self.n not in (None, 1):
            raise OpenAIError(400, f"n={self.n} is not supported: this server returns one choice (n=1)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported: leave it out or send 0", name)
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported: leave it out or send {}", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed when stream is true", "stream_options")

    def job_spec(self, prompt: str, max_tokens: int, extra_stop: Sequence[str] = ()) -> JobSpec:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stop += [s for s in extra_stop if s not in stop and len(stop) < 8]
        try:
            return JobSpec(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=max(self.top_k or 0, 0),
                seed=self.seed,
                stop=stop,
                modality=self.modality,
                ignore_eos=self.ignore_eos,
                priority=self.priority or Priority.NORMAL,
            )
        except ValidationError as e:
            raise _validation_error(e.errors(), self.renames()) from e

    def renames(self) -> dict[str, str]:
        return {}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="The text to continue: a string, or a list of exactly one.")
    max_tokens: int | None = Field(16, description="Most tokens to generate; default 16, as OpenAI.")
    logprobs: int | None = Field(None, description="Not supported.")
    echo: bool | None = Field(False, description="Not supported: only false.")
    best_of: int | None = Field(None, description="Not supported: only 1.")
    suffix: str | None = Field(None, description="Not supported.")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise OpenAIError(
                400, f"a list of {len(self.prompt)} prompts: send exactly one prompt per request", "prompt"
            )
        if self.logprobs is not None:
            raise OpenAIError(400, "logprobs are not supported", "logprobs")
        if self.echo:
            raise OpenAIError(400, "echo is not supported", "echo")
        if self.best_of not in (None, 1):
            raise OpenAIError(400, "best_of is not supported: only 1", "best_of")
        if self.suffix is not None:
            raise OpenAIError(400, "suffix (insertion) is not supported", "suffix")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # an image part's fields: refused below, by its type

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported; only 'text'")
        if self.text is None:
            raise ValueError("a text part needs `text`")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, description="Most tokens to generate.")
    max_tokens: int | None = Field(None, description="Deprecated twin of max_completion_tokens.")
    logprobs: bool | None = Field(False, description="Not supported: only false.")
    top_logprobs: int | None = Field(None, description="Not supported.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: only empty.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none'.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise OpenAIError(400, "logprobs are not supported", "logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise OpenAIError(
                400,
                f"response_format {self.response_format.type!r} is not supported; only 'text'",
                "response_format",
            )
        if self.tools:
            raise OpenAIError(400, "tools (function calling) are not supported", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise OpenAIError(400, "tool_choice is not supported (no tools)", "tool_choice")

    def renames(self) -> dict[str, str]:
        return {
            "prompt": "messages",
            "max_tokens": "max_completion_tokens" if self.max_completion_tokens else "max_tokens",
        }

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- chat template -------------------------------------------------------------------------------

# Without a template in the model's tokenizer config, a ChatML-style one (Qwen's, many others'):
#   <|im_start|>system\n{content}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n
# and `<|im_end|>` is added as a stop string, so a model continuing the pattern ends its turn.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@functools.cache
def _hf_tokenizer(model_dir: Path) -> Any | None:
    """The model's tokenizer when it carries a chat template, else None; loaded once, lazily
    (importing transformers costs seconds: a model without a template never pays it)."""
    config = model_dir / "tokenizer_config.json"
    declared = config.exists() and "chat_template" in json.loads(config.read_text())
    if not declared and not (model_dir / "chat_template.jinja").exists():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer if getattr(tokenizer, "chat_template", None) else None


def chatml(messages: Sequence[dict[str, str]]) -> str:
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return f"{turns}{IM_START}assistant\n"


async def render_chat(model_dir: Path, messages: Sequence[ChatMessage]) -> tuple[str, list[str]]:
    """→ (the prompt, stop strings the template implies). `developer` is rendered as `system`,
    the role chat templates know."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    tokenizer = await asyncio.to_thread(_hf_tokenizer, model_dir)  # the first call loads it
    if tokenizer is None:
        return chatml(turns), [IM_END]
    try:
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may refuse a conversation (jinja's raise_exception)
        raise OpenAIError(400, f"the model's chat template refused these messages: {e}", "messages") from e
    return str(prompt), []


# --- responses ---------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, done: DoneEvent) -> UsageInfo:
        u = done.usage
        return cls(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.prompt_tokens + u.completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = Field(description="stop, length, or abort (cancelled).")
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(description="cmpl-<job id>: the job is at /v1/jobs/<job id>.")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<job id>: the job is at /v1/jobs/<job id>.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# --- waiting for a job, and noticing a client that left --------------------------------------------


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel(services: Services, job_id: str) -> None:
    with anyio.CancelScope(shield=True):  # runs even while this request is being cancelled
        await services.store.cancel(job_id)


async def _collect(services: Services, job_id: str) -> tuple[str, DoneEvent]:
    pieces: list[str] = []
    async for _, event in services.store.events(job_id):
        if isinstance(event, TokenEvent):
            pieces.append(event.text)
        else:
            return "".join(pieces), event
    raise OpenAIError(500, f"job {job_id} expired before it finished")


async def wait_for_job(request: Request, services: Services, job: Job) -> tuple[str, DoneEvent]:
    """The job's whole text and its done event. A client that disconnects first cancels it."""
    result = asyncio.ensure_future(_collect(services, job.id))
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        finished = result.done()
        if not finished:  # the client left (or this request was cancelled)
            result.cancel()
            await _cancel(services, job.id)
    if not finished:  # no one will read this answer
        raise OpenAIError(499, "the client disconnected; its job was cancelled")
    text, done = result.result()
    if done.status is JobStatus.FAILED:
        raise OpenAIError(500, f"generation failed: {done.error or 'unknown error'}")
    return text, done


def _sse(payload: BaseModel, exclude: set[str] | None = None) -> bytes:
    return sse.data(payload.model_dump_json(exclude=exclude))


def _stream_error(done: DoneEvent) -> bytes:
    info = ErrorInfo(message=f"generation failed: {done.error or 'unknown error'}", type="server_error")
    return _sse(ErrorResponse(error=info))


def stream_job(
    services: Services,
    job: Job,
    token: sse.Template,
    finish: Callable[[DoneEvent], bytes],
    head: bytes = b"",
) -> StreamingResponse:
    """Relays the job's stream as OpenAI chunks: `head` first, `token.fill(text)` per piece of
    text (the chunks of one read of the stream go out in one send), `finish(done)` for the end (an
    error event if the job failed), then `data: [DONE]`. A client that disconnects first
    (Starlette cancels the generator, or closes it) cancels the job."""

    async def body() -> AsyncIterator[bytes]:
        finished = False
        try:
            if head:
                yield head
            async for batch in services.store.event_batches(job.id):
                out = []
                for _, event in batch:
                    if isinstance(event, TokenEvent):
                        if event.text:
                            out.append(token.fill(event.text))
                    else:  # the done event: always the stream's last
                        failed = event.status is JobStatus.FAILED
                        out += [_stream_error(event) if failed else finish(event), sse.DONE]
                        finished = True
                if out:
                    yield b"".join(out)
                if finished:
                    return
        finally:  # CancelledError (a disconnect) or GeneratorExit (closed unfinished)
            if not finished:
                await _cancel(services, job.id)

    return sse.response(body(), headers={"Location": f"/v1/jobs/{job.id}"})


async def _accept(
    body: SamplingRequest, spec: JobSpec, caller: ApiKey, services: Services, idempotency_key: str | None
) -> Job:
    """`api.jobs.accept`, its refusals naming this request's fields (max_completion_tokens...)."""
    try:
        job, _replayed = await accept(spec, caller, services, idempotency_key)
    except HTTPException as e:
        if e.status_code == 422 and isinstance(e.detail, list):
            raise _validation_error(e.detail, body.renames()) from e
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


@router.post("/completions", response_model=Completion, responses={**_STREAMED, **_ERRORS})
async def completions(
    body: CompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Text completion of one prompt, whole or streamed (`stream: true`)."""
    model = _check_model(body.model, services)
    body.refuse_unsupported()
    spec = body.job_spec(body.text, 16 if body.max_tokens is None else body.max_tokens)
    job = await _accept(body, spec, caller, services, idempotency_key)
    rid, created = f"cmpl-{job.id}", int(time.time())

    def completion(text: str, finish_reason: str | None) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return Completion(id=rid, created=created, model=model, choices=[choice])

    if not body.stream:
        text, done = await wait_for_job(request, services, job)
        answer = completion(text, done.finish_reason)
        answer.usage = UsageInfo.of(done)
        return JSONResponse(answer.model_dump(), headers={"Location": f"/v1/jobs/{job.id}"})

    omit = None if body.include_usage else {"usage"}

    def finish(done: DoneEvent) -> bytes:
        last = _sse(completion("", done.finish_reason), omit)
        if body.include_usage:  # a last chunk: no choices, the usage
            usage = UsageInfo.of(done)
            last += _sse(Completion(id=rid, created=created, model=model, choices=[], usage=usage))
        return last

    return stream_job(services, job, sse.Template(completion(sse.MARK, None), omit), finish)


# --- /v1/chat/completions ----------------------------------------------------------------------


def _default_max_tokens(services: Services, prompt: str) -> int:
    """No max_tokens: up to the rest of the context, within the server's limit (as vLLM)."""
    room = services.counter.max_context - services.counter.count(prompt)
    return max(1, min(services.settings.limits.max_tokens, room))


@router.post("/chat/completions", response_model=ChatCompletion, responses={**_STREAMED, **_ERRORS})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """The assistant's next message, whole or streamed (`stream: true`). The prompt is the
    model's chat template applied to `messages`, or ChatML when the model has none."""
    model = _check_model(body.model, services)
    body.refuse_unsupported()
    prompt, implied_stop = await render_chat(services.settings.resolved_model_dir, body.messages)
    max_tokens = body.requested_max_tokens
    spec = body.job_spec(prompt, max_tokens or _default_max_tokens(services, prompt), implied_stop)
    job = await _accept(body, spec, caller, services, idempotency_key)
    rid, created = f"chatcmpl-{job.id}", int(time.time())

    if not body.stream:
        text, done = await wait_for_job(request, services, job)
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=done.finish_reason)
        answer = ChatCompletion(
            id=rid, created=created, model=model, choices=[choice], usage=UsageInfo.of(done)
        )
        return JSONResponse(answer.model_dump(), headers={"Location": f"/v1/jobs/{job.id}"})

    omit = None if body.include_usage else {"usage"}

    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])

    def finish(done: DoneEvent) -> bytes:
        last = _sse(chunk(ChatDelta(), done.finish_reason), omit)
        if body.include_usage:  # a last chunk: no choices, the usage
            usage = UsageInfo.of(done)
            last += _sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage))
        return last

    head = _sse(chunk(ChatDelta(role="assistant", content="")), omit)
    return stream_job(services, job, sse.Template(chunk(ChatDelta(content=sse.MARK)), omit), finish, head)
