"""Jobs as Flower tasks (scheduler/task_events.py), at the relay's seam on a real Redis: what the
relay's script publishes, read by Celery's own EventReceiver into Celery's own State, as Flower
reads it. A terminal state shows only if its write was made."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.events import EventReceiver
from celery.events.state import State

from host.settings import FlowerSettings
from localmoe.redis_server import RedisServer
from moe_core.engine import Delta, FinishReason
from scheduler import keys, record
from scheduler.jobs import Job, JobSpec, JobStatus, Modality, Priority, job_to_hash
from scheduler.task_events import TASK_NAME
from tests.conftest import scratch_db, wait_for
from workers.relay import Held, Relay

DB = 3
NODE = "w1@box"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with scratch_db(redis_server, DB) as c:
        yield c


class Flowerish:
    """Celery's EventReceiver feeding Celery's State on a thread: what Flower runs."""

    def __init__(self, url: str) -> None:
        from localmoe.flower import celery_app

        self.app = celery_app(url)
        self.state = State()
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._receiver: EventReceiver | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        with self.app.connection() as conn:
            self._receiver = EventReceiver(conn, handlers={"*": self._on_event}, app=self.app)
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.state.event(event)

    def stop(self) -> None:
        assert self._receiver is not None
        self._receiver.should_stop = True  # seen within a second (kombu's safety interval)
        self._thread.join(5)


@pytest.fixture
def flower(redis_server: RedisServer, client: redis.Redis) -> Iterator[Flowerish]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    f = Flowerish(url)
    # the receiver subscribes asynchronously: until a probe arrives, an event could be missed
    probe = Relay(client, 600, node="probe@box")
    wait_for(lambda: _probed(probe, f), 10, "the receiver to subscribe")
    yield f
    f.stop()


def _probed(relay: Relay, flower: Flowerish) -> bool:
    relay.cancelled_while_queued([Job(spec=JobSpec(prompt="probe"))])
    relay._write_with_retry([relay._inbox.get()])
    return any(e["hostname"] == "probe@box" for e in list(flower.events))


def _mine(flower: Flowerish) -> list[dict[str, Any]]:
    """The events of this test's relay (a probe's may still arrive)."""
    return [e for e in list(flower.events) if e["hostname"] == NODE]


def _held(client: redis.Redis, prompt: str, attempt: int = 1, recorded_attempt: int | None = None) -> Held:
    job = Job(
        spec=JobSpec(prompt=prompt, max_tokens=8),
        status=JobStatus.RUNNING,
        modality=Modality.CODE,
        priority=Priority.HIGH,
        queue=keys.worker_queue("w1"),
    )
    job.worker, job.attempt = "w1", recorded_attempt or attempt
    client.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
    client.hset(keys.running("w1"), job.id, f"inc {job.attempt}")
    return Held(job.model_copy(update={"attempt": attempt}), attempt)


def test_each_job_is_a_task_in_its_real_terminal_state(client: redis.Redis, flower: Flowerish) -> None:
    relay = Relay(client, 600, node=NODE, flower=FlowerSettings(prompt_chars=8))
    ok, bad, stopped = (_held(client, f"def job_{i}(x):\n") for i in range(3))
    stale = _held(client, "def stale():", recorded_attempt=2)  # a newer attempt owns it
    for held in (ok, bad, stopped, stale):
        relay.track(held)
    relay._write_with_retry(
        [
            [Delta(ok.job.id, "return", [5], 6, 1), Delta(stopped.job.id, "x", [1], 6, 1)],
            [
                Delta(ok.job.id, " x", [6], 6, 2, FinishReason.STOP),
                Delta(stopped.job.id, "", [], 6, 1, FinishReason.ABORT),
                Delta(stale.job.id, "", [1], 6, 1, FinishReason.LENGTH),
            ],
        ]
    )
    relay.fail(bad.job.id, "engine error: out of memory")
    relay._write_with_retry([relay._inbox.get()])

    tasks = flower.state.tasks
    wait_for(lambda: len(_mine(flower)) == 11, 10, "the events")
    assert {tasks[h.job.id].state for h in (ok, bad, stopped, stale)} == {
        "SUCCESS",
        "FAILURE",
        "CANCELLED",
        "STARTED",  # its finalize was fenced off: no terminal event, as no terminal write
    }
    done = tasks[ok.job.id]
    assert (done.state, done.name, done.worker.hostname) == ("SUCCESS", TASK_NAME, NODE)
    assert done.args == "['def job_…']" and done.routing_key == "localmoe.worker.w1"
    assert "'modality': 'code'" in done.kwargs and "'priority': 'high'" in done.kwargs
    assert "'completion_tokens': 2" in done.result and done.runtime is not None and done.runtime >= 0
    assert done.received is not None and done.started is not None and done.succeeded is not None
    failed = tasks[bad.job.id]
    assert (failed.state, failed.exception) == ("FAILURE", "engine error: out of memory")
    assert tasks[stopped.job.id].state == "CANCELLED" and "'abort'" in tasks[stopped.job.id].result
    assert len(_mine(flower)) == 11  # 4 × received and started, 3 terminal states (one message per write)


def test_redacted_prompts_and_events_off(client: redis.Redis, flower: Flowerish) -> None:
    secret = "the launch code is 0000"
    relay = Relay(client, 600, node=NODE, flower=FlowerSettings(redact_prompts=True))
    hidden = _held(client, secret)
    relay.track(hidden)
    relay.flower = FlowerSettings(task_events=False)  # a config change while it runs: nothing more
    quiet = _held(client, secret)
    relay.track(quiet)
    relay._write_with_retry([[Delta(h.job.id, "x", [1], 3, 1, FinishReason.STOP) for h in (hidden, quiet)]])
    wait_for(lambda: hidden.job.id in flower.state.tasks, 10, "the events")
    assert flower.state.tasks[hidden.job.id].args == f"['<redacted: {len(secret)} characters>']"
    assert not any(secret in str(e) for e in _mine(flower))
    assert quiet.job.id not in flower.state.tasks and hidden.future.done() and quiet.future.done()


def test_a_job_cancelled_while_queued_is_reported_by_the_worker_that_takes_its_message(
    client: redis.Redis, flower: Flowerish
) -> None:
    job = Job(spec=JobSpec(prompt="def never(x):"), queue=keys.SHARED_QUEUE)
    record.create(client, [job], 600)
    client.hset(
        keys.job(job.id),
        "status",
        job_to_hash(job.model_copy(update={"status": JobStatus.CANCELLED}))["status"],
    )
    claim = client.register_script(record.CLAIM)
    assert record.claim(claim, [job], "w1", "torch", "inc") == [record.CANCELLED_WHILE_QUEUED]
    relay = Relay(client, 600, node=NODE)
    relay.cancelled_while_queued([job])
    relay._write_with_retry([relay._inbox.get()])
    wait_for(lambda: job.id in flower.state.tasks, 10, "the events")
    task = flower.state.tasks[job.id]
    assert (task.state, task.worker.hostname, task.name) == ("CANCELLED", NODE, TASK_NAME)
