"""The job record: every change of a job's state in Redis goes through this module.

A job's record is its hash keys.job(id) (every field JSON: scheduler/jobs.py) and its events
stream keys.events(id) (scheduler/stream.py), with the entries that say where the job is: the
backlog (scheduler/backlog.py), keys.WAITING, the queued-cost hash of the worker it was routed to
(keys.queued) and, while it runs, the running hash of the worker that claimed it (keys.running:
job id → "<incarnation> <attempt>"). Each transition is one Lua script here (or a Lua function
a caller's script composes), or for create and withdraw one Python function; the status values
in the Lua are rendered from JobStatus (`lua_json`), never typed by hand.

                  claim: attempt + 1           finalize: this attempt's
    create ──► QUEUED ─────────────────► RUNNING ──────────────────► SUCCEEDED | FAILED | CANCELLED
                │ │  ◄───────────────────  │ │
                │ │  requeue: its worker's │ └── requeue on the max_attempts-th run ──► FAILED
                │ │  lease lost            └──── cancel: flagged, its worker woken; the engine
                │ │                              aborts it within a step, finalize writes CANCELLED
                │ └── cancel ──► CANCELLED
                └──── withdraw ► FAILED (its message could not be sent)

transition   from → to                 caller              fenced on
create       → QUEUED                  scheduler/queue.py  a new id; written before its message
withdraw     QUEUED → FAILED           scheduler/queue.py  nothing: the API has not answered
                                                           with the id yet, no message exists
CLAIM        QUEUED → RUNNING          workers/runtime.py  status queued (a second claim gets 0,
                                                           one of a cancelled job CANCELLED_WHILE_QUEUED)
RESUME       RUNNING, attempt > 1      workers/runtime.py  the `resume` mark it appends
first_token  RUNNING (one timing)      workers/relay.py    nothing
SEATED       RUNNING (`seated`)        workers/relay.py    status running, the same attempt
finalize     RUNNING → terminal        workers/relay.py    status running, the same attempt
CANCEL       QUEUED → CANCELLED        api/store.py        status queued
             RUNNING (flag, wake-up)   api/store.py        status running
REQUEUE      RUNNING → QUEUED|FAILED   workers/reaper.py   the entry's incarnation without the
                                                           lease, status running, same attempt
FORGET       (running-hash entry)      workers/reaper.py   the entry unchanged

The backlog entry is written before create, at admission (backlog.ADMIT); CLAIM, CANCEL of a
queued job and withdraw release it. A terminal state is written once: finalize, CANCEL and
REQUEUE write one only from a non-terminal status, each with the stream's one `done` entry in
the same script (withdraw writes no `done`: it runs before the API answers with the id). Every
record gets the API's ttl when created, and again when a script ends it (its stream too). A job
whose worker died runs again as attempt n + 1: RESUME hands it the text the dead attempt
streamed, readers drop what an older attempt streams after the `resume` mark (Fence in
scheduler/stream.py), and the older attempt's finalize is fenced off.

A run is an attempt the engine gave a row: it streamed a token, or the engine said it seated it
(SEATED, which the torch engines send before the step that computes it). Only runs count against
max_attempts (the job's `deaths` field): a job that only waited in an engine whose worker died
cannot have killed it, and goes back to the queue however often that happens.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, NamedTuple, cast

import redis
from redis.commands.core import AsyncScript, Script

from scheduler import keys
from scheduler.backlog import RELEASE_KEYS, RELEASE_LUA
from scheduler.jobs import Job, JobStatus, encode_fields, job_to_hash
from scheduler.stream import FEED_KEYS, FEED_LUA, DoneEvent, done_fields

log = logging.getLogger(__name__)

WAITING_CHECK_S = 120.0  # a job still queued this long is sent again (workers/reaper.py)
TRIM_EVERY_S = 1.0  # stage_create: how often a listing is trimmed, given `trimmed`


def lua_json(value: str | bool) -> str:
    """`value` as a job hash stores it (its JSON), as a Lua string literal: '"queued"'."""
    encoded = json.dumps(value)
    assert "'" not in encoded and "\\" not in encoded, encoded
    return f"'{encoded}'"


QUEUED = lua_json(JobStatus.QUEUED)
RUNNING = lua_json(JobStatus.RUNNING)
FAILED = lua_json(JobStatus.FAILED)
CANCELLED = lua_json(JobStatus.CANCELLED)
ABORT = lua_json("abort")  # finish_reason of a cancelled job
ERROR = lua_json("error")  # finish_reason of a job failed by the reaper
TRUE = lua_json(True)

# --- create and withdraw (the API's Enqueuer) -----------------------------------------------------


def create(client: redis.Redis, jobs: Sequence[Job], ttl_s: int) -> None:
    """QUEUED: each job's hash (with its ttl), its listing entries, its WAITING entry (the reaper's
    safety net) and, when routed to one worker's queue, its cost in that worker's backlog; all in
    one pipeline. Each listing is trimmed of expired entries and its ttl renewed once per call."""
    pipe = client.pipeline(transaction=False)
    stage_create(pipe, jobs, ttl_s)
    pipe.execute()


def stage_create(
    pipe: redis.client.Pipeline,
    jobs: Sequence[Job],
    ttl_s: int,
    dumped: Sequence[dict[str, Any]] | None = None,
    trimmed: dict[str, float] | None = None,
) -> None:
    """create's writes, added to `pipe` (a caller that sends more in the same round trip).
    `dumped`: each job's model_dump(mode="json"), when the caller has them. `trimmed`: listing →
    when this caller last trimmed it and renewed its ttl, for a caller that writes many batches a
    second: it does that at most once per TRIM_EVERY_S per listing (an expired entry outlives its
    record by at most that long); without it, every call does."""
    now = time.time()
    listings: dict[str, dict[str, float]] = {keys.ALL_JOBS: {}}  # listing → job id → queued_at
    waiting: dict[str, float] = {}
    for i, job in enumerate(jobs):
        fields = job_to_hash(job, None if dumped is None else dumped[i])
        pipe.hset(keys.job(job.id), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(keys.job(job.id), ttl_s)
        at = job.timings.queued_at or now
        listings[keys.ALL_JOBS][job.id] = at
        if job.owner:
            listings.setdefault(keys.owner_jobs(job.owner), {})[job.id] = at
        waiting[job.id] = now + WAITING_CHECK_S
        routed = keys.worker_of_queue(job.queue)
        if routed is not None:  # the worker's backlog, until a claim removes it
            pipe.hset(keys.queued(routed), job.id, job.cost)
    # newest first in GET /v1/jobs; entries leave with their record
    for listing, entries in listings.items():
        pipe.zadd(listing, entries)
        if trimmed is not None:
            if now - trimmed.get(listing, 0.0) < TRIM_EVERY_S:
                continue
            if len(trimmed) > 10_000:  # bounded: one entry per key that submitted lately
                trimmed.clear()
            trimmed[listing] = now
        pipe.zremrangebyscore(listing, "-inf", now - ttl_s)
        pipe.expire(listing, ttl_s)
    pipe.zadd(keys.WAITING, waiting)


def withdraw(client: redis.Redis, release: Script, jobs: Sequence[Job], error: str) -> None:
    """QUEUED → FAILED for jobs whose message could not be sent (no worker can hold them), out of
    the backlog and their routed worker's. `release`: backlog.RELEASE registered on `client`.
    Not atomic: raises redis.RedisError midway, and a retry writes every job again."""
    fields = encode_fields({"status": JobStatus.FAILED.value, "error": error})
    for job in jobs:
        client.hset(keys.job(job.id), mapping=fields)  # type: ignore[arg-type]
        release(keys=RELEASE_KEYS, args=[job.id])
        routed = keys.worker_of_queue(job.queue)
        if routed is not None:
            client.hdel(keys.queued(routed), job.id)


# --- claim and resume (a worker's Celery task) ----------------------------------------------------

# KEYS: the backlog's QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS, this worker's running hash, WAITING,
# then per job: its hash, the queued-cost hash of the worker it was routed to; last, the call's
# claim_reply key. ARGV: worker, engine, started_at (all JSON), this worker's incarnation, then the job ids.
# → per job, the new attempt number, or 0 when the job is no longer queued (already taken, or
# ended), or -1 (CANCELLED_WHILE_QUEUED) when it was cancelled while queued: its message reached a
# worker after the cancel, and the worker reports it (scheduler/task_events.py). Either way it has
# left the queue: its cost leaves the routed
# worker's backlog and the admission counts. A claimed job is in the running hash until its
# finalize or its reaping. The last key is the call's keys.claim_reply: made again with the same
# key (its first reply lost), the script answers what the first call made of the jobs, where a
# plain second claim would find them running and answer 0.
CLAIM = (
    RELEASE_LUA
    + f"""
