"""The Celery task: claim one job, hand it to the engine process, return once it has ended."""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery

from scheduler import keys
from scheduler.backlog import RELEASE_KEYS, RELEASE_LUA
from scheduler.jobs import Job, encode_fields
from workers.engine_proc import EngineProcess

# KEYS: job hash, the queued-cost hash of the worker it was routed to (scheduler/keys.py), then
# the backlog's QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS. ARGV: worker, engine, started_at (all
# JSON), job id. → the new attempt number, or 0 when the job is no longer queued (cancelled while
# waiting, or already taken). Either way it has left the queue: its cost leaves the routed
# worker's backlog and the admission counts.
CLAIM = (
    RELEASE_LUA
    + """
redis.call('HDEL', KEYS[2], ARGV[4])
release(KEYS[3], KEYS[4], KEYS[5], ARGV[4])
if redis.call('HGET', KEYS[1], 'status') ~= '"queued"' then return 0 end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
redis.call('HSET', KEYS[1], 'status', '"running"', 'worker', ARGV[1], 'engine', ARGV[2],
  'timings.started_at', ARGV[3], 'attempt', tostring(attempt))
return attempt
"""
)


def register(app: Celery, client: redis.Redis, engine: EngineProcess, engine_name: str) -> None:
    claim = client.register_script(CLAIM)

    @app.task(name=keys.RUN_JOB_TASK)
    def run_job(job: dict[str, Any]) -> dict[str, Any]:
        # The message carries the Job (JSON); Redis holds its authoritative state.
        spec = Job.model_validate(job)
        fields = encode_fields({"worker": engine.name, "engine": engine_name, "started_at": time.time()})
        routed = keys.worker_of_queue(spec.queue) or engine.name
        attempt = int(
            claim(
                keys=[keys.job(spec.id), keys.queued(routed), *RELEASE_KEYS],
                args=[fields["worker"], fields["engine"], fields["started_at"], spec.id],
            )
        )
        if attempt == 0:  # cancelled while queued, or taken by another worker
            return {"id": spec.id, "skipped": True}
        done = engine.run(spec, attempt)
        return {"id": done.job_id, "status": done.status.value, "tokens": done.completion_tokens}
