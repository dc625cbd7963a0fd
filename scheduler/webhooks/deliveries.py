"""Deliveries and the attempt log: an event's payload is fixed once (`enqueue_delivery`: the exact
body bytes every attempt sends) and put on the webhook queue; every attempt is appended to the
job's attempt log (`record_attempt`, `read_attempts`).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import redis
import redis.asyncio
from celery import Celery
from pydantic import BaseModel, Field

from scheduler import keys
from scheduler.webhooks.endpoints import Endpoint
from scheduler.webhooks.spec import MAX_ATTEMPTS_KEPT, BatchEventType, WebhookEventType, attempts_key

# --- Deliveries ---------------------------------------------------------------------------------


class Delivery(BaseModel):
    """One event for one endpoint: the webhook queue's message. A retry is the same Delivery with
    attempt + 1: the webhook id and the body (the exact bytes signed and sent) never change."""

    webhook_id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    endpoint_id: str
    job_id: str  # or a batch's id (batch_…), for a batch's event
    type: WebhookEventType | BatchEventType
    body: str  # {"type": "job.<event>" | "batch.<event>", "timestamp": "<ISO 8601 UTC>", "data": {...}}
    created_at: float = Field(default_factory=time.time)
    first_attempt_at: float | None = None  # set by the first attempt; retries stop max_age_s after
    attempt: int = Field(1, ge=1)  # the attempt this message is (1 = the first)


def make_delivery(
    endpoint_id: str, job_id: str, event_type: WebhookEventType | BatchEventType, data: dict[str, Any]
) -> Delivery:
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
    body = json.dumps(
        {"type": event_type.payload_type, "timestamp": stamp, "data": data}, separators=(",", ":")
    )
    return Delivery(endpoint_id=endpoint_id, job_id=job_id, type=event_type, body=body, created_at=now)


def enqueue_delivery(
    app: Celery, endpoint: Endpoint, job_id: str, event_type: WebhookEventType, data: dict[str, Any]
) -> Delivery:
    """Fix the event's payload now (`data`: any JSON-able dict — job id, status, output so far...)
    and put it on the webhook queue."""
    delivery = make_delivery(endpoint.id, job_id, event_type, data)
    send_delivery(app, delivery)
    return delivery


def send_delivery(
    app: Celery, delivery: Delivery, countdown: float | None = None, producer: Any = None
) -> None:
    app.send_task(
        keys.DELIVER_WEBHOOK_TASK,
        args=[delivery.model_dump(mode="json")],
        queue=keys.WEBHOOK_QUEUE,
        countdown=countdown,
        producer=producer,
    )


# --- The attempt log on the job -----------------------------------------------------------------

Outcome = Literal["delivered", "retrying", "gave_up", "disabled", "refused"]


class WebhookAttempt(BaseModel):
    """One delivery attempt, as the job's owner sees it (GET the job's webhooks)."""

    webhook_id: str
    type: WebhookEventType | BatchEventType
    endpoint_id: str
    url: str  # "" when the endpoint had been deleted
    attempt: int
    at: float  # unix seconds the attempt began (its webhook-timestamp)
    status_code: int | None = None  # None: no HTTP answer (refused, connection error, timeout)
    error: str | None = None
    outcome: Outcome
    next_attempt_at: float | None = None  # set when outcome is "retrying"


def record_attempt(client: redis.Redis, job_id: str, attempt: WebhookAttempt, ttl_s: int) -> None:
    key = attempts_key(job_id)
    pipe = client.pipeline(transaction=True)
    pipe.rpush(key, attempt.model_dump_json())
    pipe.ltrim(key, -MAX_ATTEMPTS_KEPT, -1)
    pipe.expire(key, ttl_s)
    pipe.execute()


def read_attempts(client: redis.Redis, job_id: str) -> list[WebhookAttempt]:
    raw: list[str] = client.lrange(attempts_key(job_id), 0, -1)  # type: ignore[assignment]
    return [WebhookAttempt.model_validate_json(r) for r in raw]


async def read_attempts_async(client: redis.asyncio.Redis, job_id: str) -> list[WebhookAttempt]:
    raw = await client.lrange(attempts_key(job_id), 0, -1)
    return [WebhookAttempt.model_validate_json(r) for r in raw]
