"""The Celery side every process shares: one app configured for LocalMoE's guarantees, and the
API's Enqueuer, which records jobs (scheduler/record.py create) and sends their messages.

The API only sends (`send_task` by name, so it never imports worker code); workers register the
task in workers/tasks.py on an app made here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu import Queue
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from scheduler import backlog, keys, record
from scheduler.jobs import Job
from scheduler.prefix import PrefixIndex, Sent

log = logging.getLogger(__name__)

_INTO = threading.local()  # .pipe: the pipeline this thread's messages join (publishing_into)


@contextlib.contextmanager
def publishing_into(pipe: redis.client.Pipeline) -> Iterator[None]:
    """Messages this thread publishes in the block become LPUSHes added to `pipe`, sent when its
    owner executes it, after the commands staged before them: no round trip of their own. `pipe`
    must be on the broker's Redis (same server and database)."""
    _INTO.pipe = pipe
    try:
        yield
    finally:
        _INTO.pipe = None


class _QoS(virtual.QoS):
    # Closing a channel would put the messages it holds back on their queues. LocalMoE needs no
    # such restore: the reaper re-queues the jobs of a worker that is gone (workers/reaper.py) and
    # sends again a job still queued after record.WAITING_CHECK_S, and claiming a job twice is a
    # no-op.
    restore_at_shutdown = False


class _Channel(kombu_redis.Channel):
    # No acknowledgement emulation. kombu's Redis transport emulates AMQP's acks by copying every
    # message it delivers into an "unacked" hash and index (a MULTI round trip on the consumer's
    # event loop per message, another per ack) and putting back what stays unacknowledged past the
    # visibility timeout (one hour). LocalMoE's own records already do that job, faster: a claimed
    # job is in its worker's running hash under a 10 s lease (the reaper re-queues it), and a job
    # whose message was taken but never claimed stays in WAITING, sent again after
    # record.WAITING_CHECK_S. Measured on the H200 at 1,000 one-job messages/s, the bookkeeping was
    # a quarter of the consumer's samples, all on the loop that takes messages one after another.
    ack_emulation = False
    _shared: redis.Redis | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.QoS = _QoS  # type: ignore[assignment]  # kombu sets virtual.QoS here; its stub says redis's

    @contextlib.contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        # kombu builds a new redis.Redis for every call that brings no client: each publish, and
        # the unacknowledged-message bookkeeping of every message consumed (twice). Its constructor
        # (a table of some 200 response callbacks) cost 65 µs on 2 cores, ~12 % of a consumer's
        # time under one-job messages. One client over the channel's pool serves every such call
        # (redis-py clients are thread-safe: a command takes a pool connection while it runs); a
        # new pool (after the channel reconnects) gets a new one.
        if client is not None:
            yield client
            return
        shared = self._shared
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared = self._create_client()
        yield shared

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        # kombu's _put, into the caller's pipeline within publishing_into (queues with an expiry
        # and kombu's own publish batches keep kombu's way)
        pipe = getattr(_INTO, "pipe", None)
        if pipe is None or "_publish_batch" in kwargs or (self._expires and queue in self._expires):
            super()._put(queue, message, **kwargs)
            return
        if _where(pipe.connection_pool) != _where(self.pool):
            raise ValueError("publishing_into: the pipeline is not on the broker's Redis")
        priority = self._get_message_priority(message, reverse=False)
        pipe.lpush(self._q_for_pri(queue, priority), dumps(message))


def _where(pool: redis.ConnectionPool) -> tuple[object, ...]:
    """The server and database a connection pool's connections reach."""
    kw = pool.connection_kwargs
    return kw.get("path") or kw.get("host"), kw.get("port"), int(kw.get("db") or 0)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport, without its acknowledgement emulation (see _Channel)."""

    Channel = _Channel


PRIORITY_STEPS = [0, 1, 2, 3]  # Celery message priorities: Priority.rank (scheduler/jobs.py)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold `queue`'s messages: one per priority step (kombu's names)."""
    return [queue, *(f"{queue}:{step}" for step in PRIORITY_STEPS[1:])]


