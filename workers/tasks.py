"""The Celery task: claim the jobs of one message (scheduler/record.py CLAIM, and RESUME for a job
whose earlier worker died), hand them to the runtime process together, return once every one has
ended.

The API puts every job it accepted in one short spell and routed to the same queue at the same
priority into one message (scheduler/queue.py): under load a message carries many jobs, and the
consumer pays its per-message costs (a BRPOP, kombu's unacknowledged-message bookkeeping, the
claim, the hand-over to the engine) once for all of them."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from scheduler import keys, record
from scheduler.jobs import Job
from workers.messages import Claimed
from workers.runtime_proc import RuntimeProcess


def register(app: Celery, client: redis.Redis, engine: RuntimeProcess, engine_name: str) -> None:
    claim = client.register_script(record.CLAIM)
    resume = client.register_script(record.RESUME)

    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The message carries the Jobs (JSON); Redis holds their authoritative state.
        specs = [Job.model_validate(job) for job in jobs]
        attempts = record.claim(claim, specs, engine.name, engine_name, engine.incarnation)
        claimed = []
        for spec, attempt in zip(specs, attempts, strict=True):
            if not attempt:  # cancelled while queued, or taken by another worker
                continue
            text, tokens = "", 0
            if attempt > 1:  # an earlier attempt's worker died: go on from what it streamed
                text, tokens = record.resume(resume, spec.id, attempt)
            claimed.append(Claimed(job=spec, attempt=attempt, resume_text=text, resume_tokens=tokens))
        done = {f.job_id: f for f in engine.run(claimed)} if claimed else {}
        return [
            {"id": d.job_id, "status": d.status.value, "tokens": d.completion_tokens}
            if (d := done.get(spec.id))
            else {"id": spec.id, "skipped": True}
            for spec in specs
        ]

    @app.task(name=keys.RUN_JOBS_TASK)
    def run_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return run(jobs)

    @app.task(name=keys.RUN_JOB_TASK)
    def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
        """A message of one job, as versions before batched messages sent."""
        return run([job])
