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
from scheduler import keys, record
from scheduler.jobs import Job, JobSpec, JobStatus, job_from_hash, job_to_hash
from scheduler.stream import Fence, SequenceToken, sequence_token_fields, token_fields
from tests.conftest import scratch_db
from workers.relay import Held, HeldSequence, Relay, sequence_id
from workers.runtime import work_in_flight

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


def test_the_work_in_flight_counts_each_prompt_until_its_first_token(client: redis.Redis) -> None:
    """What the heartbeat tells the router (workers/runtime.py): the tokens held jobs may still make,
    plus the prompts still to prefill; the relay counts a prompt as prefilled at its first token."""
    relay = Relay(client, TTL)
    long, short = _held(client, 1), _held(client, 1)
    long.job.usage.prompt_tokens, short.job.usage.prompt_tokens = 4000, 100
    for held in (long, short):
        relay.track(held)
    assert work_in_flight([long, short], 0.0625) == 8 + 250 + 8 + 6.25
    relay._write_with_retry([[Delta(long.job.id, "def", [5], 4000, 1)]])
    assert relay.prefilled == 4000  # and not again at its next token
    relay._write_with_retry([[Delta(long.job.id, " g", [6], 4000, 2)]])
    assert relay.prefilled == 4000
    assert work_in_flight([long, short], 0.0625) == 6 + 8 + 6.25


def test_a_scored_prompt_is_in_the_record_before_the_first_token(client: redis.Redis) -> None:
    """The prompt's logprobs go to the job record before the write of its first token entry (a
    reader that saw one finds them); a resumed attempt keeps the prompt's part of what it scored;
    a stale attempt writes none, nor does a job whose record is gone."""
    relay = Relay(client, TTL)
    first, resumed, stale, gone = (
        _held(client, 1),
        _held(client, 2),
        _held(client, 1, recorded_attempt=2),
        _held(client, 1),
    )
    resumed.resumed_tokens = 2
    resumed.job.usage.prompt_tokens = 2
    client.delete(keys.job(gone.job.id))
    scored = [[3, None, [], None], [9, -1.5, [[9, -1.5]], 1], [4, -0.5, [], 1]]
    for held in (first, resumed, stale, gone):
        relay.track(held)
    relay._write_with_retry(
        [[Delta(h.job.id, "x", [5], 3, 1, prompt_logprobs=scored) for h in (first, resumed, stale, gone)]]
    )  # fmt: skip
    assert json.loads(client.hget(keys.job(first.job.id), "prompt_logprobs") or "") == scored
    assert job_from_hash(client.hgetall(keys.job(first.job.id))).prompt_logprobs == scored
    assert json.loads(client.hget(keys.job(resumed.job.id), "prompt_logprobs") or "") == scored[:2]
    assert json.loads(client.hget(keys.job(stale.job.id), "prompt_logprobs") or "") is None  # null
    assert client.hget(keys.job(gone.job.id), "prompt_logprobs") is None
    relay._write_with_retry([[Delta(first.job.id, "", [2], 3, 2, FinishReason.STOP)]])
    assert first.future.result().prompt_logprobs == scored  # the terminal webhook's job carries them


def test_a_job_of_n_sequences_streams_each_and_ends_with_its_last(client: redis.Redis) -> None:
    """n > 1: each sequence's entries name it (and its last says how it ended), numbered together;
    the job ends once every sequence has, its usage their sum, its record each one's output; a new
    attempt learns each sequence's text and end (RESUME)."""
    relay = Relay(client, TTL)
    held = _held(client, 1)
    held.job.spec.n, held.job.spec.logprobs = 2, 0
    held.sequences = [HeldSequence(0), HeldSequence(1)]
    relay.track(held)
    one, two = sequence_id(held.job.id, 0), sequence_id(held.job.id, 1)
    relay._write_with_retry(
        [[Delta(one, "a", [5], 4, 1, logprobs=[(5, -0.5, ())]), Delta(two, "b", [6], 4, 1)]]
    )
    # a batch of sequence entries alone (no first token, no terminal state) is written too
    relay._write_with_retry([[Delta(one, "", [2], 4, 2, FinishReason.STOP, logprobs=[(2, -0.1, ())])]])
    assert not held.future.done() and set(relay.sequences) == {two}
    relay._write_with_retry([[Delta(two, " c", [7], 4, 2), Delta(two, "", [], 4, 2, FinishReason.LENGTH)]])

    stream = [fields for _, fields in client.xrange(keys.events(held.job.id))]
    lp = [[5, -0.5, []]]
    assert stream[:-1] == [
        sequence_token_fields(token_fields("a", 1, 1, 1, lp), 0, None),
        sequence_token_fields(token_fields("b", 1, 1, 2), 1, None),
        sequence_token_fields(token_fields("", 1, 1, 3, [[2, -0.1, []]]), 0, "stop"),
        sequence_token_fields(token_fields(" c", 1, 1, 4), 1, None),
        sequence_token_fields(token_fields("", 0, 1, 5), 1, "length"),
    ]
    fence = Fence()
    seen = [e for f in stream if isinstance(e := fence.visible(f), SequenceToken)]
    assert [(e.index, e.text, e.finish_reason) for e in seen] == [
        (0, "a", None),
        (1, "b", None),
        (0, "", "stop"),
        (1, " c", None),
        (1, "", "length"),
    ]
    done = json.loads(stream[-1]["data"])
    assert done["status"] == "succeeded" and done["usage"]["completion_tokens"] == 4
    job = job_from_hash(client.hgetall(keys.job(held.job.id)))
    assert job.outputs is not None and job.output == "a" and job.finish_reason == "stop"
    assert [(o.index, o.text, o.finish_reason, o.logprobs) for o in job.outputs] == [
        (0, "a", "stop", [[5, -0.5, []], [2, -0.1, []]]),
        (1, "b c", "length", []),
    ]
    assert held.future.result().model_dump(mode="json")["outputs"] == job.model_dump(mode="json")["outputs"]
    assert not relay.held and not relay.sequences
    resumed = record.resume(client.register_script(record.RESUME), held.job.id, 2)
    assert resumed == {0: ("a", 2, "stop"), 1: ("b c", 2, "length")}


def test_a_cancelled_sequence_cancels_the_job_and_a_failed_one_fails_it(client: redis.Redis) -> None:
    relay = Relay(client, TTL)
    cancelled, failed = _held(client, 1), _held(client, 1)
    for held in (cancelled, failed):
        held.job.spec.n = 2
        held.sequences = [HeldSequence(0), HeldSequence(1)]
        relay.track(held)
    steps = [
        Delta(sequence_id(cancelled.job.id, 0), "x", [3], 4, 1, FinishReason.STOP),
        Delta(sequence_id(cancelled.job.id, 1), "", [], 4, 0, FinishReason.ABORT),
        Delta(sequence_id(failed.job.id, 0), "y", [3], 4, 1),
    ]
    relay._write_with_retry([steps])
    relay.fail(sequence_id(failed.job.id, 1), "engine error: boom")
    relay._write_with_retry([relay._inbox.get()])
    assert cancelled.future.result().status is JobStatus.CANCELLED
    assert cancelled.future.result().finish_reason == "abort"
    job = failed.future.result()
    assert job.status is JobStatus.FAILED and job.error == "engine error: boom"
    assert job.outputs is not None and [o.text for o in job.outputs] == ["y", ""]
    assert not relay.held and not relay.sequences
