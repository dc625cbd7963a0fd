"""The Celery task: claim one job, hand it to the engine process, return once it has ended."""

from __future__ import annotations

import time
from typing import Any, cast

import redis
from celery import Celery

from scheduler import keys
from scheduler.backlog import RELEASE_KEYS, RELEASE_LUA
from scheduler.jobs import Job, encode_fields
from workers.engine_proc import EngineProcess

# KEYS: job hash, the queued-cost hash of the worker it was routed to (scheduler/keys.py), the
# backlog's QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS, this worker's running hash, WAITING.
# ARGV: worker, engine, started_at (all JSON), job id, this worker's incarnation.
# → the new attempt number, or 0 when the job is no longer queued (cancelled while waiting, or
# already taken). Either way it has left the queue: its cost leaves the routed worker's backlog
# and the admission counts. A claimed job is in the running hash until its final write or its
# reaping (workers/reaper.py).
CLAIM = (
    RELEASE_LUA
    + """
redis.call('HDEL', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[7], ARGV[4])
release(KEYS[3], KEYS[4], KEYS[5], ARGV[4])
if redis.call('HGET', KEYS[1], 'status') ~= '"queued"' then return 0 end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
redis.call('HSET', KEYS[1], 'status', '"running"', 'worker', ARGV[1], 'engine', ARGV[2],
  'timings.started_at', ARGV[3], 'attempt', tostring(attempt))
redis.call('HSET', KEYS[6], ARGV[4], ARGV[5] .. ' ' .. attempt)
return attempt
"""
)

# KEYS: the job's events stream. ARGV: the new attempt. Reads the text earlier attempts streamed
# (as readers saw it, scheduler/stream.py Fence) and appends the `resume` mark in one step, so a
# stale writer's later tokens fall behind the mark. → {text pieces..., "n:<tokens>"}.
RESUME = """
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
redis.call('XADD', KEYS[1], '*', 'type', 'resume', 'a', ARGV[1])
table.insert(out, 'n:' .. n)
return out
"""


def register(app: Celery, client: redis.Redis, engine: EngineProcess, engine_name: str) -> None:
    claim = client.register_script(CLAIM)
    resume = client.register_script(RESUME)

    @app.task(name=keys.RUN_JOB_TASK)
    def run_job(job: dict[str, Any]) -> dict[str, Any]:
        # The message carries the Job (JSON); Redis holds its authoritative state.
        spec = Job.model_validate(job)
        fields = encode_fields({"worker": engine.name, "engine": engine_name, "started_at": time.time()})
        routed = keys.worker_of_queue(spec.queue) or engine.name
        attempt = int(
            claim(
                keys=[
                    keys.job(spec.id),
                    keys.queued(routed),
                    *RELEASE_KEYS,
                    keys.running(engine.name),
                    keys.WAITING,
                ],
                args=[fields["worker"], fields["engine"], fields["started_at"], spec.id, engine.incarnation],
            )
        )
        if attempt == 0:  # cancelled while queued, or taken by another worker
            return {"id": spec.id, "skipped": True}
        text, tokens = "", 0
        if attempt > 1:  # an earlier attempt's worker died: go on from what it streamed
            *pieces, count = cast(list[str], resume(keys=[keys.events(spec.id)], args=[attempt]))
            text, tokens = "".join(pieces), int(count.removeprefix("n:"))
        done = engine.run(spec, attempt, text, tokens)
        return {"id": done.job_id, "status": done.status.value, "tokens": done.completion_tokens}
