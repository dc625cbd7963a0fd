"""Typed messages between a worker's three processes, each pair over one duplex pipe.

consumer process (Celery)     runtime process (claims, relay,         engine process (the engine
                              heartbeats, cancels, webhooks, metrics)  and its step loop only)
  Submit(seq, [Job...]) ──▶   (the jobs of one Celery message: it claims them, then runs them)
  ConsumerReady ─────────▶    (heartbeats say ready from now on)
  Shutdown ──────────────▶    (exits; so does it when the pipe closes)
                       ◀───   EngineReady(info)   once the engine is warm
                       ◀───   Finished(seq, job_id, status)   after the terminal write, or at once
                              with status None for a job it did not claim
                              Add(request) / AddMany / Abort(id) / Configure / Stop ──▶
                                                       ◀── Loaded | LoadFailed   once, at start
                                                       ◀── Stepped(deltas)      every step that made any
                                                       ◀── Refused(id, error)   a request it failed
                                                       ◀── Stats(...)           every 0.1 s while busy
                                                       ◀── Experts(counts)      every second while busy

Consumer ⇄ runtime: pydantic models as JSON (a few messages per job). The consumer writes a
Submit's JSON around the jobs as its Celery message carried them (no model built on its side:
its one thread of Python takes every message of the worker); the runtime validates it. Runtime ⇄ engine:
NamedTuples, marshal-encoded as (tag, *fields): every step's deltas cross this pipe (256 at a full
batch), and marshal of plain tuples costs the engine process ~0.5 µs per delta where building and
dumping pydantic models costs several µs; the engine process's CPU is the GPU's pace.
"""

from __future__ import annotations

import dataclasses
import marshal
from typing import Annotated, Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, Field, TypeAdapter

from host.settings import Offload
from moe_core.engine import Delta, EngineStats, FinishReason, GenerationRequest, SamplingParams
from scheduler.jobs import Job, JobStatus
from scheduler.registry import WorkerInfo


class Submit(BaseModel):
    kind: Literal["submit"] = "submit"
    seq: int  # the consumer's number for this hand-over; the replies name it
    jobs: list[Job]  # one Celery message's, in its order; not yet claimed


def submit_json(seq: int, jobs: list[dict[str, Any]]) -> bytes:
    """A Submit's JSON around jobs as a Celery message carried them (Job.model_dump(mode="json")
    by the API), without building a model: what Submit.model_validate_json reads."""
    return orjson.dumps({"kind": "submit", "seq": seq, "jobs": jobs})


class ConsumerReady(BaseModel):
    kind: Literal["consumer_ready"] = "consumer_ready"


class Shutdown(BaseModel):
    kind: Literal["shutdown"] = "shutdown"


class EngineReady(BaseModel):
    kind: Literal["engine_ready"] = "engine_ready"
    info: WorkerInfo


class Finished(BaseModel):
    kind: Literal["finished"] = "finished"
    seq: int  # the Submit that brought the job
    job_id: str
    status: JobStatus | None  # None: not claimed here (cancelled while queued, or another worker's)
    completion_tokens: int = 0


Message = Annotated[Submit | ConsumerReady | Shutdown | EngineReady | Finished, Field(discriminator="kind")]
MESSAGE: TypeAdapter[Submit | ConsumerReady | Shutdown | EngineReady | Finished] = TypeAdapter(Message)


# --- runtime process ⇄ engine process -----------------------------------------------------------


_PARAM_FIELDS = dataclasses.fields(SamplingParams)


class Add(NamedTuple):
    """A request joins the batch at the engine's next step."""

    request_id: str
    prompt: str
    params: tuple[Any, ...]  # SamplingParams's fields, in order (tuples stay tuples in marshal)
    tag: str
    priority: int  # GenerationRequest.priority
    prompt_token_ids: tuple[int, ...] | None  # GenerationRequest.prompt_token_ids

    @classmethod
    def of(cls, r: GenerationRequest) -> Add:
        params = tuple(getattr(r.params, f.name) for f in _PARAM_FIELDS)
        # marshal takes no str subclass (enums)
        return cls(r.request_id, r.prompt, params, str(r.tag), int(r.priority), r.prompt_token_ids)

    def request(self) -> GenerationRequest:
        params = SamplingParams(*self.params)
        return GenerationRequest(
            self.request_id,
            self.prompt,
            params,
            tag=self.tag,
            priority=self.priority,
            prompt_token_ids=self.prompt_token_ids,
        )


