"""How jobs reach a worker: the API puts the jobs it accepts at once into one Celery message per
queue and priority; a worker claims a message's jobs in one script and runs each exactly once."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from kombu.exceptions import OperationalError

from localmoe.redis_server import RedisServer
from scheduler import keys
from scheduler.jobs import Job, JobSpec, JobStatus, job_to_hash
from scheduler.queue import Enqueuer, make_celery, publishing_into
from tests.conftest import TERMINAL, bearer, private_stack, wait_for

PROMPT = "def fibonacci(n):\n"


def _messages(client: redis.Redis, queue: str) -> list[list[dict[str, object]]]:
    """The job lists of the Celery messages waiting on `queue` (every priority), oldest first."""
    out = []
    for name in (queue, f"{queue}:1", f"{queue}:2"):
        for raw in reversed(client.lrange(name, 0, -1)):  # kombu LPUSHes; consumers pop the tail
            message = json.loads(raw)
            assert message["headers"]["task"] == keys.RUN_JOBS_TASK
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            out.append(args[0])
    return out


def test_a_burst_goes_out_in_fewer_messages_than_jobs(service_env: dict[str, str]) -> None:
    """64 submissions at once, no worker: every job is in exactly one message, in fewer messages."""
    with private_stack(service_env, worker=False) as stack:

        def submit(i: int) -> str:
            with httpx.Client(base_url=stack.api, headers=bearer(stack.admin_key), timeout=30) as http:
                r = http.post("/v1/jobs", json={"prompt": f"{PROMPT}# {i}", "max_tokens": 4})
                assert r.status_code == 202, r.text
                return str(r.json()["id"])

        with ThreadPoolExecutor(64) as pool:
            ids = list(pool.map(submit, range(64)))
        messages = _messages(stack.client, keys.SHARED_QUEUE)
        sent = [job["id"] for message in messages for job in message]
        assert sorted(sent) == sorted(ids)  # each job once
        assert len(messages) < len(ids)
        for message in messages:  # a message's jobs share a queue and a priority
            assert len({(job["queue"], job["priority"]) for job in message}) == 1


def test_a_message_of_several_jobs_runs_each_once(service_env: dict[str, str]) -> None:
    """One message of three jobs, one of them cancelled while it waited; and a message of one job
    in the format of earlier versions: the live jobs run once each, the cancelled one stays so."""
    with private_stack(service_env, worker=True) as stack:
        client = stack.client
        jobs = [
            Job(spec=JobSpec(prompt=f"{PROMPT}# {i}", max_tokens=6), queue=keys.SHARED_QUEUE)
            for i in range(4)
        ]
        jobs[1].status = JobStatus.CANCELLED
        for job in jobs:
            client.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
        app = make_celery(stack.env["LOCALMOE_REDIS_URL"])
        try:
            dumped = [job.model_dump(mode="json") for job in jobs]
            app.send_task(keys.RUN_JOBS_TASK, args=[dumped[:3]], queue=keys.SHARED_QUEUE)
            app.send_task(keys.RUN_JOB_TASK, args=[dumped[3]], queue=keys.SHARED_QUEUE)  # an old message
        finally:
            app.close()

        def status(job: Job) -> str:
            return str(json.loads(client.hget(keys.job(job.id), "status") or '""'))

        wait_for(lambda: all(status(j) in TERMINAL for j in jobs), 60, "the jobs to finish")
        time.sleep(0.5)  # nothing more happens to them
        assert [status(j) for j in jobs] == ["succeeded", "cancelled", "succeeded", "succeeded"]
        for job in (jobs[0], jobs[2], jobs[3]):
            fields = client.hgetall(keys.job(job.id))
            assert json.loads(fields["attempt"]) == 1
            assert fields.get("seated") == "1"  # the engine named its run before computing it
            done = [e for _, e in client.xrange(keys.events(job.id)) if e["type"] == "done"]
            assert len(done) == 1
        assert client.hget(keys.job(jobs[1].id), "attempt") == "0"
        assert client.hget(keys.job(jobs[1].id), "seated") is None
        assert not client.exists(keys.events(jobs[1].id))
        assert not any(client.hgetall(k) for k in client.scan_iter(keys.running("*")))


def test_a_message_the_worker_cannot_read_leaves_it_serving(service_env: dict[str, str]) -> None:
    """A message whose job does not validate (another version's, say) is refused in the runtime
    process, which claims the jobs now: the job stays queued, the worker lives on and runs the
    next job."""
    with private_stack(service_env, worker=True) as stack:
        client = stack.client
        good = Job(spec=JobSpec(prompt=PROMPT, max_tokens=4), queue=keys.SHARED_QUEUE)
        bad = Job(spec=JobSpec(prompt=PROMPT, max_tokens=4), queue=keys.SHARED_QUEUE)
        for job in (good, bad):
            client.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
        unreadable = {**bad.model_dump(mode="json"), "spec": {"prompt": 42}}
        app = make_celery(stack.env["LOCALMOE_REDIS_URL"])
        try:
            app.send_task(keys.RUN_JOBS_TASK, args=[[unreadable]], queue=keys.SHARED_QUEUE)
            app.send_task(keys.RUN_JOBS_TASK, args=[[good.model_dump(mode="json")]], queue=keys.SHARED_QUEUE)
        finally:
            app.close()

        def status(job: Job) -> str:
            return str(json.loads(client.hget(keys.job(job.id), "status") or '""'))

        # the one worker, taking messages in order, ran the next one: it did not die on the first
        wait_for(lambda: status(good) == "succeeded", 60, "the readable job to run")
        assert status(bad) == "queued" and client.hget(keys.job(bad.id), "attempt") == "0"


def test_kombu_bookkeeping_shares_one_redis_client(redis_server: RedisServer) -> None:
    """Every publish asks the channel for a client; it gets the same one (kombu built a new
    redis.Redis per call), and a new one only when the channel's connection pool changes (after a
    reconnect)."""
    app = make_celery(redis_server.url)
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second and first.ping()
            channel._pool = None  # what kombu does when it drops its pools
            with channel.conn_or_acquire() as third:
                assert third is not first and third.connection_pool is channel.pool and third.ping()
    finally:
        app.close()


def test_messages_join_the_records_round_trip(redis_server: RedisServer) -> None:
    """Within publishing_into, a message is an LPUSH staged after what the pipeline holds: nothing
    reaches the queue until the pipeline runs, and then the record goes first (the Enqueuer's
    records and messages cost one round trip). A pipeline on another database is refused: its LPUSH
    would land where no worker reads."""
    app = make_celery(redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    other = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/5", decode_responses=True)
    queue = "localmoe.test-one-round-trip"
    job = Job(spec=JobSpec(prompt=PROMPT, max_tokens=4), queue=queue)
    try:
        with app.producer_or_acquire() as producer:
            pipe = client.pipeline(transaction=False)
            pipe.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
            with publishing_into(pipe):
                app.send_task(keys.RUN_JOBS_TASK, args=[[job.model_dump(mode="json")]], queue=queue,
                              priority=1, producer=producer, declare=[])  # fmt: skip
            assert _messages(client, queue) == [] and not client.exists(keys.job(job.id))
            replies = pipe.execute()
            assert replies[-1] == 1  # the LPUSH, after the record's HSET
            assert [m[0]["id"] for m in _messages(client, queue)] == [job.id]
            assert client.exists(keys.job(job.id))

            elsewhere = other.pipeline(transaction=False)
            with publishing_into(elsewhere), pytest.raises(ValueError, match="broker's Redis"):
                app.send_task(keys.RUN_JOBS_TASK, args=[[]], queue=queue, producer=producer, declare=[])
            app.send_task(keys.RUN_JOBS_TASK, args=[[]], queue=queue, priority=1, producer=producer)
            assert len(_messages(client, queue)) == 2  # outside the block: sent at once, as before
    finally:
        other.close()
        client.close()
        app.close()


def test_a_taken_message_leaves_no_copy_in_the_broker(redis_server: RedisServer) -> None:
    """No acknowledgement emulation: taking a message costs no bookkeeping round trip (kombu's
    would copy it into its `unacked` hash and index); LocalMoE's running hash, lease and WAITING
    set bring back the jobs of a worker that dies (tests/test_reliability.py)."""
    app = make_celery(redis_server.url)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    queue = "localmoe.test-no-unacked"
    try:
        app.send_task(keys.RUN_JOBS_TASK, args=[[]], queue=queue, priority=1)
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            message = channel.basic_get(queue, no_ack=False)
            assert message is not None and message.headers["task"] == keys.RUN_JOBS_TASK
            assert not client.exists("unacked") and not client.exists("unacked_index")
            message.ack()
            assert channel.basic_get(queue, no_ack=False) is None  # taken once, gone
    finally:
        client.close()
        app.close()


def test_the_enqueuer_outlives_a_broker_outage_mid_batch(tmp_path: Path) -> None:
    """The broker goes down as a message is sent (a fault injected at send_task) and comes back a
    second later: the request is answered with the error, its job is marked failed once Redis is
    back (not left to run after its client was told no), and the Enqueuer's thread serves on."""
    with RedisServer(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        app = make_celery(server.url)
        enqueuer = Enqueuer(app, client, ttl_s=600)
        real = app.send_task

        def outage(*args: object, **kwargs: object) -> None:
            server.stop()
            threading.Timer(1.0, server.start).start()
            raise OperationalError("Error 111 connecting: connection refused")

        try:
            app.send_task = outage  # type: ignore[method-assign]
            lost = Job(spec=JobSpec(prompt=PROMPT, max_tokens=4), queue=keys.SHARED_QUEUE)
            with pytest.raises(OperationalError):
                asyncio.run(asyncio.wait_for(enqueuer.submit(lost), 20))
            record = client.hgetall(keys.job(lost.id))
            assert json.loads(record["status"]) == "failed" and "could not enqueue" in record["error"]

            app.send_task = real  # type: ignore[method-assign]
            served = Job(spec=JobSpec(prompt=PROMPT, max_tokens=4), queue=keys.SHARED_QUEUE)
            asyncio.run(asyncio.wait_for(enqueuer.submit(served), 10))
            assert [job["id"] for message in _messages(client, keys.SHARED_QUEUE) for job in message] == [
                served.id
            ]
        finally:
            app.close()
            client.close()