local reply = KEYS[#KEYS]
local earlier = redis.call('GET', reply)
if earlier then return cjson.decode(earlier) end
local out = {{}}
for i = 5, #ARGV do
  local id, job, routed = ARGV[i], KEYS[2 * i - 4], KEYS[2 * i - 3]
  redis.call('HDEL', routed, id)
  redis.call('ZREM', KEYS[5], id)
  release(KEYS[1], KEYS[2], KEYS[3], id)
  local status = redis.call('HGET', job, 'status')
  if status == {CANCELLED} then
    out[#out + 1] = -1
  elseif status ~= {QUEUED} then
    out[#out + 1] = 0
  else
    local attempt = tonumber(redis.call('HGET', job, 'attempt') or '0') + 1
    redis.call('HSET', job, 'status', {RUNNING}, 'worker', ARGV[1], 'engine', ARGV[2],
      'timings.started_at', ARGV[3], 'attempt', tostring(attempt))
    redis.call('HSET', KEYS[4], id, ARGV[4] .. ' ' .. attempt)
    out[#out + 1] = attempt
  end
end
redis.call('SET', reply, cjson.encode(out), 'EX', 60)
return out
"""
)

CANCELLED_WHILE_QUEUED = -1  # CLAIM's answer for a job cancelled before any worker claimed it
RESTARTING = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
CLAIM_RETRY_S = 60.0  # how long a claim is made again while Redis restarts


def claim(
    script: Script,
    jobs: Sequence[Job],
    worker: str,
    engine: str,
    incarnation: str,
    retry_s: float = CLAIM_RETRY_S,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """QUEUED → RUNNING for each of `jobs` still queued. `script`: CLAIM registered. → per job its
    new attempt number, 0 for a job not claimed here, CANCELLED_WHILE_QUEUED for one not claimed
    because it was cancelled while queued.

    While Redis restarts (connection refused or dropped, loading) the same call is made again for
    up to `retry_s` seconds: the message that brought these jobs is gone from the broker, and a job
    left queued would wait record.WAITING_CHECK_S for the reaper to send it again. A call that ran
    but whose reply was lost answers the same the second time (CLAIM's claim_reply). Other Redis
    errors, and an outage past `retry_s`, raise."""
    fields = encode_fields({"worker": worker, "engine": engine, "started_at": time.time()})
    job_keys = [*RELEASE_KEYS, keys.running(worker), keys.WAITING]
    for job in jobs:
        job_keys += [keys.job(job.id), keys.queued(keys.worker_of_queue(job.queue) or worker)]
    job_keys.append(keys.claim_reply(uuid.uuid4().hex))
    head = [fields["worker"], fields["engine"], fields["started_at"], incarnation]
    args = [*head, *(job.id for job in jobs)]
    delay, waited = 0.1, 0.0
    while True:
        try:
            return cast(list[int], script(keys=job_keys, args=args))
        except RESTARTING as e:
            if waited >= retry_s:
                raise
            log.warning("claiming %d jobs: Redis unavailable (%r); again in %.1f s", len(jobs), e, delay)
            sleep(delay)
            waited += delay
            delay = min(delay * 2, 2.0)


# KEYS: the job's events stream, FEED_KEYS. ARGV: the new attempt. Reads the text earlier attempts
# streamed (as readers saw it, scheduler/stream.py Fence) and appends the `resume` mark in one
# step, so a stale writer's later tokens fall behind the mark. → per sequence that streamed (entry
# field `i`, 0 without), four strings: its index, its text, its tokens, how it ended ("": it had not).
RESUME = (
    FEED_LUA
    + """
local current, last, seqs, order = 1, {}, {}, {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  if f.type == 'resume' then
    current = math.max(current, tonumber(f.a))
  elseif f.type == 'token' and tonumber(f.a or '1') >= current then
    local a, s = f.a or '1', tonumber(f.s or '0')
    if s == 0 or s > (last[a] or 0) then  -- s: an entry written again by a retried write is skipped
      last[a] = s
      local i = f.i or '0'
      local seq = seqs[i]
      if not seq then
        seq = {pieces = {}, n = 0, f = ''}
        seqs[i] = seq
        table.insert(order, i)
      end
      table.insert(seq.pieces, f.text)
      seq.n = seq.n + tonumber(f.n or '1')
      seq.f = f.f or seq.f
    end
  end
end
append(KEYS[1], {'type', 'resume', 'a', ARGV[1]})
publish()
local out = {}
for _, i in ipairs(order) do
  local seq = seqs[i]
  for _, v in ipairs({i, table.concat(seq.pieces), tostring(seq.n), seq.f}) do table.insert(out, v) end
end
return out
"""
)


class Resumed(NamedTuple):
    """What earlier attempts streamed of one sequence."""

    text: str
    tokens: int
    finish_reason: str | None  # how it ended; None: it had not


def resume(script: Script, job_id: str, attempt: int) -> dict[int, Resumed]:
    """Attempt `attempt` (> 1) takes over: → per sequence index that streamed anything, what it
    streamed (a job of one sequence: index 0). `script`: RESUME registered."""
    flat = cast(list[str], script(keys=[keys.events(job_id), *FEED_KEYS], args=[attempt]))
    runs = (flat[k : k + 4] for k in range(0, len(flat), 4))
    return {int(index): Resumed(text, int(tokens), finish or None) for index, text, tokens, finish in runs}


# --- the relay's writes (workers/relay.py RELAY composes these, after FEED_LUA) --------------------

# `first_token(job, at)`: stamps the job hash's first-token time (`at`: JSON seconds).
FIRST_TOKEN_LUA = """
local function first_token(job, at)
  redis.call('HSET', job, 'timings.first_token_at', at)
end
"""

# The job's scored prompt (Job.prompt_logprobs), written only by the attempt that owns the running
# job: a stale worker never writes, and a job gone (expired or deleted) is not made again. KEYS:
# the job hash; ARGV: the attempt (JSON), the field's JSON. → 1 written, 0 not.
PROMPT_LOGPROBS = f"""
if redis.call('HGET', KEYS[1], 'status') ~= {RUNNING} then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'prompt_logprobs', ARGV[2])
return 1
"""

# `finalize(job, events, running, outbox, attempt, ttl, done, hook, fields)`: the job's terminal
# state, written only if this attempt still owns the running job, so a stale worker can never
# overwrite a newer attempt or a terminal state, nor announce one. Arguments: the job hash, its
# events stream, the worker's running hash, the webhook outbox; the attempt (JSON), ttl seconds,
# the done event's data, the terminal webhook's Delivery JSON ("" for none), and the job's
# field/value pairs (a table). → 1 written, 0 fenced off. Uses FEED_LUA's `append`.
FINALIZE_LUA = f"""
local function finalize(job, events, running, outbox, attempt, ttl, done, hook, fields)
  if redis.call('HGET', job, 'status') ~= {RUNNING} then return 0 end
  if redis.call('HGET', job, 'attempt') ~= attempt then return 0 end
  local id = redis.call('HGET', job, 'id'):sub(2, -2)
  redis.call('HDEL', running, id)
  if hook ~= '' then redis.call('HSET', outbox, id, hook) end
  redis.call('HSET', job, unpack(fields))
  append(events, {{'type', 'done', 'data', done}})
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', events, ttl)
  return 1
end
"""


def finalize_operands(job: Job, attempt: int, hook: str) -> tuple[list[str], list[str]]:
    """`finalize`'s 4 keys, and its arguments after ttl: the attempt, the done event's data, `hook`
    (the terminal webhook's Delivery JSON, "" for none), k, then k field/value pairs: the terminal
    fields of `job` (status, output, finish_reason, error, usage, finished_at, logprobs and outputs
    if any)."""
    fields = encode_fields(
        {
            "status": job.status.value,
            "output": job.output,
            "finish_reason": job.finish_reason,
            "error": job.error,
            "usage": job.usage.model_dump(),
            "timings": {"finished_at": job.timings.finished_at},
            **({"logprobs": job.logprobs} if job.logprobs is not None else {}),
            **({"outputs": [o.model_dump() for o in job.outputs]} if job.outputs is not None else {}),
        }
    )
    job_keys = [keys.job(job.id), keys.events(job.id), keys.running(job.worker or ""), keys.WEBHOOK_OUTBOX]
    args = [str(attempt), done_fields(DoneEvent.of(job))["data"], hook, str(len(fields))]
    for k, v in fields.items():
        args += [k, v]
    return job_keys, args


# --- cancel (the API) -------------------------------------------------------------------------------

# KEYS: job hash, events stream, then the backlog's QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS, then
# FEED_KEYS.
# ARGV: now (JSON), ttl, done-event data for a queued job, cancel channel, job id. A queued job
# is cancelled here and now (and leaves the backlog); a running one is flagged and its worker
# woken (the engine drops it within one step and its finalize writes CANCELLED).
CANCEL = (
    FEED_LUA
    + RELEASE_LUA
    + f"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == {QUEUED} then
  release(KEYS[3], KEYS[4], KEYS[5], ARGV[5])
  redis.call('HSET', KEYS[1], 'status', {CANCELLED}, 'finish_reason', {ABORT},
    'cancel_requested', {TRUE}, 'timings.finished_at', ARGV[1])
  append(KEYS[2], {{'type', 'done', 'data', ARGV[3]}})
  publish()
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 'cancelled'
end
if status == {RUNNING} then
  redis.call('HSET', KEYS[1], 'cancel_requested', {TRUE})
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 'requested'
end
return 'terminal'
"""
)


class CancelOutcome(StrEnum):
    MISSING = "missing"
    CANCELLED = "cancelled"  # was queued: cancelled now
    REQUESTED = "requested"  # was running: the worker stops it within one step
    TERMINAL = "terminal"  # already finished


async def cancel(script: AsyncScript, job_id: str, ttl_s: int) -> CancelOutcome:
    """QUEUED → CANCELLED now; RUNNING: flagged, its worker woken. `script`: CANCEL registered."""
    done = DoneEvent(status=JobStatus.CANCELLED, finish_reason="abort")
    args: list[str | int] = [str(time.time()), ttl_s, done.model_dump_json(), keys.CANCEL_CHANNEL, job_id]
    job_keys = [keys.job(job_id), keys.events(job_id), *RELEASE_KEYS, *FEED_KEYS]
    return CancelOutcome(await script(keys=job_keys, args=args))


# --- requeue and forget (the reaper) ------------------------------------------------------------------

# KEYS: job hash, the dead worker's running hash, its lease, the job's events stream, FEED_KEYS.
# ARGV: job id, the running-hash entry ("<incarnation> <attempt>"), max attempts, now (JSON),
# ttl, done-event data and error (JSON) for a job that fails here.
# → 'alive' (the lease is that incarnation's), 'gone' (the job moved on), 'failed', 'requeued'.
# A requeued job keeps its running-hash entry until its new message is sent (the caller removes
# it then, FORGET): a reaper that dies in between leaves the entry, and the next sweep finds the
# job queued at the same attempt and sends it again. The death counts (`deaths` + 1, failed at max
# attempts) only if that attempt ran: seated (SEATED) or its stream's last entry is its token.
REQUEUE = (
    FEED_LUA
    + f"""
local function forget()  -- only the entry reaped: a same-named worker may have claimed it anew
  if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[1]) end
end
local incarnation, attempt = string.match(ARGV[2], '^(%S+) (%d+)$')
local function ran()  -- the engine gave this attempt a row
  if redis.call('HGET', KEYS[1], 'seated') == attempt then return true end
  local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]  -- RESUME's mark is no run
  if not last then return false end
  local f = {{}}
  for i = 1, #last[2] - 1, 2 do f[last[2][i]] = last[2][i + 1] end
  return f.type == 'token' and f.a == attempt
end
if redis.call('GET', KEYS[3]) == incarnation then return 'alive' end
local status = redis.call('HGET', KEYS[1], 'status')
local current = redis.call('HGET', KEYS[1], 'attempt')
if status == {QUEUED} and current == attempt then return 'requeued' end
if status ~= {RUNNING} or current ~= attempt then
  forget()
  return 'gone'
end
if ran() and redis.call('HINCRBY', KEYS[1], 'deaths', 1) >= tonumber(ARGV[3]) then
  forget()
  redis.call('HSET', KEYS[1], 'status', {FAILED}, 'finish_reason', {ERROR}, 'error', ARGV[7],
    'timings.finished_at', ARGV[4])
  append(KEYS[4], {{'type', 'done', 'data', ARGV[6]}})
  publish()
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[5])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', {QUEUED})
return 'requeued'
"""
)


def requeue(
    script: Script, job_id: str, worker: str, entry: str, max_attempts: int, ttl_s: int, error: str
) -> str:
    """RUNNING → QUEUED, or → FAILED with `error` on its max_attempts-th run, for a job in a
    running-hash entry of `worker` whose incarnation lost the lease. `script`: REQUEUE registered.
    → 'alive', 'gone', 'failed' or 'requeued' (see REQUEUE)."""
    done = done_fields(DoneEvent(status=JobStatus.FAILED, finish_reason="error", error=error))["data"]
    failure = encode_fields({"error": error})["error"]
    job_keys = [keys.job(job_id), keys.running(worker), keys.lease(worker), keys.events(job_id), *FEED_KEYS]
    args: list[str | int] = [job_id, entry, max_attempts, str(time.time()), ttl_s, done, failure]
    return cast(str, script(keys=job_keys, args=args))


# KEYS: job hashes; ARGV: each one's attempt. The engine gave these attempts a row: each job still
# running at that attempt gets `seated` (REQUEUE counts a death then).
SEATED = f"""
for i = 1, #KEYS do
  local job = KEYS[i]
  if redis.call('HGET', job, 'status') == {RUNNING} and redis.call('HGET', job, 'attempt') == ARGV[i] then
    redis.call('HSET', job, 'seated', ARGV[i])
  end
end
"""


def seated(script: Script, attempts: dict[str, int]) -> None:
    """Job id → the attempt the engine just gave a row (before it runs it). `script`: SEATED."""
    script(keys=[keys.job(job_id) for job_id in attempts], args=[str(a) for a in attempts.values()])


# KEYS: a running hash. ARGV: job id, the entry that was reaped. Deletes it only if unchanged: a
# worker restarted under the same name may have claimed the job again meanwhile (a new entry).
FORGET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


def forget(script: Script, worker: str, job_id: str, entry: str) -> None:
    """The requeued job's running-hash entry, once its new message is sent. `script`: FORGET."""
    script(keys=[keys.running(worker)], args=[job_id, entry])
