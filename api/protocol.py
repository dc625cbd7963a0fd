"""Wire models of the HTTP API beyond the shared Job model."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, Field

from scheduler.jobs import Job
from scheduler.webhooks import WebhookAttempt


class Refusal(BaseModel):
    """A 4xx/5xx of the API's own routes: why, in a sentence, or FastAPI's list of
    {loc, msg, type} for bad input."""

    detail: str | list[dict[str, Any]]


_REFUSALS = {
    401: "No API key, or an unknown or revoked one.",
    403: "This needs an admin key.",
    404: "Unknown, or not this key's.",
    409: "Conflicts with the current state.",
    413: "The request body is larger than `limits.max_body_bytes`.",
    422: "Bad input: FastAPI's list of {loc, msg, type}, or a sentence.",
    503: "The job queue is unavailable; try again.",
}


def refusals(*statuses: int, inline: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these refusals, each a `Refusal`. `inline`: for a route whose own
    answer is not JSON (FastAPI files a `model` under the route's media type, SSE's)."""
    if inline:
        content = {"application/json": {"schema": Refusal.model_json_schema()}}
        return {s: {"description": _REFUSALS[s], "content": content} for s in statuses}
    return {s: {"model": Refusal, "description": _REFUSALS[s]} for s in statuses}


class JobLinks(BaseModel):
    self: str = Field(description="Poll the job here.")
    events: str = Field(description="Server-sent events: tokens as they are made, then `done`.")
    stream: str = Field(description="The same events over a websocket.")


class JobResponse(Job):
    links: JobLinks
    webhook_attempts: list[WebhookAttempt] = Field(
        default_factory=list, description="Webhook deliveries so far (GET /v1/jobs/{id} only)."
    )

    @classmethod
    def of(cls, job: Job, attempts: list[WebhookAttempt] | None = None) -> JobResponse:
        base = f"/v1/jobs/{job.id}"
        links = JobLinks(self=base, events=f"{base}/events", stream=f"{base}/stream")
        return cls(**job.model_dump(), links=links, webhook_attempts=attempts or [])

    @staticmethod
    def json_of(job: Job) -> bytes:
        """`JobResponse.of(job)` (no attempts) as JSON, without building and validating the model
        again: what POST /v1/jobs answers, once per accepted job (15 → 5 µs)."""
        base = f"/v1/jobs/{job.id}"
        links = {"self": base, "events": f"{base}/events", "stream": f"{base}/stream"}
        return orjson.dumps({**job.model_dump(mode="json"), "links": links, "webhook_attempts": []})


class JobPage(BaseModel):
    jobs: list[JobResponse]
    next: float | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class Health(BaseModel):
    status: str
