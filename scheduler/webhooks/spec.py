"""What a job asks for: the events it wants and where (`WebhookSpec`); what a batch asks for
(`BatchWebhookSpec`); the Redis keys of webhook endpoints and attempt logs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from host.allowlist import MAX_URL_LENGTH, url_problem
from scheduler import keys

# --- Redis keys ---------------------------------------------------------------------------------
# localmoe:webhook:endpoint:<id>  hash: the Endpoint's fields, each value JSON-encoded (as jobs.py)
# localmoe:webhook:owner:<owner>  hash: url → endpoint id, one entry per endpoint of that owner
# localmoe:job:<job id>:webhooks  list: WebhookAttempt JSON, oldest first, expires with the job
# localmoe:batch:<batch id>:webhooks  the same for a batch's events
# An endpoint hash exists exactly when its owner's index names it: both change in one transaction.


WEBHOOK_PREFIX = f"{keys.PREFIX}:webhook:"
MAX_ATTEMPTS_KEPT = 1000  # per job: the attempt log keeps its newest entries


def endpoint_key(endpoint_id: str) -> str:
    return f"{WEBHOOK_PREFIX}endpoint:{endpoint_id}"


def owner_key(owner: str) -> str:
    return f"{WEBHOOK_PREFIX}owner:{owner}"


def attempts_key(subject_id: str) -> str:
    """The attempt log of a job's deliveries, or of a batch's (its id starts with `batch_`)."""
    subject = keys.batch(subject_id) if subject_id.startswith("batch_") else keys.job(subject_id)
    return f"{subject}:webhooks"


# --- What a job asks for ------------------------------------------------------------------------


class WebhookEventType(StrEnum):
    STARTED = "started"
    OUTPUT = "output"  # the output so far; at most one per webhooks.output_interval_s
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def payload_type(self) -> str:
        """The payload's `type`: "job.completed"."""
        return f"job.{self.value}"


DEFAULT_EVENTS = [WebhookEventType.COMPLETED, WebhookEventType.FAILED, WebhookEventType.CANCELLED]


class WebhookSpec(BaseModel):
    """A job's webhook: where to POST, and which of the job's events."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=MAX_URL_LENGTH,
        description="http(s) URL without credentials; its host must be in the server's webhook allowlist.",
    )
    events: list[WebhookEventType] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        description="started, output, completed, failed, cancelled (default: the three terminal ones).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _allowed_url(url)

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[WebhookEventType]) -> list[WebhookEventType]:
        return _no_repeats(events)


def _allowed_url(url: str) -> str:
    problem = url_problem(url)
    if problem is not None:
        raise ValueError(problem)
    return url


_Event = TypeVar("_Event", bound=StrEnum)


def _no_repeats(events: list[_Event]) -> list[_Event]:
    if len(set(events)) != len(events):
        raise ValueError("events must not repeat")
    return events


# --- What a batch asks for (POST /v1/batches, LocalMoE's `webhook` field) ----------------------


class BatchEventType(StrEnum):
    """A batch's terminal events, named as OpenAI names them (the value is the payload's type)."""

    COMPLETED = "batch.completed"
    FAILED = "batch.failed"
    EXPIRED = "batch.expired"
    CANCELLED = "batch.cancelled"

    @property
    def payload_type(self) -> str:
        return self.value


class BatchWebhookSpec(BaseModel):
    """A batch's webhook: where to POST, and which of its ends."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=MAX_URL_LENGTH,
        description="A URL registered with POST /v1/webhooks (its signing secret signs each event).",
    )
    events: list[BatchEventType] = Field(
        default_factory=lambda: list(BatchEventType),
        min_length=1,
        description="batch.completed, batch.failed, batch.expired, batch.cancelled (default: all four).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _allowed_url(url)

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[BatchEventType]) -> list[BatchEventType]:
        return _no_repeats(events)
