"""Intake and control of jobs: submit, poll, cancel."""

from __future__ import annotations

import hashlib
import math
import re
import time
from typing import Annotated, cast

from fastapi import APIRouter, Header, HTTPException, Query, Response

from api import metrics
from api.admission import Refused, Spare
from api.auth import ApiKey, Caller
from api.deps import JobDep, Services, ServicesDep
from api.protocol import JobPage, JobResponse, Refusal, refusals
from api.webhooks import endpoint_for_job
from moe_core import structured
from scheduler import keys
from scheduler.jobs import Job, JobSpec, JobStatus, Priority, Timings, Usage, batch_slots
from scheduler.modality import classify
from scheduler.prefix import block_hashes
from scheduler.record import CancelOutcome
from scheduler.routing import job_cost
from scheduler.webhooks import WebhookEventType, read_attempts_async

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=refusals(401))


def _unprocessable(field: str, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def _admit(spec: JobSpec, services: Services) -> list[int]:
    """Refuse what no engine could run; returns the prompt's token ids."""
    limit = services.settings.limits.max_tokens
    if spec.max_tokens > limit:
        raise _unprocessable(
            "max_tokens", f"max_tokens {spec.max_tokens} is above this server's limit of {limit}"
        )
    counter = services.counter
    prompt_ids = spec.prompt_token_ids if spec.prompt_token_ids is not None else counter.encode(spec.prompt)
    n = len(prompt_ids)
    if n >= counter.max_context:
        raise _unprocessable("prompt", f"prompt has {n} tokens; the model's context is {counter.max_context}")
    if n + spec.max_tokens > counter.max_context:
        raise _unprocessable(
            "max_tokens",
            f"prompt ({n} tokens) + max_tokens ({spec.max_tokens}) exceeds the model's context "
            f"of {counter.max_context}",
        )
    vocab = counter.vocab_size
    for field, ids in (
        ("prompt_token_ids", spec.prompt_token_ids or []),
        ("logit_bias", [int(t) for t in spec.logit_bias]),
        ("stop_token_ids", spec.stop_token_ids),
    ):
        if outside := [t for t in ids if t >= vocab]:
            raise _unprocessable(
                field, f"token ids {outside[:8]} are outside the model's vocabulary of {vocab}"
            )
    if (constraint := spec.constraint) is not None and (error := structured.check(*constraint)):
        field = "response_format" if spec.response_format is not None else "structured_outputs"
        raise _unprocessable(field, f"the structured-output spec cannot be used: {error}")
    return prompt_ids


async def accept(
    spec: JobSpec, caller: ApiKey, services: Services, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """The intake every submitting route shares: validate, admit, route, enqueue.
    → (the job, True when an earlier request with the same Idempotency-Key made it)."""
    ids = _admit(spec, services)
    prompt_tokens = len(ids)
    routing = services.settings.scheduler
    if spec.modality is not None:  # a stated modality skips detection
        modality, language = spec.modality, None
    else:
        detected = classify(spec.prompt)
        modality, language = detected.modality, detected.language
    job = Job(
        spec=spec,
        owner=caller.id,
        priority=spec.priority.capped(caller.max_priority),
        modality=modality,
        language=language,
        usage=Usage(prompt_tokens=prompt_tokens),
        timings=Timings(queued_at=time.time()),
        # n sequences: n rows of the batch, each prefilling the prompt
        cost=spec.n * job_cost(prompt_tokens, spec.max_tokens, routing.prefill_weight),
    )
    if spec.webhook is not None:
        job.webhook_endpoint = await endpoint_for_job(services, caller, spec.webhook)
    idem = await _claim_idempotency(services, caller, idempotency_key, spec, job.id)
    if idem is not None:
        return idem, True
    blocks = (
        block_hashes(ids, routing.prefix_block_size, routing.prefix_max_blocks)
        if routing.prefix_routing
        else []
    )
    chosen = services.scheduler.route(job, blocks)
    job.queue, job.route_reason = chosen.queue, chosen.reason
    if chosen.cached_tokens:  # the prefill it is spared there
        job.cost = spec.n * job_cost(
            prompt_tokens - chosen.cached_tokens, spec.max_tokens, routing.prefill_weight
        )
    spare = _spare(services) if job.priority is Priority.BATCH else None
    drain = services.scheduler.drain_tokens_per_s()
    gate = services.admission.gate(job.id, prompt_tokens + spec.n * spec.max_tokens, caller, drain, spare)
    try:
        await services.enqueuer.submit(job, gate, chosen.sent)
    except Refused as refusal:
        metrics.count_rejected(refusal)
        await forget_idempotency(services, caller, idempotency_key, job.id)
        raise
    except Exception as e:
        await services.admission.release(job.id)  # a no-op unless it was admitted
        await forget_idempotency(services, caller, idempotency_key, job.id)
        raise HTTPException(503, "the job queue is unavailable; try again") from e
    metrics.count_submitted(job)
    return job, False


def _spare(services: Services) -> Spare:
    """What the batch tier may fill: the fresh workers' batch slots less the reserve (at least one
    slot while any worker is there, none without), and its look-ahead beyond them."""
    capacity, workers = services.scheduler.fleet()
    if not capacity:
        return Spare(workers, 0)
    cfg = services.settings.scheduler
    slots = batch_slots(capacity, cfg.batch_reserve)
    return Spare(workers, slots, math.ceil(capacity * cfg.batch_lookahead))


_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


class KeyConflict(HTTPException):
    """409: the Idempotency-Key `key` names a job still being accepted (or never made: its request
    died taking the key) or was taken with another body. A request of several jobs (a list of
    prompts) holds one key per job: `key` says which."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(409, detail)
        self.key = key


def _idem_key(caller: ApiKey, idempotency_key: str) -> str:
    return keys.idempotency(caller.id, hashlib.sha256(idempotency_key.encode()).hexdigest())


async def _claim_idempotency(
    services: Services, caller: ApiKey, idempotency_key: str | None, spec: JobSpec, job_id: str
) -> Job | None:
    """None: go on and make `job_id` (this key is now taken by it, or there is no key). A job:
    the one an earlier request with this key and the same body made. 409 for another body."""
    if idempotency_key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise HTTPException(422, "Idempotency-Key must be 1 to 255 visible ASCII characters")
    body = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
    client = services.store.client
    name = _idem_key(caller, idempotency_key)
    ttl = services.settings.limits.idempotency_ttl_s
    while True:
        if await client.set(name, f"{job_id} {body}", nx=True, ex=ttl):
            return None
        earlier = cast(str | None, await client.get(name))
        if earlier is not None:
            break
        # the key was forgotten (or expired) between the two calls: take it again
    earlier_id, _, earlier_body = earlier.partition(" ")
    if earlier_body != body:
        raise KeyConflict(idempotency_key, "this Idempotency-Key was used with a different request body")
    job = await services.store.get(earlier_id)
    if job is None:
        raise KeyConflict(
            idempotency_key, "a request with this Idempotency-Key is still being accepted; retry"
        )
    return job


async def idempotent_job_id(services: Services, caller: ApiKey, idempotency_key: str) -> str | None:
    """The id of the job the caller's Idempotency-Key names (or is being accepted as), if any."""
    earlier = cast(str | None, await services.store.client.get(_idem_key(caller, idempotency_key)))
    return earlier.partition(" ")[0] if earlier else None


# KEYS: the idempotency key. ARGV: the job id it must name, the least age (s) its claim must
# have, the TTL it was set with (s). Deletes it only if it names that job and is that old
# (age = TTL set - TTL left): a claim of another request, or one still being accepted, stays.
FORGET = """
local value = redis.call('GET', KEYS[1])
if not value then return 1 end
if string.sub(value, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then return 0 end
if tonumber(ARGV[2]) > 0 and tonumber(ARGV[3]) - redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""


async def forget_idempotency(
    services: Services, caller: ApiKey, idempotency_key: str | None, job_id: str, older_than_s: float = 0
) -> bool:
    """The request that took the key for `job_id` was refused (or, for a batch's line, the key
    names a job that is gone or was never made): a request with the same key may go ahead.
    → whether the key is free now. Only the claim of `job_id` is forgotten (another request may
    have taken the key since), and only once it is `older_than_s` old: a claim younger than that
    may be an acceptance still under way in another process, whose job is about to exist."""
    if idempotency_key is None or not _IDEMPOTENCY_KEY.match(idempotency_key):
        return True
    script = services.store.client.register_script(FORGET)
    ttl = services.settings.limits.idempotency_ttl_s
    name = _idem_key(caller, idempotency_key)
    return bool(await script(keys=[name], args=[job_id, older_than_s, ttl]))


@router.post(
    "",
    status_code=202,
    response_model=JobResponse,
    responses={
        200: {"model": JobResponse, "description": "Replayed: an earlier request with this Idempotency-Key."},
        409: {"model": Refusal, "description": "The Idempotency-Key was used with another body."},
        429: {"model": Refusal, "description": "Rate limit or backlog full; see Retry-After."},
        **refusals(413, 422, 503),
    },
)
async def submit(
    spec: JobSpec,
    services: ServicesDep,
    caller: Caller,
    idempotency_key: Annotated[
        str | None, Header(description="Retry-safe submission: the same key and body give the same job.")
    ] = None,
) -> Response:
    job, replayed = await accept(spec, caller, services, idempotency_key)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    body = JobResponse.json_of(job)  # FastAPI would build and validate the model again first
    status = 200 if replayed else 202
    return Response(body, status_code=status, headers=headers, media_type="application/json")


@router.get("", response_model=JobPage, responses=refusals(403))
async def list_jobs(
    services: ServicesDep,
    caller: Caller,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Annotated[
        float | None, Query(allow_inf_nan=False, description="`next` of the previous page.")
    ] = None,  # NaN would reach Redis as a score bound: a 500
    everyone: Annotated[bool, Query(description="Admins: every key's jobs.")] = False,
) -> JobPage:
    """The caller's jobs, newest first, kept for `limits.job_ttl_s`."""
    if everyone and not caller.admin:
        raise HTTPException(403, "listing every key's jobs needs an admin key")
    jobs, after = await services.store.page(None if everyone else caller.id, status, limit, cursor)
    return JobPage(jobs=[JobResponse.of(j) for j in jobs], next=after)


@router.get("/{job_id}", response_model=JobResponse, responses=refusals(404))
async def poll(job: JobDep, services: ServicesDep) -> JobResponse:
    """The job, with its webhook delivery attempts when it has a webhook."""
    attempts = await read_attempts_async(services.store.client, job.id) if job.webhook_endpoint else []
    return JobResponse.of(job, attempts)


@router.delete(
    "/{job_id}",
    response_model=JobResponse,
    responses={202: {"model": JobResponse, "description": "Running: stop requested."}, **refusals(404)},
)
async def cancel(job: JobDep, services: ServicesDep, response: Response) -> JobResponse:
    """Queued: cancelled at once. Running: stopped within one decode step (202; poll for the
    final state). Finished: returned unchanged."""
    outcome = await services.store.cancel(job.id)
    if outcome is CancelOutcome.REQUESTED:
        response.status_code = 202
    current = await services.store.get(job.id) or job
    if outcome is CancelOutcome.CANCELLED:  # it never reached a worker: the API tells the webhook
        services.notifier.emit(current, WebhookEventType.CANCELLED, durable=True)
    return JobResponse.of(current)
