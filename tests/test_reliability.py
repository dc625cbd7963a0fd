"""No accepted job lost or answered twice: workers killed mid-generation, stale workers coming
back, jobs that kill every worker, Redis restarting under the service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest
import redis

from api.admission import Admission
from api.auth import ApiKey, Scope, create_key
from host.settings import LimitSettings
from localmoe.redis_server import RedisServer
from moe_core.engine import Delta, FinishReason
from scheduler import backlog, keys, record
from scheduler.jobs import Job, JobSpec, JobStatus, job_to_hash
from scheduler.queue import job_ids_in_queues, make_celery
from scheduler.registry import WorkerInfo
from scheduler.stream import Fence, token_fields
from scheduler.webhooks import WebhookEventType, make_delivery
from tests.conftest import _stop, bearer, private_stack, scratch_db, start_api, wait_done, wait_for
from workers.reaper import Reaper
from workers.relay import Held, Relay

pytestmark = pytest.mark.service  # workers, the API and Redis, killed and restarted

PROMPT = "def fibonacci(n):\n"


# --- the reaper and the fences, on Redis directly ------------------------------------------------


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with scratch_db(redis_server, 9) as c:
        yield c


def _running_job(client: redis.Redis, worker: str, incarnation: str, attempt: int) -> Job:
    job = Job(spec=JobSpec(prompt=PROMPT, max_tokens=8), status=JobStatus.RUNNING, attempt=attempt)
    job.worker = worker
    client.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
    client.hset(keys.running(worker), job.id, f"{incarnation} {attempt}")
    return job


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://:{kw['password']}@{kw['host']}:{kw['port']}/{kw['db']}"


def test_reaper_releases_a_backlog_count_whose_job_was_never_written(client: redis.Redis) -> None:
    """An API process killed between admitting a job (ADMIT: the backlog counts it) and writing
    its record (the Enqueuer's second round trip) answered nobody: the reaper releases that count
    at its second look that finds no record (a look: at most once a minute, here at every sweep),
    and leaves a written job's count alone."""
    app = make_celery(_url(client))
    admission = Admission(cast(Any, client), LimitSettings())
    caller = ApiKey(id="k", name="k", created_at=0)
    written = Job(spec=JobSpec(prompt=PROMPT, max_tokens=8))
    client.hset(keys.job(written.id), mapping=job_to_hash(written))  # type: ignore[arg-type]
    for job_id in (written.id, "never-written"):
        gate = admission.gate(job_id, 20, caller, 100.0)
        assert client.eval(backlog.ADMIT, len(gate.keys), *gate.keys, *gate.args) == [0]  # admitted
    assert client.hget(keys.QUEUED_COUNT, "*") == "2"
    seldom = Reaper(client, app, max_attempts=3, ttl_s=600)  # the default: once a minute
    assert seldom.sweep() == {} and seldom.sweep() == {}  # one look so far: not released
    reaper = Reaper(client, app, max_attempts=3, ttl_s=600, unwritten_every_s=0)
    assert reaper.sweep() == {}  # seen once: it may be an admission whose write is under way
    assert reaper.sweep() == {"unwritten": 1}
    assert client.hkeys(keys.QUEUED_JOBS) == [written.id]
    assert (client.hget(keys.QUEUED_COUNT, "*"), client.hget(keys.QUEUED_COUNT, "k")) == ("1", "1")
    assert client.hget(keys.QUEUED_TOKENS, "*") == "20"
    assert reaper.sweep() == {}


def test_reaper_requeues_jobs_of_a_dead_incarnation_only(client: redis.Redis) -> None:
    app = make_celery(_url(client))
    reaper = Reaper(client, app, max_attempts=3, ttl_s=600)
    alive = _running_job(client, "w1", "inc-live", 1)
    dead = _running_job(client, "w2", "inc-old", 1)
    restarted = _running_job(client, "w1", "inc-before-restart", 1)  # w1 came back as inc-live
    client.set(keys.lease("w1"), "inc-live")
    assert reaper.sweep() == {"requeued": 2}
    status = {
        j.id: json.loads(client.hget(keys.job(j.id), "status") or "null") for j in (alive, dead, restarted)
    }
    assert status == {alive.id: "running", dead.id: "queued", restarted.id: "queued"}
    assert client.hkeys(keys.running("w2")) == [] and client.hkeys(keys.running("w1")) == [alive.id]
    queued = [k for k in client.scan_iter(f"{keys.SHARED_QUEUE}*") if client.type(k) == "list"]
    assert sum(int(client.llen(k)) for k in queued) == 2  # sent again, on the shared queue
    assert reaper.sweep() == {}  # once
    app.close()


def test_a_message_lost_with_its_consumer_is_sent_again_when_that_incarnation_ends(
    client: redis.Redis,
) -> None:
    """A consumer killed between taking a message and claiming its job loses the message (the
    broker keeps no copy). When the reaper sees that incarnation end (the worker restarted under
    its name, or its lease gone), every queued job whose message is on no queue is sent again at
    that sweep, not record.WAITING_CHECK_S later; one whose message still waits is not sent twice."""
    app = make_celery(_url(client))
    reaper = Reaper(client, app, max_attempts=3, ttl_s=600)
    queue = keys.worker_queue("w7")
    waiting, taken, claimed = (Job(spec=JobSpec(prompt=PROMPT, max_tokens=8), queue=queue) for _ in range(3))
    claimed.status = JobStatus.RUNNING
    for job in (waiting, taken, claimed):
        client.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
        client.zadd(keys.WAITING, {job.id: time.time() + record.WAITING_CHECK_S})
    app.send_task(keys.RUN_JOBS_TASK, args=[[waiting.model_dump(mode="json")]], queue=queue, priority=1)
    # `taken`'s and `claimed`'s messages were popped by w7's consumer; it claimed one and died
    client.set(keys.lease("w7"), "first-life")
    client.zadd(keys.WORKERS, {"w7": time.time()})  # with its lease, as a heartbeat writes them
    assert reaper.sweep() == {}  # w7's incarnation seen: nothing ended yet
    assert job_ids_in_queues(client, ["w7"]) == {waiting.id}
    client.set(keys.lease("w7"), "second-life")  # w7 restarted
    assert reaper.sweep() == {"lost": 1}
    assert job_ids_in_queues(client, ["w7"]) == {waiting.id, taken.id}  # taken: on the shared queue now
    assert _messages(client) == 1
    assert reaper.sweep() == {}  # once
    client.delete(keys.lease("w7"))  # w7 gone for good: its messages still wait, none lost
    assert reaper.sweep() == {}
    app.close()


def _messages(client: redis.Redis) -> int:
    lists = [k for k in client.scan_iter(f"{keys.SHARED_QUEUE}*") if client.type(k) == "list"]
    return sum(int(client.llen(k)) for k in lists)


def test_a_reaper_killed_before_sending_is_finished_by_the_next_sweep(client: redis.Redis) -> None:
    app = make_celery(_url(client))
    job = _running_job(client, "w5", "dead", attempt=1)
    client.hset(keys.job(job.id), "status", '"queued"')  # requeued by a reaper that died right then
    assert Reaper(client, app, max_attempts=3, ttl_s=600).sweep() == {"requeued": 1}
    assert _messages(client) == 1 and client.hkeys(keys.running("w5")) == []
    app.close()


def test_a_claim_by_a_restarted_same_named_worker_is_not_forgotten(client: redis.Redis) -> None:
    app = make_celery(_url(client))
    job = _running_job(client, "w6", "first-life", attempt=1)
    reaper = Reaper(client, app, max_attempts=3, ttl_s=600)
    sent = reaper._send

    def send_then_claimed(j: Job) -> None:  # w6 restarts and claims the job before the reaper goes on
        sent(j)
        client.set(keys.lease("w6"), "second-life")
        client.hset(keys.job(j.id), mapping={"status": '"running"', "attempt": "2"})
        client.hset(keys.running("w6"), j.id, "second-life 2")

    reaper._send = send_then_claimed  # type: ignore[method-assign]
    assert reaper.sweep() == {"requeued": 1}
    assert client.hget(keys.running("w6"), job.id) == "second-life 2"  # the new claim is still known
    client.delete(keys.lease("w6"))  # and when w6 dies again, the job is reaped again
    assert Reaper(client, app, max_attempts=3, ttl_s=600).sweep() == {"requeued": 1}
    app.close()


def test_a_terminal_webhook_left_in_the_outbox_is_sent(client: redis.Redis) -> None:
    app = make_celery(_url(client))
    old = make_delivery("ep_1", "job-a", WebhookEventType.COMPLETED, {"id": "job-a"})
    old.created_at -= 60  # its process died before handing it over
    fresh = make_delivery("ep_1", "job-b", WebhookEventType.COMPLETED, {"id": "job-b"})  # in flight
    client.hset(
        keys.WEBHOOK_OUTBOX, mapping={"job-a": old.model_dump_json(), "job-b": fresh.model_dump_json()}
    )
    assert Reaper(client, app, max_attempts=3, ttl_s=600).sweep() == {"webhooks": 1}
    assert client.hkeys(keys.WEBHOOK_OUTBOX) == ["job-b"]
    (raw,) = [client.lindex(k, 0) for k in client.scan_iter(f"{keys.WEBHOOK_QUEUE}*")]
    assert old.webhook_id in (raw or "")  # the same id: a repeat at worst for the receiver
    app.close()


def test_a_job_queued_too_long_is_sent_again(client: redis.Redis) -> None:
    app = make_celery(_url(client))
    lost = Job(spec=JobSpec(prompt=PROMPT), timings={"queued_at": time.time() - 300})  # type: ignore[arg-type]
    done = Job(spec=JobSpec(prompt=PROMPT), status=JobStatus.SUCCEEDED)
    for j in (lost, done):
        client.hset(keys.job(j.id), mapping=job_to_hash(j))  # type: ignore[arg-type]
        client.zadd(keys.WAITING, {j.id: time.time() - 1})
    assert Reaper(client, app, max_attempts=3, ttl_s=600).sweep() == {"resent": 1}
    assert _messages(client) == 1  # the message a killed consumer lost, sent again
    assert client.zrange(keys.WAITING, 0, -1) == [lost.id]  # the finished one leaves the index
    assert client.zscore(keys.WAITING, lost.id) > time.time() + 250  # type: ignore[operator]  # backs off
    assert Reaper(client, app, max_attempts=3, ttl_s=600).sweep() == {}
    app.close()


def test_a_job_that_keeps_killing_workers_fails_with_the_reason(client: redis.Redis) -> None:
    app = make_celery(_url(client))
    job = _running_job(client, "w3", "gone", attempt=3)
    # its two runs before killed their workers too, and the engine seated this one
    client.hset(keys.job(job.id), mapping={"deaths": "2", "seated": "3"})
    assert Reaper(client, app, max_attempts=3, ttl_s=600).sweep() == {"failed": 1}
    fields = client.hgetall(keys.job(job.id))
    assert json.loads(fields["status"]) == "failed"
    assert "died under it on 3 attempts" in json.loads(fields["error"])
    (entry,) = client.xrange(keys.events(job.id))
    assert entry[1]["type"] == "done" and '"failed"' in entry[1]["data"]
    app.close()


def test_only_a_run_with_a_row_counts_against_max_attempts(client: redis.Redis) -> None:
    """A worker's death counts against limits.max_attempts only for the jobs its engine had given a
    row: seated (record.SEATED, which the torch engines send before the step) or with a token
    streamed by that attempt. One that only waited in the engine goes back to the queue, on
    whatever attempt; a token of an earlier attempt, or the resume mark of this one, is no run."""
    app = make_celery(_url(client))
    waited = _running_job(client, "w8", "gone", attempt=5)
    seated = _running_job(client, "w8", "gone", attempt=1)
    client.hset(keys.job(seated.id), "seated", "1")
    streamed = _running_job(client, "w8", "gone", attempt=2)
    client.xadd(keys.events(streamed.id), token_fields("x", attempt=2))
    before = _running_job(client, "w8", "gone", attempt=2)
    client.xadd(keys.events(before.id), token_fields("x", attempt=1))
    client.xadd(keys.events(before.id), {"type": "resume", "a": "2"})
    stale = _running_job(client, "w8", "gone", attempt=2)
    client.hset(keys.job(stale.id), "seated", "1")  # seated, but by its attempt before
    assert Reaper(client, app, max_attempts=1, ttl_s=600).sweep() == {"failed": 2, "requeued": 3}

    def status(job: Job) -> str:
        return str(json.loads(client.hget(keys.job(job.id), "status") or "null"))

    assert [status(j) for j in (waited, seated, streamed, before, stale)] == [
        "queued", "failed", "failed", "queued", "queued"
    ]  # fmt: skip
    assert client.hget(keys.job(waited.id), "deaths") is None
    app.close()


def test_a_stale_worker_cannot_finish_or_stream_over_a_newer_attempt(client: redis.Redis) -> None:
    job = _running_job(client, "w4", "new", attempt=2)
    relay = Relay(client, 600)  # the old worker's relay, still holding attempt 1
    stale = Held(job.model_copy(update={"attempt": 1}), attempt=1)
    relay.track(stale)
    relay._write_with_retry([[Delta(job.id, "", [], 4, 3, FinishReason.LENGTH)]])
    assert stale.future.done()  # fenced off: its final state is not written, its future still resolves
    assert json.loads(client.hget(keys.job(job.id), "status") or "") == "running"
    assert not [f for _, f in client.xrange(keys.events(job.id)) if f["type"] == "done"]
    # the stream as readers see it: attempt 1's tokens, the resume mark, attempt 2's, a late one of 1
    stream = [
        token_fields("a", 1, 1),
        token_fields("b", 1, 1),
        {"type": "resume", "a": "2"},
        token_fields("c", 1, 2),
        token_fields("STALE", 1, 1),
        token_fields("d", 1, 2),
    ]
    fence = Fence()
    seen = [e.text for f in stream if (e := fence.visible(f)) is not None]  # type: ignore[union-attr]
    assert "".join(seen) == "abcd"


def test_a_retried_relay_write_repeats_nothing(client: redis.Redis) -> None:
    """Redis ran a relay write but the reply was lost (it went down): the relay writes the same
    entries again. Readers (Fence) and the next attempt's RESUME see each entry once."""
    stream = keys.events("retried-write")
    client.delete(stream)
    entries = [token_fields("a", 1, 1, 1), token_fields("b", 2, 1, 2)]
    for fields in entries + entries + [token_fields("c", 1, 1, 3)]:  # the batch written twice
        client.xadd(stream, fields)  # type: ignore[arg-type]
    fence = Fence()
    seen = [e.text for _, f in client.xrange(stream) if (e := fence.visible(f)) is not None]  # type: ignore[union-attr]
    assert "".join(seen) == "abc"
    resumed = record.resume(client.register_script(record.RESUME), "retried-write", 2)
    assert resumed == {0: ("abc", 4, None)}
    client.delete(stream)


# --- a worker killed with SIGKILL mid-generation ------------------------------------------------


def _worker(env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "localmoe", "worker", "--name", name], env=env)


