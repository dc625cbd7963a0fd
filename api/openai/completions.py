"""POST /v1/completions: text completion of a prompt or of a list of prompts, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api import sse
from api.auth import ApiKey, Caller
from api.deps import Services, ServicesDep
from api.jobs import forget_idempotency
from api.openai.errors import ERRORS, OpenAIError, OpenAIRoute
from api.openai.logprobs import completion_logprobs, prompt_logprobs, token_texts
from api.openai.protocol import Completion, CompletionChoice, CompletionRequest, UsageInfo
from api.openai.serving import STREAMED, IdempotencyKey, accept_request, check_model, usage_so_far
from api.openai.streaming import (
    Answer,
    Choices,
    JobRelay,
    sse_chunk,
    stream_jobs,
    stream_relay,
    wait_for_job,
    wait_for_jobs,
)
from scheduler.jobs import Job, JobSpec
from scheduler.stream import DoneEvent, TokenEvent

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


MAX_PROMPTS = 64  # prompts in one request's list (each its own job)


@router.post("/completions", response_model=Completion, responses={**STREAMED, **ERRORS})
async def completions(
    body: CompletionRequest,
    request: Request,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Text completion of a prompt or of a list of prompts (prompt i's choices at i × n + k, as
    vLLM), whole or streamed (`stream: true`)."""
    if len(body.prompts) > 1:
        return await several_completions(body, services, caller, request, idempotency_key)
    return await text_completion(body, services, caller, request, idempotency_key)


@dataclass
class _Accepted:
    """One prompt's job, and what its answer is built from."""

    job: Job
    spec: JobSpec
    text: str  # the prompt's text (a prompt of ids: their text)
    model: str


@dataclass
class _Prepared:
    """One prompt's request, validated: its job's spec, the prompt's text, the model's name."""

    spec: JobSpec
    text: str  # a prompt of ids: their text
    model: str


def _prepare(body: CompletionRequest, services: Services) -> _Prepared:
    """Validate one prompt's request (a 400 says what is wrong)."""
    model = check_model(body.model, services)
    body.refuse_unsupported()
    ids = body.token_ids
    if ids is not None:  # their text, for detection, the record and echo; the engine takes the ids
        vocab = services.counter.vocab_size
        if outside := [t for t in ids if not 0 <= t < vocab]:
            raise OpenAIError(400, f"token ids {outside[:8]} are outside the vocabulary of {vocab}", "prompt")
        text = services.counter.tokenizer.decode(ids, skip_special_tokens=False)
    else:
        text = body.text or ""
    spec = body.job_spec(text, 16 if body.max_tokens is None else body.max_tokens, prompt_token_ids=ids)
    return _Prepared(spec, text, model)


async def _accept(
    body: CompletionRequest,
    prepared: _Prepared,
    services: Services,
    caller: ApiKey,
    idempotency_key: str | None,
) -> _Accepted:
    """Accept the job of one prompt's request, as `_prepare` validated it."""
    job = await accept_request(body, prepared.spec, caller, services, idempotency_key)
    return _Accepted(job, prepared.spec, prepared.text, prepared.model)


def prompt_keys(idempotency_key: str, prompts: int) -> list[str]:
    """The Idempotency-Keys of a list of prompts' jobs: prompt i's is the request's key + "-i"."""
    return [f"{idempotency_key}-{i}" for i in range(prompts)]


