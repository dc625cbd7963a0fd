"""OpenAI's Batch API: POST /v1/batches, GET /v1/batches, GET /v1/batches/{batch_id},
POST /v1/batches/{batch_id}/cancel. A batch runs its input file's lines as ordinary jobs
(batch_runner.py), in whichever API process holds it (batch_runs.py); its record is
batch_store.py's. Like files, a batch is its key's alone.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from api.auth import Caller
from api.deps import ServicesDep
from api.openai.batch_runs import BatchRunsDep
from api.openai.batch_store import BatchRecord, new_batch_id
from api.openai.errors import ERRORS, ErrorResponse, OpenAIError, OpenAIRoute
from api.openai.protocol import Batch, BatchCreate, BatchList, BatchStatus
from api.webhooks import endpoint_for_job

WINDOW_S = 24 * 3600  # completion_window "24h"
RETRY_S = 60  # Retry-After when the key has as many batches as it may: one must end first

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

BATCH_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "No such batch of this key."},
}


CREATE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    429: {"model": ErrorResponse, "description": "The key has as many batches not ended as it may."},
}


@router.post("/batches", response_model=Batch, responses=CREATE_ERRORS)
async def create_batch(body: BatchCreate, services: ServicesDep, runs: BatchRunsDep, caller: Caller) -> Batch:
    """Run every line of an uploaded file (purpose `batch`) against `endpoint`."""
    source = await services.files.get(caller.id, body.input_file_id)
    if source is None or source.purpose != "batch":
        why = (
            f"No such File object: {body.input_file_id}"
            if source is None
            else "the file's purpose is not batch"
        )
        raise OpenAIError(400, why, "input_file_id")
    endpoint = await endpoint_for_job(services, caller, body.webhook) if body.webhook else None
    now = int(time.time())
    record = BatchRecord(
        id=new_batch_id(),
        owner=caller.id,
        endpoint=body.endpoint,
        input_file_id=source.id,
        created_at=now,
        expires_at=now + WINDOW_S,
        metadata=body.metadata,
        webhook=body.webhook,
        webhook_endpoint=endpoint,
    )
    try:
        open_batches = await runs.create(record, caller)
    except FileNotFoundError as e:  # deleted since it was looked up
        raise OpenAIError(400, f"No such File object: {body.input_file_id}", "input_file_id") from e
    if open_batches is not None:
        why = (
            f"this key has {open_batches} batches that have not ended (limit {runs.max_batches(caller)}: "
            "the key's max_batches or batches.per_key_max_batches); wait for one to end, or cancel one"
        )
        raise OpenAIError(429, why, code="batch_limit_reached", headers={"Retry-After": str(RETRY_S)})
    batch = await services.batches.get(caller.id, record.id)
    assert batch is not None
    return batch


async def owned_batch(services: ServicesDep, caller: Caller, batch_id: Annotated[str, Path()]) -> Batch:
    batch = await services.batches.get(caller.id, batch_id) if batch_id.startswith("batch_") else None
    if batch is None:
        raise OpenAIError(404, f"No such Batch object: {batch_id}", "batch_id")
    return batch


OwnedBatch = Annotated[Batch, Depends(owned_batch)]


@router.get("/batches/{batch_id}", response_model=Batch, responses=BATCH_ERRORS)
async def retrieve_batch(batch: OwnedBatch) -> Batch:
    return batch


@router.post("/batches/{batch_id}/cancel", response_model=Batch, responses=BATCH_ERRORS)
async def cancel_batch(batch: OwnedBatch, services: ServicesDep, caller: Caller) -> Batch:
    """validating or in_progress → cancelling: the run stops within a second, cancels the lines
    it is running, and ends `cancelled` with what was done in the output file. Otherwise as is."""
    await services.batches.move(batch.id, BatchStatus.CANCELLING)
    return await services.batches.get(caller.id, batch.id) or batch


@router.get("/batches", response_model=BatchList, responses=BATCH_ERRORS)
async def list_batches(
    services: ServicesDep,
    caller: Caller,
    after: Annotated[str | None, Query(description="A batch id: the page after it (`last_id`).")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """The caller's batches, newest first."""
    page = await services.batches.page(caller.id, after, limit)
    if page is None:
        raise OpenAIError(400, f"after: no batch {after!r} in this list", "after")
    return BatchList.of(*page)