def _ready(client: redis.Redis, name: str) -> bool:
    raw = client.get(keys.worker(name))
    return raw is not None and WorkerInfo.model_validate_json(raw).ready


@pytest.mark.parametrize(("victim_process", "n"), [("consumer", 1), ("engine", 2)])
def test_a_killed_workers_job_finishes_elsewhere_with_one_result(
    service_env: dict[str, str], victim_process: str, n: int
) -> None:
    """A worker SIGKILLed mid-generation: its Celery consumer, or its engine process (which takes the
    runtime process and so the consumer down with it, exit code 70). A job of n sequences: the new
    attempt continues each of them."""
    with private_stack(service_env, worker=False, LOCALMOE_ENGINE__STEP_DELAY_S="0.02") as stack:
        procs = {n: _worker(stack.env, n) for n in ("alpha", "beta")}
        try:
            wait_for(lambda: all(_ready(stack.client, n) for n in procs), 120, "two workers")
            http = stack.http()
            body = {"prompt": PROMPT, "max_tokens": 300 // n, "ignore_eos": True, "n": n}  # 300 in all
            body |= {"temperature": 1.0} if n > 1 else {}  # sampled: each sequence its own text
            job = http.post("/v1/jobs", json=body).json()
            events: list[dict[str, object]] = []
            reader = threading.Thread(target=_read_sse, args=(stack.api, stack.admin_key, job["id"], events))
            reader.start()
            wait_for(lambda: len(events) >= 20, 30, "tokens to stream")
            victim = http.get(f"/v1/jobs/{job['id']}").json()["worker"]
            killed_at = time.monotonic()
            consumer = psutil.Process(procs[victim].pid)
            (runtime,) = [p for p in consumer.children() if p.name() == "lm-runtime"]
            (engine,) = [p for p in runtime.children() if p.name() == "lm-engine"]
            killed = consumer if victim_process == "consumer" else engine
            os.kill(killed.pid, signal.SIGKILL)  # mid-generation, no goodbye
            done = wait_done(http, job["id"], timeout=60)
            if victim_process == "engine":
                assert procs[victim].wait(10) == 70
            wait_for(lambda: not _alive(runtime) and not _alive(engine), 10, "the worker's processes to end")
            reader.join(30)
            assert done["status"] == "succeeded" and done["attempt"] == 2
            assert done["worker"] != victim
            assert time.monotonic() - killed_at < 30  # re-queued by the lease, not Celery's 1 h
            assert done["usage"]["completion_tokens"] == 300
            outputs = [o["text"] for o in done["outputs"]] if n > 1 else [done["output"]]
            tokens = [e for e in events if e["event"] == "token"]
            texts = ["".join(str(e["text"]) for e in tokens if e.get("index", 0) == k) for k in range(n)]
            assert texts == outputs  # what the client saw: no token twice, none missing
            assert [e["event"] for e in events].count("done") == 1
        finally:
            for p in procs.values():
                if p.poll() is None:
                    _stop(p)


def test_a_runtime_whose_consumer_dies_before_its_engine_is_warm_ends_with_its_engine(
    service_env: dict[str, str],
) -> None:
    """The consumer SIGKILLed while its runtime process is still starting the engine: the runtime's
    report of a warm engine finds no reader, and the runtime ends with every process of its group
    (the engine's). Before, it waited at exit for the engine process, which waited for its messages:
    both held their memory (a GPU's, on a GPU) for good."""
    with private_stack(service_env, worker=False) as stack:
        proc = _worker(stack.env, "gamma")
        consumer = psutil.Process(proc.pid)

        def runtimes() -> list[psutil.Process]:
            return [p for p in consumer.children() if p.name() == "lm-runtime"]

        wait_for(lambda: bool(runtimes()), 60, "the runtime process")
        (runtime,) = runtimes()
        os.kill(proc.pid, signal.SIGKILL)  # the engine is still loading
        proc.wait(10)

        def group() -> list[int]:  # the runtime's process group: it, the engine (and vLLM's core)
            alive = []
            for p in psutil.process_iter():
                try:
                    if os.getpgid(p.pid) == runtime.pid and _alive(p):
                        alive.append(p.pid)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    continue
            return alive

        wait_for(lambda: not _alive(runtime) and not group(), 60, "the runtime and its engine to end")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _read_sse(api: str, key: str, job_id: str, out: list[dict[str, object]]) -> None:
    with httpx.stream("GET", f"{api}/v1/jobs/{job_id}/events", headers=bearer(key), timeout=120) as r:
        event = ""
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                out.append({"event": event, **json.loads(line[5:])})


# --- Redis restarting under the service ------------------------------------------------------------


def test_redis_restart_loses_nothing(service_env: dict[str, str], tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    env = {**service_env, "LOCALMOE_REDIS_URL": server.url, "LOCALMOE_ENGINE__STEP_DELAY_S": "0.01"}
    client = redis.Redis.from_url(server.url, decode_responses=True)
    admin = create_key(client, "restart", Scope.ADMIN).secret
    worker = _worker(env, "phoenix")
    api: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: _ready(client, "phoenix"), 120, "the worker")
        api, url = start_api(env, admin)
        http = httpx.Client(base_url=url, headers=bearer(admin), timeout=30)
        long = http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}).json()
        events: list[dict[str, object]] = []
        reader = threading.Thread(target=_read_sse, args=(url, admin, long["id"], events))
        reader.start()
        wait_for(lambda: len(events) >= 5, 30, "tokens to stream")

        server.stop()  # SIGTERM: the AOF is flushed; every client loses its connection
        down = http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 8})
        assert down.status_code == 503 and down.headers["retry-after"] == "1", down.text  # not a 500
        server.start()

        done = wait_done(http, long["id"], timeout=90)
        reader.join(60)
        assert done["status"] == "succeeded"
        text = "".join(str(e["text"]) for e in events if e["event"] == "token")
        assert text == done["output"]  # the stream reader resumed without a gap or a repeat
        # the worker consumes again (celery#8030 would leave it deaf) and the API enqueues again
        after = [
            http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 8}).json()["id"] for _ in range(3)
        ]
        assert all(wait_done(http, i, timeout=60)["status"] == "succeeded" for i in after)
    finally:
        if api is not None:
            _stop(api)
        _stop(worker)
        client.close()
        server.stop()


