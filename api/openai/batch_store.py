"""Batches' records in Redis: every change of one goes through BatchStore.

    keys.batch(id)            hash:
        record                BatchRecord JSON: what never changes (owner, endpoint, input, window...)
        status                a BatchStatus value; changed only by TRANSITION, from FROM[new] only
        <status>_at           unix seconds the batch entered that status (TRANSITION writes it)
        total                 lines in the input (set once, when validated)
        completed, failed     lines answered 200 / otherwise (WRITE_LINE counts each line once)
        output_file_id, error_file_id, errors    written once, before the terminal status
    keys.batch_lines(id)      the ledger, custom_id → its result line (JSON), written once per line
                              (WRITE_LINE, only while in_progress or cancelling); the result files
                              are made from it; deleted with the terminal status
    keys.batch_lease(id)      the id of the run that holds the batch; expires unless renewed
    keys.OPEN_BATCHES         batch id → created_at while not terminal (TRANSITION removes it)
    keys.owner_open_batches(key)  the owner's batches that may be open (CREATE counts and prunes
                              it against OPEN_BATCHES: the limit on batches per key)
    keys.owner_batch_lines(key)   batch id → its lines in flight (TAKE_LINE / LINE_DONE: the
                              limit on lines in flight per key, whichever API processes run them)
    keys.owner_batches(key)   the owner's listing: batch id → created (fractional)

The record and listing live `limits.file_ttl_s` from creation, as long as the files they name; the
ledger as long as the record. A run that lost its lease (paused past it) may still write: a line
it writes that the new holder wrote first is dropped (HSETNX), and nothing is written once the
batch is terminal, so each custom_id is counted once and ends in one file once.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, cast

import redis.asyncio as aioredis
from pydantic import BaseModel

from api.openai.protocol import Batch, BatchErrors, BatchRequestCounts, BatchStatus, Endpoint
from scheduler import keys
from scheduler.webhooks import BatchWebhookSpec, Delivery

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

# KEYS: the batch, OPEN_BATCHES, the ledger, WEBHOOK_OUTBOX; ARGV: the new status, now, 1 if it is
# terminal, the batch's id, its webhook event (Delivery JSON) or "", then the statuses it may come
# from. → 1 if moved. A terminal batch leaves the open list and its ledger goes (its result files
# hold the lines now); its event enters the outbox with it (the sender takes it out once queued;
# the reaper sends what a dead process left there).
TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
for i = 6, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    if ARGV[3] == '1' then
      redis.call('ZREM', KEYS[2], ARGV[4])
      redis.call('DEL', KEYS[3])
    end
    if ARGV[5] ~= '' then
      redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])
    end
    return 1
  end
end
return 0
"""

WRITABLE = (S.IN_PROGRESS, S.CANCELLING)  # the statuses in which lines are written
LINES_TTL_S = 2 * 86_400  # an owner's lines-in-flight counts, untouched this long, are dropped

# KEYS: the batch, the ledger; ARGV: custom_id, the line, the count it adds to (completed | failed),
# then WRITABLE. → 1 if written, 0 if the line was there already or the batch takes no more lines.
WRITE_LINE = """
local current = redis.call('HGET', KEYS[1], 'status')
local writable = false
for i = 4, #ARGV do
  if current == ARGV[i] then writable = true end
end
if not writable or redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# The owner's open batches, counted (entries of batches that ended are dropped on the way); the
# batch is made, held by its first run, only if they are fewer than the owner's limit.
# KEYS: the batch, its lease, the owner's listing, OPEN_BATCHES, the owner's open batches;
# ARGV: the batch id, its record, the first status, created_at, ttl s, the run's id, the lease
# in ms, now (fractional), the limit. → {1 if made, the owner's open batches before it}
CREATE = """
local open = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if redis.call('ZSCORE', KEYS[4], id) then open = open + 1 else redis.call('ZREM', KEYS[5], id) end
end
if open >= tonumber(ARGV[9]) then
  return {0, open}
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'status', ARGV[3], ARGV[3] .. '_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {1, open}
"""

# A line of the batch may go if the owner's lines in flight (those of its open batches; the
# counts of batches that ended are dropped on the way) are fewer than the limit: counted in.
# KEYS: the owner's lines in flight, OPEN_BATCHES; ARGV: the batch id, the limit, ttl s. → 1 | 0
TAKE_LINE = """
local total = 0
local counts = redis.call('HGETALL', KEYS[1])
for i = 1, #counts, 2 do
  if redis.call('ZSCORE', KEYS[2], counts[i]) then
    total = total + tonumber(counts[i + 1])
  else
    redis.call('HDEL', KEYS[1], counts[i])
  end
