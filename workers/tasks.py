"""The Celery task: claim the jobs of one message, hand them to the runtime process together,
return once every one has ended.

The API puts every job it accepted in one short spell and routed to the same queue at the same
priority into one message (scheduler/queue.py): under load a message carries many jobs, and the
consumer pays its per-message costs (a BRPOP, kombu's unacknowledged-message bookkeeping, the
claim, the hand-over to the engine) once for all of them."""

from __future__ import annotations

import time
from typing import Any, cast

import redis
from celery import Celery

from scheduler import keys
from scheduler.backlog import RELEASE_KEYS, RELEASE_LUA
from scheduler.jobs import Job, encode_fields
from scheduler.stream import FEED_KEYS, FEED_LUA
from workers.messages import Claimed
from workers.runtime_proc import RuntimeProcess

# KEYS: the backlog's QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS, this worker's running hash, WAITING,
# then per job: its hash, the queued-cost hash of the worker it was routed to (scheduler/keys.py).
# ARGV: worker, engine, started_at (all JSON), this worker's incarnation, then the job ids.
# → per job, the new attempt number, or 0 when the job is no longer queued (cancelled while
# waiting, or already taken). Either way it has left the queue: its cost leaves the routed
# worker's backlog and the admission counts. A claimed job is in the running hash until its final
# write or its reaping (workers/reaper.py).
CLAIM = (
    RELEASE_LUA
    + """
local out = {}
for i = 5, #ARGV do
  local id, job, routed = ARGV[i], KEYS[2 * i - 4], KEYS[2 * i - 3]
  redis.call('HDEL', routed, id)
  redis.call('ZREM', KEYS[5], id)
  release(KEYS[1], KEYS[2], KEYS[3], id)
  if redis.call('HGET', job, 'status') ~= '"queued"' then
    out[#out + 1] = 0
  else
    local attempt = tonumber(redis.call('HGET', job, 'attempt') or '0') + 1
    redis.call('HSET', job, 'status', '"running"', 'worker', ARGV[1], 'engine', ARGV[2],
      'timings.started_at', ARGV[3], 'attempt', tostring(attempt))
    redis.call('HSET', KEYS[4], id, ARGV[4] .. ' ' .. attempt)
    out[#out + 1] = attempt
  end
end
return out
"""
)

# KEYS: the job's events stream, FEED_KEYS. ARGV: the new attempt. Reads the text earlier attempts streamed
# (as readers saw it, scheduler/stream.py Fence) and appends the `resume` mark in one step, so a
# stale writer's later tokens fall behind the mark. → {text pieces..., "n:<tokens>"}.
RESUME = (
    FEED_LUA
    + """
local current, n, out, last = 1, 0, {}, {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  if f.type == 'resume' then
    current = math.max(current, tonumber(f.a))
  elseif f.type == 'token' and tonumber(f.a or '1') >= current then
    local a, s = f.a or '1', tonumber(f.s or '0')
    if s == 0 or s > (last[a] or 0) then  -- s: an entry written again by a retried write is skipped
      last[a] = s
      table.insert(out, f.text)
      n = n + tonumber(f.n or '1')
    end
  end
end
append(KEYS[1], {'type', 'resume', 'a', ARGV[1]})
publish()
table.insert(out, 'n:' .. n)
return out
"""
)


def register(app: Celery, client: redis.Redis, engine: RuntimeProcess, engine_name: str) -> None:
    claim = client.register_script(CLAIM)
    resume = client.register_script(RESUME)

    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The message carries the Jobs (JSON); Redis holds their authoritative state.
        specs = [Job.model_validate(job) for job in jobs]
        fields = encode_fields({"worker": engine.name, "engine": engine_name, "started_at": time.time()})
        job_keys = [*RELEASE_KEYS, keys.running(engine.name), keys.WAITING]
        for spec in specs:
            job_keys += [keys.job(spec.id), keys.queued(keys.worker_of_queue(spec.queue) or engine.name)]
        head = [fields["worker"], fields["engine"], fields["started_at"], engine.incarnation]
        attempts = cast(list[int], claim(keys=job_keys, args=[*head, *(spec.id for spec in specs)]))
        claimed = []
        for spec, attempt in zip(specs, attempts, strict=True):
            if not attempt:  # cancelled while queued, or taken by another worker
                continue
            text, tokens = "", 0
            if attempt > 1:  # an earlier attempt's worker died: go on from what it streamed
                stream_keys = [keys.events(spec.id), *FEED_KEYS]
                *pieces, count = cast(list[str], resume(keys=stream_keys, args=[attempt]))
                text, tokens = "".join(pieces), int(count.removeprefix("n:"))
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
