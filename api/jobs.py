"""Intake and control of jobs: submit, poll, cancel."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Response

from api.deps import JobDep, ServicesDep
from api.protocol import JobResponse
from api.store import CancelOutcome
from scheduler.jobs import Job, JobSpec, Timings, Usage
from scheduler.modality import classify
from scheduler.routing import job_cost

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _unprocessable(field: str, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def _admit(spec: JobSpec, services: ServicesDep) -> int:
    """Refuse what no engine could run; returns the prompt's token count."""
    limit = services.settings.limits.max_tokens
    if spec.max_tokens > limit:
        raise _unprocessable(
            "max_tokens", f"max_tokens {spec.max_tokens} is above this server's limit of {limit}"
        )
    counter = services.counter
    n = counter.count(spec.prompt)
    if n >= counter.max_context:
        raise _unprocessable("prompt", f"prompt has {n} tokens; the model's context is {counter.max_context}")
    if n + spec.max_tokens > counter.max_context:
        raise _unprocessable(
            "max_tokens",
            f"prompt ({n} tokens) + max_tokens ({spec.max_tokens}) exceeds the model's context "
            f"of {counter.max_context}",
        )
    return n


@router.post("", status_code=202, response_model=JobResponse)
async def submit(spec: JobSpec, services: ServicesDep, response: Response) -> JobResponse:
    prompt_tokens = _admit(spec, services)
    if spec.modality is not None:  # a stated modality skips detection
        modality, language = spec.modality, None
    else:
        detected = classify(spec.prompt)
        modality, language = detected.modality, detected.language
    job = Job(
        spec=spec,
        modality=modality,
        language=language,
        usage=Usage(prompt_tokens=prompt_tokens),
        timings=Timings(queued_at=time.time()),
        cost=job_cost(prompt_tokens, spec.max_tokens, services.settings.scheduler.prefill_weight),
    )
    chosen = services.scheduler.route(job)
    job.queue, job.route_reason = chosen.queue, chosen.reason
    try:
        await services.enqueuer.submit(job)
    except Exception as e:
        raise HTTPException(503, "the job queue is unavailable; try again") from e
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobResponse.of(job)


@router.get("/{job_id}", response_model=JobResponse)
async def poll(job: JobDep) -> JobResponse:
    return JobResponse.of(job)


@router.delete("/{job_id}", response_model=JobResponse)
async def cancel(job: JobDep, services: ServicesDep, response: Response) -> JobResponse:
    """Queued: cancelled at once. Running: stopped within one decode step (202; poll for the
    final state). Finished: returned unchanged."""
    outcome = await services.store.cancel(job.id)
    if outcome is CancelOutcome.REQUESTED:
        response.status_code = 202
    current = await services.store.get(job.id) or job
    return JobResponse.of(current)