end
if total >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] the owner's lines in flight; ARGV[1] the batch id. One of its lines ended (never below 0:
# a run that lost its lease may end lines after the next run started counting afresh).
LINE_DONE = """
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
end
return 0
"""

# KEYS[1] the lease; ARGV: the run's id, the lease in ms. → 1 if that run held it (now renewed).
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] the lease; ARGV[1] the run's id. Gives the lease up, if that run holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
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
    webhook: BatchWebhookSpec | None = None
    webhook_endpoint: str | None = None  # the registered endpoint `webhook.url` names (its id)


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


class BatchStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._create = client.register_script(CREATE)
        self._transition = client.register_script(TRANSITION)
        self._take_line = client.register_script(TAKE_LINE)
        self._line_done = client.register_script(LINE_DONE)
        self._write_line = client.register_script(WRITE_LINE)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    async def create(
        self, record: BatchRecord, ttl_s: int, run_id: str, lease_s: float, max_open: int
    ) -> int | None:
        """The batch, `validating`, held by the run `run_id` for `lease_s`, unless its owner has
        `max_open` batches that have not ended. → None when made, else how many the owner has."""
        names = [
            keys.batch(record.id),
            keys.batch_lease(record.id),
            keys.owner_batches(record.owner),
            keys.OPEN_BATCHES,
            keys.owner_open_batches(record.owner),
        ]
        args: list[str | int] = [
            record.id,
            record.model_dump_json(),
            S.VALIDATING.value,
            record.created_at,
            ttl_s,
            run_id,
            int(lease_s * 1000),
            repr(time.time()),  # fractional: batches made in the same second keep their order
            max_open,
        ]
        made, open_before = cast(list[int], await self._create(keys=names, args=args))
        return None if made else int(open_before)

    async def record(self, batch_id: str) -> BatchRecord | None:
        raw = cast(str | None, await self.client.hget(keys.batch(batch_id), "record"))
        return BatchRecord.model_validate_json(raw) if raw else None

    async def move(
        self, batch_id: str, to: BatchStatus, at: int | None = None, event: Delivery | None = None
    ) -> bool:
        """The batch → `to` at `at` (unix seconds; default now), if it is in one of FROM[to]
        (with `event` into the webhook outbox); False (nothing written) otherwise."""
        when = int(time.time()) if at is None else at
        outbox = event.model_dump_json() if event is not None else ""
        args = [to.value, when, int(to.terminal), batch_id, outbox, *(s.value for s in FROM[to])]
        names = [keys.batch(batch_id), keys.OPEN_BATCHES, keys.batch_lines(batch_id), keys.WEBHOOK_OUTBOX]
        return bool(await self._transition(keys=names, args=args))

    async def status(self, batch_id: str) -> BatchStatus | None:
        raw = cast(str | None, await self.client.hget(keys.batch(batch_id), "status"))
        return BatchStatus(raw) if raw else None

    async def started(self, batch_id: str) -> bool:
        """Whether the batch was ever in_progress (a cancel while validating: never)."""
        return bool(await self.client.hexists(keys.batch(batch_id), f"{S.IN_PROGRESS.value}_at"))

    async def set_total(self, batch_id: str, total: int) -> None:
        await self.client.hset(keys.batch(batch_id), "total", total)

    async def write_line(self, batch_id: str, custom_id: str, line: bytes, ok: bool) -> bool:
        """The line's result into the ledger, counted as completed (`ok`) or failed, unless it is
        there already or the batch is past taking lines. → whether it was written."""
        args = [custom_id, line, "completed" if ok else "failed", *(s.value for s in WRITABLE)]
        names = [keys.batch(batch_id), keys.batch_lines(batch_id)]
        return bool(await self._write_line(keys=names, args=args))

    async def written(self, batch_id: str) -> set[str]:
        """The custom_ids in the ledger."""
        return set(cast(list[str], await self.client.hkeys(keys.batch_lines(batch_id))))

    async def lines(self, batch_id: str, custom_ids: list[str]) -> list[str | None]:
        """The ledger's lines for these custom_ids (None where there is none)."""
        if not custom_ids:
            return []
        return cast(list[str | None], await self.client.hmget(keys.batch_lines(batch_id), custom_ids))

    async def set_results(
        self, batch_id: str, output: str | None, errors_file: str | None, errors: BatchErrors | None
    ) -> None:
        fields = {"output_file_id": output, "error_file_id": errors_file}
        fields["errors"] = errors.model_dump_json() if errors else None
        if kept := {k: v for k, v in fields.items() if v is not None}:
            await self.client.hset(keys.batch(batch_id), mapping=kept)  # type: ignore[arg-type]

    # --- the owner's lines in flight, across its batches and API processes ---------------------

    async def take_line(self, owner: str, batch_id: str, limit: int) -> bool:
        """A line of the batch may go (counted in) unless `owner` has `limit` lines in flight."""
        names = [keys.owner_batch_lines(owner), keys.OPEN_BATCHES]
        return bool(await self._take_line(keys=names, args=[batch_id, limit, LINES_TTL_S]))

    async def line_done(self, owner: str, batch_id: str) -> None:
        await self._line_done(keys=[keys.owner_batch_lines(owner)], args=[batch_id])

    async def clear_lines(self, owner: str, batch_id: str) -> None:
        """No line of the batch is in flight: a run starting (the lines a dead run had in flight
        count no more: the new run counts each again as it sends it) or ending a pass."""
        await self.client.hdel(keys.owner_batch_lines(owner), batch_id)

    # --- leases: which run holds a batch (batch_runs.py) --------------------------------------

    async def take(self, batch_id: str, run_id: str, lease_s: float) -> bool:
        """The lease for `run_id`, if nobody holds it."""
        lease = keys.batch_lease(batch_id)
        return bool(await self.client.set(lease, run_id, nx=True, px=int(lease_s * 1000)))

    async def renew(self, batch_id: str, run_id: str, lease_s: float) -> bool:
        """→ False when `run_id` no longer holds the lease (it expired; another run may hold it)."""
        return bool(await self._renew(keys=[keys.batch_lease(batch_id)], args=[run_id, int(lease_s * 1000)]))

    async def release(self, batch_id: str, run_id: str) -> None:
        await self._release(keys=[keys.batch_lease(batch_id)], args=[run_id])

    async def unheld(self) -> list[str]:
        """The open batches that no run holds, oldest first."""
        ids = cast(list[str], await self.client.zrange(keys.OPEN_BATCHES, 0, -1))
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for batch_id in ids:
            pipe.exists(keys.batch_lease(batch_id))
        return [i for i, held in zip(ids, await pipe.execute(), strict=True) if not held]

    async def open_ids(self) -> set[str]:
        return set(cast(list[str], await self.client.zrange(keys.OPEN_BATCHES, 0, -1)))

    async def forget(self, batch_id: str) -> None:
        """An open batch whose record expired (its window long past) leaves the open list."""
        await self.client.zrem(keys.OPEN_BATCHES, batch_id)

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
            **record.model_dump(exclude={"owner", "webhook", "webhook_endpoint"}),
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
