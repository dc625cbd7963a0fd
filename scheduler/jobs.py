"""The one job model: the API's request and response, the Celery message and the Redis record.

A job's life: QUEUED (accepted, on a Celery queue) → RUNNING (a worker's engine holds it) →
exactly one of SUCCEEDED | FAILED | CANCELLED. Terminal states are written once (see store.py).
"""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scheduler.webhooks import WebhookSpec


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Modality(StrEnum):
    TEXT = "text"
    CODE = "code"
    MIXED = "mixed"


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 is the most urgent; also the Celery message priority (Redis transport: 0 first)."""
        return _PRIORITY_RANK[self]

    def capped(self, ceiling: Priority) -> Priority:
        return self if self.rank >= ceiling.rank else ceiling


_PRIORITY_RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}


class JobSpec(BaseModel):
    """What a client asks for. Unknown fields are refused (422), not ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The text or code to continue.")
    max_tokens: int = Field(default=128, gt=0, description="Most tokens to generate.")
    temperature: float = Field(
        default=0.0, ge=0.0, le=5.0, description="0 means greedy decoding; so does anything below 1e-5."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 is off.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k likeliest tokens; 0 is off.")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Makes sampling reproducible.")
    stop: list[str] = Field(default_factory=list, max_length=8, description="Strings that end generation.")
    modality: Modality | None = Field(default=None, description="text, code or mixed; detected if absent.")
    ignore_eos: bool = Field(default=False, description="Generate exactly max_tokens (benchmarks).")
    priority: Priority = Field(
        default=Priority.NORMAL, description="high, normal or low; capped at what the API key may use."
    )
    webhook: WebhookSpec | None = Field(
        default=None,
        description="Signed callbacks (Standard Webhooks) for the events named; the URL must be an "
        "endpoint registered with POST /v1/webhooks, on a host the admin allows.",
    )

    @field_validator("prompt")
    @classmethod
    def _encodable(cls, prompt: str) -> str:
        # JSON may carry lone surrogates ("\ud800"): valid JSON, not valid UTF-8.
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError("prompt is not valid UTF-8 (lone surrogate)") from e
        if not prompt.strip():
            raise ValueError("prompt is empty or only whitespace")
        return prompt

    @field_validator("temperature")
    @classmethod
    def _greedy(cls, temperature: float) -> float:
        # As vLLM: logits / 1e-300 overflow to inf, and such a job never finished (found by fuzzing).
        return 0.0 if temperature < 1e-5 else temperature

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: list[str]) -> list[str]:
        for s in stop:
            if not s or len(s) > 64:
                raise ValueError("each stop string must be 1 to 64 characters")
            s.encode("utf-8")
        return stop


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(BaseModel):
    """Unix times in seconds; None until the moment happens."""

    queued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


class Job(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    spec: JobSpec
    owner: str | None = None  # the id of the API key that submitted it; only it (and admins) see it
    priority: Priority = Priority.NORMAL  # the spec's, capped by the key's ceiling
    webhook_endpoint: str | None = None  # the registered endpoint spec.webhook.url resolved to
    modality: Modality = Modality.TEXT  # the client's, or detected at intake
    language: str | None = None  # the programming language, when detection is confident
    queue: str | None = None  # the Celery queue the scheduler chose
    route_reason: str | None = None
    cost: float = 0.0  # estimated cost in decode tokens: max_tokens + prefill_weight * prompt tokens
    worker: str | None = None
    engine: str | None = None
    attempt: int = 0  # incremented each time a worker claims the job
    cancel_requested: bool = False
    output: str | None = None  # the whole generated text, set with the terminal state
    finish_reason: str | None = None  # stop | length | abort
    error: str | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)


# --- Redis record -------------------------------------------------------------------------
# A job is one Redis hash. Every field holds the JSON encoding of its value; nested models are
# flattened one level ("timings.started_at"), so a stage updates its own fields with one HSET
# and never rewrites the whole record.

_NESTED = ("usage", "timings")


def encode_fields(values: dict[str, Any]) -> dict[str, str]:
    """Job fields (possibly partial, possibly nested) → hash fields."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if key in _NESTED and isinstance(value, dict):
            out.update({f"{key}.{k}": json.dumps(v) for k, v in value.items()})
        else:
            out[key] = json.dumps(value)
    return out


def job_to_hash(job: Job) -> dict[str, str]:
    return encode_fields(job.model_dump(mode="json"))


def job_from_hash(fields: dict[str, str]) -> Job:
    data: dict[str, Any] = {}
    for key, raw in fields.items():
        outer, _, inner = key.partition(".")
        if inner:
            data.setdefault(outer, {})[inner] = json.loads(raw)
        else:
            data[key] = json.loads(raw)
    return Job.model_validate(data)