async def several_completions(
    body: CompletionRequest,
    services: Services,
    caller: ApiKey,
    request: Request | None,
    idempotency_key: str | None = None,
    accepted_all: Callable[[Job], None] | None = None,
    keep: Callable[[BaseException], bool] | None = None,
) -> Response:
    """A list of prompts: a job each, every one validated before any is accepted and accepted
    before any is waited for, answered together, whole or streamed. A refusal part way (a 429
    say) cancels the jobs accepted before it, unless keep(refusal): a batch's line, which its run
    sends again after such a refusal (with the same key), keeps them, and the next try finds them by
    their keys and goes on from the prompt refused. Without `request` the jobs outlive a cancelled
    caller. `accepted_all`: told of the first job once every prompt's is accepted."""
    prompts = body.prompts
    if len(prompts) > MAX_PROMPTS:
        raise OpenAIError(400, f"{len(prompts)} prompts: at most {MAX_PROMPTS} per request", "prompt")
    parts = [body.model_copy(update={"prompt": prompt}) for prompt in prompts]
    prepared = [_prepare(part, services) for part in parts]  # every prompt valid before any job exists
    accepted: list[_Accepted] = []
    keys = prompt_keys(idempotency_key, len(parts)) if idempotency_key else [None] * len(parts)
    try:
        for part, ready, key in zip(parts, prepared, keys, strict=True):
            accepted.append(await _accept(part, ready, services, caller, key))
    except BaseException as refusal:
        if keep is not None and keep(refusal):
            raise
        for done, key in zip(accepted, keys, strict=False):
            await services.store.cancel(done.job.id)
            # refused as a whole: sent again, the request is judged again, not answered by the
            # jobs cancelled here (a key is forgotten only while it names this job)
            await forget_idempotency(services, caller, key, done.job.id)
        raise
    first = accepted[0]
    if accepted_all is not None:
        accepted_all(first.job)
    if body.stream:
        return _stream_several(body, services, accepted)
    results = await wait_for_jobs(request, services, [a.job for a in accepted])
    answer = Completion(id=f"cmpl-{first.job.id}", created=int(time.time()), model=first.model, choices=[])
    usages = []
    for i, (one, result) in enumerate(zip(accepted, results, strict=True)):
        whole = await _whole(body, services, one, result)
        for choice in whole.choices:
            choice.index += i * one.spec.n
        answer.choices += whole.choices
        usages.append(UsageInfo.of(result.done))
    answer.usage = UsageInfo.total(usages)
    return JSONResponse(answer.model_dump(), headers={"Location": f"/v1/jobs/{first.job.id}"})


def _stream_several(body: CompletionRequest, services: Services, accepted: list[_Accepted]) -> Response:
    """A list of prompts streamed, as vLLM streams it: prompt i's choices at i × n + k, their chunks
    interleaved as the jobs make them; with include_usage one usage chunk for every prompt at the
    end (continuous usage: each chunk carries its own prompt's)."""
    first = accepted[0]
    rid, created = f"cmpl-{first.job.id}", int(time.time())
    relays = [
        _relay(body, services, one, rid, created, first_choice=i * one.spec.n, usage_chunk=False)
        for i, one in enumerate(accepted)
    ]

    def tail() -> bytes:
        if not body.include_usage:
            return b""
        usage = UsageInfo.total([UsageInfo.of(r.done) for r in relays if r.done is not None])
        return sse_chunk(Completion(id=rid, created=created, model=first.model, choices=[], usage=usage))

    return stream_jobs(services, relays, tail)


async def _whole(body: CompletionRequest, services: Services, one: _Accepted, result: Answer) -> Completion:
    """One prompt's whole answer."""
    texts = token_texts(services.counter.tokenizer)
    lead = one.text if body.echo else ""
    echo_logprobs = body.echo and body.logprobs is not None
    job = one.job
    scored = await services.store.prompt_logprobs(job.id) if one.spec.prompt_logprobs is not None else None
    answer = Completion(
        id=f"cmpl-{job.id}",
        created=int(time.time()),
        model=one.model,
        choices=[],
        usage=UsageInfo.of(result.done),
    )
    for k, out in enumerate(result.outputs):
        choice = CompletionChoice(index=k, text=lead + out.text, finish_reason=out.finish_reason)
        if body.logprobs is not None:
            if echo_logprobs and scored:  # the prompt's tokens lead (their offsets count from 0)
                choice.logprobs, _ = completion_logprobs([*scored, *out.logprobs], texts, 0)
            else:
                choice.logprobs, _ = completion_logprobs(out.logprobs, texts, len(lead))
        if scored is not None:
            choice.prompt_logprobs = prompt_logprobs(scored, texts)
        answer.choices.append(choice)
    return answer