def test_a_claim_whose_reply_was_lost_is_made_again_and_answered_the_same(client: redis.Redis) -> None:
    """Redis restarting under a claim (the fault injected at the script's seam): the claim is made
    again, and a call that ran but lost its reply answers what it did, so the job runs here once
    instead of waiting record.WAITING_CHECK_S (2 min) for the reaper to send it again."""
    queued = Job(spec=JobSpec(prompt=PROMPT, max_tokens=8))
    taken = _running_job(client, "w8", "someone-else", attempt=1)
    record.create(client, [queued], ttl_s=600)
    script = client.register_script(record.CLAIM)
    calls: list[str] = []

    def reply_lost(keys: list[str], args: list[str]) -> list[int]:
        out = cast(list[int], script(keys=keys, args=args))  # it ran...
        calls.append(keys[-1])
        if len(calls) == 1:
            raise redis.ConnectionError("Connection closed by server.")  # ...and its answer was lost
        return out

    naps: list[float] = []
    attempts = record.claim(reply_lost, [queued, taken], "w7", "torch", "inc-7", sleep=naps.append)  # type: ignore[arg-type]
    assert attempts == [1, 0] and len(calls) == 2 and calls[0] == calls[1] and naps == [0.1]
    assert client.hget(keys.job(queued.id), "attempt") == "1"  # claimed once
    assert client.hget(keys.running("w7"), queued.id) == "inc-7 1"
    assert record.claim(script, [queued], "w7", "torch", "inc-7") == [0]  # another call: taken already

    def down(keys: list[str], args: list[str]) -> list[int]:
        raise redis.ConnectionError("Connection refused.")

    later = Job(spec=JobSpec(prompt=PROMPT, max_tokens=8))
    record.create(client, [later], ttl_s=600)
    naps.clear()
    with pytest.raises(redis.ConnectionError):  # past retry_s the caller hears of it
        record.claim(down, [later], "w7", "torch", "inc-7", retry_s=1.0, sleep=naps.append)  # type: ignore[arg-type]
    assert naps == [0.1, 0.2, 0.4, 0.8] and client.hget(keys.job(later.id), "status") == '"queued"'
