"""The worker's relay on a real Redis: a batch of engine steps is one RELAY script call that writes
what readers expect (scheduler/stream.py's token entries), stamps first tokens, and writes each
terminal state once, fenced on the attempt."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from localmoe.redis_server import RedisServer
from moe_core.engine import Delta, FinishReason
from scheduler import keys
from scheduler.jobs import Job, JobSpec, JobStatus, job_to_hash
from scheduler.stream import Fence, token_fields
from tests.conftest import scratch_db
from workers.relay import Held, Relay

TTL = 600


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with scratch_db(redis_server, 2) as c:
        yield c


def _held(client: redis.Redis, attempt: int, recorded_attempt: int | None = None) -> Held:
    """A job this worker claimed (attempt), whose record says `recorded_attempt` owns it."""
    job = Job(spec=JobSpec(prompt="def f(x):\n", max_tokens=8), status=JobStatus.RUNNING)
    job.worker, job.attempt = "w1", recorded_attempt or attempt
    client.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
    client.hset(keys.running("w1"), job.id, f"inc {job.attempt}")
    return Held(job.model_copy(update={"attempt": attempt}), attempt)


def test_a_batch_of_steps_is_written_as_readers_expect(client: redis.Redis) -> None:
    relay = Relay(client, TTL)
    a, b, stale = _held(client, 1), _held(client, 2), _held(client, 1, recorded_attempt=2)
    b.resumed_tokens, b.entries = 3, 2  # a second attempt that continues two earlier entries
    for held in (a, b, stale):
        relay.track(held)
    steps = [
        [
            Delta(a.job.id, "def", [5], 4, 1),
            Delta(b.job.id, "", [7], 4, 1),
            Delta(stale.job.id, "x", [1], 4, 1),
        ],
        [Delta(a.job.id, " g", [6], 4, 2), Delta(b.job.id, "é", [8], 4, 2)],
        [
            Delta(a.job.id, "", [2], 4, 3, FinishReason.STOP),
            Delta(stale.job.id, "", [], 4, 1, FinishReason.LENGTH),
        ],
    ]
    relay._write_with_retry(list(steps))  # what the relay thread does with steps that piled up

    entries = [fields for _, fields in client.xrange(keys.events(a.job.id))]
    assert entries[:2] == [token_fields("def", 1, 1, 1), token_fields(" g", 1, 1, 2)]
    assert entries[2]["type"] == "done" and json.loads(entries[2]["data"])["status"] == "succeeded"
    # b held its first token's text back: one entry carries both tokens, numbered after the earlier two
    assert [fields for _, fields in client.xrange(keys.events(b.job.id))] == [token_fields("é", 2, 2, 3)]
    assert 0 < client.ttl(keys.events(b.job.id)) <= TTL
    fence = Fence()
    seen = [fence.visible(f) for f in entries]
    assert "".join(e.text for e in seen if e is not None and e.type == "token") == "def g"  # type: ignore[union-attr]

    record = client.hgetall(keys.job(a.job.id))
    assert json.loads(record["status"]) == "succeeded" and json.loads(record["output"]) == "def g"
    assert json.loads(record["usage.completion_tokens"]) == 3
    first = json.loads(record["timings.first_token_at"])
    assert first == json.loads(client.hget(keys.job(b.job.id), "timings.first_token_at") or "0") > 0
    assert a.future.result().status is JobStatus.SUCCEEDED and not b.future.done()
    assert set(client.hkeys(keys.running("w1"))) == {b.job.id, stale.job.id}

    # the stale attempt's final was fenced off: its record is untouched, its future still resolves
    assert json.loads(client.hget(keys.job(stale.job.id), "status") or "") == "running"
    assert not [f for _, f in client.xrange(keys.events(stale.job.id)) if f["type"] == "done"]
    assert stale.future.result().status is JobStatus.SUCCEEDED  # what this attempt would have written
    assert set(relay.held) == {b.job.id}