async def text_completion(
    body: CompletionRequest,
    services: Services,
    caller: ApiKey,
    request: Request | None = None,
    idempotency_key: str | None = None,
    accepted: Callable[[Job], None] | None = None,
) -> Response:
    """One prompt's answer; without `request` (a batch's line) the job outlives a cancelled caller.
    `accepted`: told of the job once it is accepted (before its answer is waited for)."""
    if len(body.prompts) > 1:
        raise OpenAIError(400, f"a list of {len(body.prompts)} prompts: send one prompt here", "prompt")
    one = await _accept(body, _prepare(body, services), services, caller, idempotency_key)
    job = one.job
    if accepted is not None:
        accepted(job)
    rid, created = f"cmpl-{job.id}", int(time.time())
    if not body.stream:
        answer = await _whole(body, services, one, await wait_for_job(request, services, job))
        answer.id, answer.created = rid, created
        return JSONResponse(answer.model_dump(), headers={"Location": f"/v1/jobs/{job.id}"})
    return stream_relay(services, _relay(body, services, one, rid, created))


def _relay(
    body: CompletionRequest,
    services: Services,
    one: _Accepted,
    rid: str,
    created: int,
    first_choice: int = 0,
    usage_chunk: bool = True,
) -> JobRelay:
    """How one prompt's job streams as completion chunks: its choices are first_choice + k (a list's
    prompt i: i × n); with include_usage and `usage_chunk`, its end adds the usage chunk (a list
    adds one for all its prompts instead)."""
    job, text, model = one.job, one.text, one.model
    n, prompt_tokens = one.spec.n, job.usage.prompt_tokens

    def completion(text: str, finish_reason: str | None, index: int = 0) -> Completion:
        choice = CompletionChoice(index=first_choice + index, text=text, finish_reason=finish_reason)
        return Completion(id=rid, created=created, model=model, choices=[choice])

    texts = token_texts(services.counter.tokenizer)
    lead = text if body.echo else ""
    # echo with logprobs: the prompt's tokens lead the logprobs (their offsets count from 0)
    echo_logprobs = body.echo and body.logprobs is not None
    omit = None if body.include_usage else {"usage"}
    so_far = usage_so_far(job) if body.continuous_usage else None

    def end(index: int, finish_reason: str | None, usage: UsageInfo) -> bytes:
        """The chunk that ends choice `index` (`usage`: so far, for continuous usage)."""
        last = completion("", finish_reason, index)
        if body.continuous_usage:
            last.usage = usage
        return sse_chunk(last, omit)

    def finish(done: DoneEvent) -> bytes:
        unended = choices.unended if choices is not None else {0}
        last = b"".join(end(k, done.finish_reason, UsageInfo.of(done)) for k in sorted(unended))
        if body.include_usage and usage_chunk:  # a last chunk: no choices, the usage
            usage = UsageInfo.of(done)
            last += sse_chunk(Completion(id=rid, created=created, model=model, choices=[], usage=usage))
        return last

    templates = [sse.Template(completion(sse.MARK, None, k), omit) for k in range(n)]
    head = b"".join(sse_chunk(completion(text, None, k), omit) for k in range(n)) if body.echo else b""
    offsets = [len(lead)] * n  # per choice: where its next token's text starts

    async def echo_with_logprobs() -> bytes:
        """The echo chunks with the prompt's logprobs: the job scored the prompt before its first
        token entry, so they are there once the stream has anything."""
        scored = await services.store.prompt_logprobs(job.id) or []
        out = b""
        for k in range(n):
            chunk = completion(text, None, k)
            if scored:
                chunk.choices[0].logprobs, offsets[k] = completion_logprobs(scored, texts, 0)
            out += sse_chunk(chunk, omit)
        return out

    def with_logprobs(event: TokenEvent, generated: int) -> bytes:
        k = event.index
        chunk = completion(event.text, None, k)
        chunk.choices[0].logprobs, offsets[k] = completion_logprobs(event.logprobs or [], texts, offsets[k])
        if so_far is not None:
            chunk.usage = UsageInfo.counted(prompt_tokens, generated)
        return sse_chunk(chunk, omit)

    logprobs = with_logprobs if body.logprobs is not None else None
    choices = Choices(templates, end, prompt_tokens, so_far, logprobs) if n > 1 else None
    render = choices or logprobs
    if echo_logprobs:
        return JobRelay(job, templates[0], finish, usage=so_far, render=render, head_after=echo_with_logprobs)
    return JobRelay(job, templates[0], finish, head, usage=so_far, render=render)
