"""The Celery task: one job per task, run inside the worker's one shared engine batch."""

from __future__ import annotations

from typing import Any

from celery import Celery

from scheduler import keys
from scheduler.jobs import Job
from workers.runtime import Runtime


def register(app: Celery, runtime: Runtime) -> None:
    @app.task(name=keys.RUN_JOB_TASK)
    def run_job(job: dict[str, Any]) -> dict[str, Any]:
        # The message carries the Job (JSON); Redis holds its authoritative state.
        done = runtime.run(Job.model_validate(job))
        if done is None:
            return {"id": job.get("id"), "skipped": True}
        return {"id": done.id, "status": done.status.value, "tokens": done.usage.completion_tokens}