def job_ids_in_queues(client: redis.Redis, workers: Iterable[str]) -> set[str]:
    """The ids of the jobs whose messages wait on the shared queue and on these workers' own.
    O(messages waiting): for the reaper, after a worker died."""
    names = [n for q in [keys.SHARED_QUEUE, *map(keys.worker_queue, workers)] for n in queue_lists(q)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.lrange(name, 0, -1)
    return {job_id for messages in pipe.execute() for raw in messages for job_id in _job_ids(raw)}


def _job_ids(raw: str | bytes) -> list[str]:
    """The job ids one message (kombu's JSON envelope, Celery's body in base64) carries: RUN_JOBS'
    list of jobs or RUN_JOB's one; [] for a message of another kind."""
    try:
        message = loads(raw)
        args = loads(base64.b64decode(message["body"]))[0]
        jobs = args[0] if message["headers"]["task"] == keys.RUN_JOBS_TASK else [args[0]]
        return [str(job["id"]) for job in jobs]
    except (ValueError, KeyError, IndexError, TypeError):
        return []


def make_celery(broker_url: str) -> Celery:
    app = Celery("localmoe", broker=broker_url, set_as_current=False)
    app.conf.update(
        # JSON only, both ways: a pickle message is refused, never executed.
        broker_transport=f"{__name__}:Transport",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Results live in the job's Redis record, not in a Celery backend.
        task_ignore_result=True,
        # A message is acknowledged once its jobs' terminal states are written, so a worker takes
        # from the broker no more messages than it has task threads (prefetch counts what is not
        # yet acknowledged). A worker that dies mid-job: its jobs come back through the reaper
        # (see _Channel: the broker itself keeps no copy).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=keys.SHARED_QUEUE,
        task_queues=[Queue(keys.SHARED_QUEUE)],
        # Priorities: each queue is one Redis list per step, and a consumer pops every queue's
        # step 0 before any step 1 (kombu's Redis transport; 0 is the most urgent).
        broker_transport_options={
            "queue_order_strategy": "priority",
            "priority_steps": PRIORITY_STEPS,
            "sep": ":",
        },
        task_default_priority=1,
        task_create_missing_queues=True,
        task_send_sent_event=False,  # an extra publish per message: 0.9-1.2k vs 2.1-3.1k apply_async/s
        # Celery's task events describe messages of up to 64 jobs, "succeeded" whatever became of
        # them; Flower's task view gets one task per job from the relays (scheduler/task_events.py).
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


WITHDRAW_S = 15.0  # how long the Enqueuer retries marking unsent jobs failed while Redis is down
MAX_JOBS_PER_MESSAGE = 64  # a message of 64 jobs is ~60 kB; one worker thread holds it until all end


@dataclass(frozen=True)
class Admit:
    """A job's admission (scheduler/backlog.py ADMIT), decided in the Enqueuer's batch: the
    script's KEYS and ARGV, and `refusal(reply)`: the error that refuses the job, None if admitted."""

    keys: list[str]
    args: list[Any]
    refusal: Callable[[list[int]], Exception | None]


class Enqueuer:
    """Admits jobs, writes job records and sends job messages from one thread, in batches.

    Per request, the API only hands the job over and awaits the outcome. The thread takes every
    job waiting, admits those that ask for it (one pipeline of ADMIT scripts: a refused job's
    request gets its refusal, and nothing of it is written), then in ONE more round trip writes all
    the admitted jobs' records (with, given `prefixes`, the prompt blocks each was routed with:
    scheduler/prefix.py) followed by ONE message per queue and priority among them (at most
    MAX_JOBS_PER_MESSAGE jobs each; Celery builds it, its LPUSH joins the records' pipeline:
    publishing_into): Redis runs a pipeline's commands in order, so the record of a job exists
    before any worker can receive its message, and a burst costs two round trips, not two per job.
    The requests are answered with one wake-up of their event loop per batch. `client` is on the
    broker's Redis (make_celery with its URL). Measured on 2 cores: a Celery message costs its
    sender ~0.2 ms of CPU and its consumer a BRPOP; Celery's send_task from 64 request threads at
    once took 83 ms, one after another 25 ms; the per-request asyncio Redis write was the API's
    largest cost.
    """

    def __init__(
        self, app: Celery, client: redis.Redis, ttl_s: int, prefixes: PrefixIndex | None = None
    ) -> None:
        self.app = app
        self.client = client
        self.ttl_s = ttl_s
        self.prefixes = prefixes
        self._release = client.register_script(backlog.RELEASE)
        self._admit = client.register_script(backlog.ADMIT)
        self._inbox: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._trimmed: dict[str, float] = {}  # listing → when this thread last trimmed it
        threading.Thread(target=self._run, name="enqueuer", daemon=True).start()

    async def submit(self, job: Job, admit: Admit | None = None, sent: Sent | None = None) -> None:
        """Admit the job (with `admit`), record it (and `sent`, the prompt blocks it was routed
        with) and put it on its queue (`job.queue`); raises the refusal, or what failed."""
        loop = asyncio.get_running_loop()
        pending = _Pending(job, loop, loop.create_future(), admit, sent)
        self._inbox.put(pending)
        await pending.done

    def _run(self) -> None:
        with self.app.producer_or_acquire() as producer:
            while True:
                batch = [self._inbox.get()]
                while not self._inbox.empty():
                    batch.append(self._inbox.get_nowait())
                try:
                    self._send(batch, producer)
                except Exception as e:  # this thread must outlive any batch: every request waits on it
                    log.exception("enqueuer: a batch of %d jobs failed", len(batch))
                    _settle([(p, e) for p in batch])  # a no-op for those already answered

    def _send(self, batch: list[_Pending], producer: Any) -> None:
        batch = self._admitted(batch)
        if not batch:
            return
        try:
            dumped = [p.job.model_dump(mode="json") for p in batch]  # for the record and the message
            pipe = self.client.pipeline(transaction=False)
            record.stage_create(pipe, [p.job for p in batch], self.ttl_s, dumped, self._trimmed)
            if self.prefixes is not None and (sent := [p.sent for p in batch if p.sent is not None]):
                self.prefixes.stage(pipe, sent)
        except Exception as e:
            _settle([(p, e) for p in batch])
            return
        messages: dict[tuple[str | None, int], list[tuple[_Pending, dict[str, Any]]]] = {}
        for p, d in zip(batch, dumped, strict=True):  # in arrival order within each message
            messages.setdefault((p.job.queue, p.job.priority.rank), []).append((p, d))
        outcome: list[tuple[_Pending, Exception | None]] = []
        unsent: list[tuple[list[Job], Exception]] = []  # messages that could not be made
        with publishing_into(pipe):  # each message an LPUSH after the records, in the same round trip
            for group in messages.values():
                for i in range(0, len(group), MAX_JOBS_PER_MESSAGE):
                    part = group[i : i + MAX_JOBS_PER_MESSAGE]
                    error = self._publish([p.job for p, _ in part], producer, [d for _, d in part])
                    if error is not None:
                        unsent.append(([p.job for p, _ in part], error))
                    outcome += [(p, error) for p, _ in part]
        try:
            pipe.execute()
        except Exception as e:
            # Some records and messages may be written: every job is withdrawn (FAILED), and a
            # message that went out finds its jobs no longer queued (its worker claims none).
            unsent = [([p.job for p in batch], e)]
            outcome = [(p, error or e) for p, error in outcome]
        for jobs, error in unsent:  # the records stay, marked failed: the clients learn why
            self._withdraw(jobs, f"could not enqueue: {error}")
        _settle(outcome)

    def _admitted(self, batch: list[_Pending]) -> list[_Pending]:
        """The jobs of `batch` let in, in order; the others' requests are settled with their refusal
        (or the Redis error, when the admissions could not be decided: nothing was counted then)."""
        asking = [p for p in batch if p.admit is not None]
        if not asking:
            return batch
        try:
            replies = self._admit_all(asking)
        except Exception as e:
            _settle([(p, e) for p in asking])
            return [p for p in batch if p.admit is None]
        refused: list[tuple[_Pending, Exception | None]] = []
        for p, reply in zip(asking, replies, strict=True):
            assert p.admit is not None
            if (error := p.admit.refusal(reply)) is not None:
                refused.append((p, error))
        if not refused:
            return batch
        _settle(refused)
        out = {id(p) for p, _ in refused}
        return [p for p in batch if id(p) not in out]

    def _admit_all(self, asking: list[_Pending]) -> list[Any]:
        """ADMIT's reply for each job, in one round trip: EVALSHA in a plain pipeline (a pipeline
        of Script calls would ask SCRIPT EXISTS first, a second round trip per batch); the script
        is loaded again after a Redis restart forgot it."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for p in asking:
                assert p.admit is not None
                pipe.evalsha(self._admit.sha, len(p.admit.keys), *p.admit.keys, *p.admit.args)
            try:
                return list(pipe.execute())
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self._admit.sha = self.client.script_load(backlog.ADMIT)
        raise AssertionError("unreachable")

    def _publish(self, jobs: list[Job], producer: Any, dumped: list[dict[str, Any]]) -> Exception | None:
        """One message for `jobs` (one queue, one priority); `dumped`: their model_dump(mode="json").
        → the error that kept it from being made, None if made."""
        try:
            self.app.send_task(
                keys.RUN_JOBS_TASK,
                args=[dumped],
                queue=jobs[0].queue,
                priority=jobs[0].priority.rank,
                producer=producer,
                argsrepr=f"[{len(jobs)} jobs]",  # not Celery's repr of every job: its cost, for Flower
                # Nothing to declare: a message to the default exchange is an LPUSH onto its queue's
                # list, and workers declare what they consume (kombu's check cost ~70 µs a message).
                declare=[],
            )
            return None
        except Exception as e:
            return e

    def _withdraw(self, jobs: list[Job], error: str) -> None:
        """Jobs whose message could not be sent: failed, out of the backlog. The broker is this
        Redis: when it is down (a restart takes seconds) these writes are retried for WITHDRAW_S;
        after that the records stay queued and the reaper's WAITING check sends them later."""
        deadline = time.monotonic() + WITHDRAW_S
        while True:
            try:
                record.withdraw(self.client, self._release, jobs, error)
                return
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    log.error(
                        "could not mark %d unsent jobs failed (%s); the reaper sends them later", len(jobs), e
                    )
                    return
                time.sleep(0.5)


@dataclass
class _Pending:
    job: Job
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None]
    admit: Admit | None = None
    sent: Sent | None = None

    def answer(self, error: Exception | None) -> None:
        """On the request's loop."""
        if self.done.done():  # the request went away meanwhile
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


def _settle(outcomes: list[tuple[_Pending, Exception | None]]) -> None:
    """Answers each request on its own loop: one wake-up per loop (an API process has one), not
    one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, Exception | None]]] = {}
    for p, error in outcomes:
        by_loop.setdefault(p.loop, []).append((p, error))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: its requests are gone
            loop.call_soon_threadsafe(_answer, items)


def _answer(items: list[tuple[_Pending, Exception | None]]) -> None:
    for p, error in items:
        p.answer(error)
