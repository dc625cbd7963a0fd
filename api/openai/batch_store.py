"""Batches' records in Redis: every change of one goes through BatchStore.

    keys.batch(id)            hash:
        record                BatchRecord JSON: what never changes (owner, endpoint, input, window...)
        status                a BatchStatus value; changed only by TRANSITION, from FROM[new] only
        <status>_at           unix seconds the batch entered that status (TRANSITION writes it)
        total                 lines in the input (set once, when validated)
        completed, failed     lines answered 200 / otherwise (HINCRBY as each line ends)
        output_file_id, error_file_id, errors    written once, before the terminal status
    keys.owner_batches(key)   the owner's listing: batch id → created (fractional)

Both live `limits.file_ttl_s` from creation, as long as the files they name.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, cast

import redis.asyncio as aioredis
from pydantic import BaseModel

from api.openai.protocol import Batch, BatchErrors, BatchRequestCounts, BatchStatus, Endpoint
from scheduler import keys

S = BatchStatus
FROM: dict[BatchStatus, tuple[BatchStatus, ...]] = {  # the state machine (BatchStatus draws it)
    S.IN_PROGRESS: (S.VALIDATING,),
    S.FAILED: (S.VALIDATING,),
    S.FINALIZING: (S.IN_PROGRESS,),
    S.COMPLETED: (S.FINALIZING,),
    S.EXPIRED: (S.IN_PROGRESS,),
    S.CANCELLING: (S.VALIDATING, S.IN_PROGRESS),
    S.CANCELLED: (S.CANCELLING,),
}

# KEYS[1] the batch; ARGV: the new status, now, then the statuses it may come from. → 1 if moved.
TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return 1
  end
end
return 0
"""


class BatchRecord(BaseModel):
    """What never changes of a batch."""

    id: str
    owner: str
    endpoint: Endpoint
    input_file_id: str
    completion_window: Literal["24h"] = "24h"
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


class BatchStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._transition = client.register_script(TRANSITION)

    async def create(self, record: BatchRecord, ttl_s: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        fields = {"record": record.model_dump_json(), "status": S.VALIDATING.value}
        fields["validating_at"] = str(record.created_at)
        pipe.hset(keys.batch(record.id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(keys.batch(record.id), ttl_s)
        pipe.zadd(keys.owner_batches(record.owner), {record.id: time.time()})
        pipe.expire(keys.owner_batches(record.owner), ttl_s)
        await pipe.execute()

    async def move(self, batch_id: str, to: BatchStatus) -> bool:
        """The batch → `to`, if it is in one of FROM[to]; False (nothing written) otherwise."""
        args = [to.value, int(time.time()), *(s.value for s in FROM[to])]
        return bool(await self._transition(keys=[keys.batch(batch_id)], args=args))

    async def status(self, batch_id: str) -> BatchStatus | None:
        raw = cast(str | None, await self.client.hget(keys.batch(batch_id), "status"))
        return BatchStatus(raw) if raw else None

    async def set_total(self, batch_id: str, total: int) -> None:
        await self.client.hset(keys.batch(batch_id), "total", total)

    async def count(self, batch_id: str, ok: bool) -> None:
        await self.client.hincrby(keys.batch(batch_id), "completed" if ok else "failed", 1)

    async def set_results(
        self, batch_id: str, output: str | None, errors_file: str | None, errors: BatchErrors | None
    ) -> None:
        fields = {"output_file_id": output, "error_file_id": errors_file}
        fields["errors"] = errors.model_dump_json() if errors else None
        if kept := {k: v for k, v in fields.items() if v is not None}:
            await self.client.hset(keys.batch(batch_id), mapping=kept)  # type: ignore[arg-type]

    async def get(self, owner: str, batch_id: str) -> Batch | None:
        """The batch as OpenAI shows it, if `owner` owns it."""
        fields = cast(dict[str, str], await self.client.hgetall(keys.batch(batch_id)))
        if not fields:
            return None
        record = BatchRecord.model_validate_json(fields["record"])
        if record.owner != owner:
            return None
        counts = BatchRequestCounts(**{k: int(fields.get(k, 0)) for k in ("total", "completed", "failed")})
        stamps = {f"{s.value}_at": int(fields[f"{s.value}_at"]) for s in S if f"{s.value}_at" in fields}
        stamps.pop("validating_at", None)  # OpenAI's object has created_at for it
        return Batch(
            **record.model_dump(exclude={"owner"}),
            **stamps,
            status=BatchStatus(fields["status"]),
            request_counts=counts,
            output_file_id=fields.get("output_file_id"),
            error_file_id=fields.get("error_file_id"),
            errors=BatchErrors.model_validate_json(fields["errors"]) if "errors" in fields else None,
        )

    async def page(self, owner: str, after: str | None, limit: int) -> tuple[list[Batch], bool] | None:
        """The owner's batches, newest first, after the batch `after`. → (batches, more follow);
        None when `after` is not in the listing."""
        listing = keys.owner_batches(owner)
        start = 0
        if after is not None:
            rank = await self.client.zrevrank(listing, after)
            if rank is None:
                return None
            start = int(cast(int, rank)) + 1
        ids = cast(list[str], await self.client.zrange(listing, start, start + limit, desc=True))
        found = [b for b in [await self.get(owner, i) for i in ids] if b is not None]
        return found[:limit], len(ids) > limit