class AddMany(NamedTuple):
    """Requests that join the batch at the same step (the sequences of a job with n > 1): one
    message, so the engine loop never steps between two of them."""

    adds: list[tuple[Any, ...]]  # Add's fields, per request

    @classmethod
    def of(cls, requests: list[GenerationRequest]) -> AddMany:
        return cls([tuple(Add.of(r)) for r in requests])

    def each(self) -> list[Add]:
        return [Add(*fields) for fields in self.adds]


class Abort(NamedTuple):
    request_id: str


class Configure(NamedTuple):
    """The engine-side hot settings (host/config_store.py)."""

    step_delay_s: float
    max_step_failures: int
    failover_cooldown_s: float


class Stop(NamedTuple):
    """Close the engine (device memory, its own processes) and exit."""


class Loaded(NamedTuple):
    """The engine is loaded and warm."""

    name: str  # its backend
    max_context: int
    device: str  # "cuda" or "cpu", "auto" resolved
    choice: str  # the backend the choice named (name differs when that one failed to load)
    reason: str  # why the choice named it
    offloads: dict[str, Offload]  # per backend of the choice's list: how it holds what does not fit
    cpu_offload_gb: float  # vLLM's, when its offload is vllm_cpu


class LoadFailed(NamedTuple):
    error: str


# A Delta on the wire: (request_id, text, token_ids, prompt_tokens, completion_tokens,
# finish_reason's value or None, error, logprobs or None, cached_tokens, prompt_logprobs or None).
DeltaTuple = tuple[
    str, str, list[int], int, int, str | None, str | None, list[Any] | None, int, list[Any] | None
]


class Stepped(NamedTuple):
    """What one engine step (or several that piled up) changed."""

    deltas: list[DeltaTuple]

    @classmethod
    def of(cls, deltas: list[Delta]) -> Stepped:
        return cls(
            [
                (d.request_id, d.text, d.token_ids, d.prompt_tokens, d.completion_tokens,
                 d.finish_reason.value if d.finish_reason is not None else None, d.error, d.logprobs,
                 d.cached_tokens, d.prompt_logprobs)
                for d in deltas
            ]
        )  # fmt: skip

    def unpack(self) -> list[Delta]:
        return [
            Delta(
                rid,
                text,
                ids,
                prompt,
                completion,
                FinishReason(reason) if reason else None,
                error,
                lps,
                cached,
                prompt_lps,
            )
            for rid, text, ids, prompt, completion, reason, error, lps, cached, prompt_lps in self.deltas
        ]


class Refused(NamedTuple):
    """The engine failed this request (it could not take it, or its step failed): it is gone."""

    request_id: str
    error: str


class Stats(NamedTuple):
    name: str  # the serving backend (a failover changes it)
    stats: tuple[Any, ...]  # EngineStats's fields, in order
    busy_s: float  # seconds spent stepping with requests in the engine, so far

    def engine_stats(self) -> EngineStats:
        return EngineStats(*self.stats)


class Experts(NamedTuple):
    tokens: dict[str, list[list[int]]]  # tag → [layer][expert] tokens routed there so far


class Seated(NamedTuple):
    """The engine gives these requests a row at the step it is about to compute (sent before it)."""

    request_ids: list[str]


ToEngine = Add | AddMany | Abort | Configure | Stop
FromEngine = Loaded | LoadFailed | Stepped | Refused | Stats | Experts | Seated
_TAGS: dict[str, type[Any]] = {
    c.__name__: c
    for c in (
        Add,
        AddMany,
        Abort,
        Configure,
        Stop,
        Loaded,
        LoadFailed,
        Stepped,
        Refused,
        Stats,
        Experts,
        Seated,
    )
}


def pack(message: ToEngine | FromEngine) -> bytes:
    return marshal.dumps((type(message).__name__, *message))


def unpack(data: bytes) -> Any:
    """→ the message (ToEngine or FromEngine: the receiving side knows which)."""
    tag, *fields = marshal.loads(data)
    return _TAGS[tag](*fields)
