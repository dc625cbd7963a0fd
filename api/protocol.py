"""Wire models of the HTTP API beyond the shared Job model."""

from __future__ import annotations

from pydantic import BaseModel, Field

from scheduler.jobs import Job
from scheduler.webhooks import WebhookAttempt


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


class JobPage(BaseModel):
    jobs: list[JobResponse]
    next: float | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class Health(BaseModel):
    status: str
    detail: str | None = None
    workers_ready: int = 0
