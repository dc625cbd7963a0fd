"""The worker's token relay: the one place a worker writes job progress to Redis.

The engine loop hands over each step's deltas for all jobs; the relay thread writes them in ONE
pipeline per batch of steps (per-token round trips would cap the service below the engine, see
shared/NOTES.md), appending tokens to each job's stream and writing each terminal state exactly
once through the finalize script. A job's future resolves only after its terminal state is in
Redis, so the Celery task acknowledges a message only once the result is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from moe_core.engine import Delta, FinishReason
from scheduler import keys
from scheduler.jobs import Job, JobStatus, Usage, encode_fields
from scheduler.notify import TERMINAL_EVENT, Notifier, delivery_for, wants
from scheduler.stream import DoneEvent, done_fields, token_fields
from scheduler.webhooks import Delivery, WebhookEventType

if TYPE_CHECKING:
    from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# KEYS: job hash, events stream, the worker's running hash, the webhook outbox. ARGV: attempt
# (JSON), ttl seconds, done-event data, the terminal webhook's Delivery JSON ("" for none), then
# the job's field/value pairs. Writes only if this attempt still owns the running job, so a stale
# worker can never overwrite a newer attempt or a terminal state, nor announce one.
# → 1 written, 0 fenced off.
FINALIZE = """
if redis.call('HGET', KEYS[1], 'status') ~= '"running"' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
local id = redis.call('HGET', KEYS[1], 'id'):sub(2, -2)
redis.call('HDEL', KEYS[3], id)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], id, ARGV[4]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('XADD', KEYS[2], '*', 'type', 'done', 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

_STATUS = {
    FinishReason.STOP: JobStatus.SUCCEEDED,
    FinishReason.LENGTH: JobStatus.SUCCEEDED,
    FinishReason.ABORT: JobStatus.CANCELLED,
    FinishReason.ERROR: JobStatus.FAILED,
}


_Op = Callable[[redis.client.Pipeline], object]  # one command staged on a pipeline


@dataclass
class Held:
    """A job this worker holds, from claim to terminal write."""

    job: Job
    attempt: int
    future: Future[Job] = field(default_factory=Future)
    text: list[str] = field(default_factory=list)
    tokens: int = 0  # generated so far (the relay thread writes, heartbeats read)
    first_token_at: float | None = None
    output_sent_at: float = 0.0  # the last `output` webhook event (monotonic seconds)
    resumed_tokens: int = 0  # what earlier attempts of this job generated (their text leads `text`)
    unsent_tokens: int = 0  # sampled tokens whose text is still held back (a stream entry counts them)
    entries: int = 0  # token entries this attempt has staged: the next one's `s` is entries + 1
    terminal: Delivery | None = None  # its terminal webhook event, written with its final state


@dataclass
class _Failure:
    job_id: str
    error: str


class Relay(threading.Thread):
    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        notifier: Notifier | None = None,
        output_interval_s: float = 0.5,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """notifier: where the jobs' webhook events go (None: nowhere); output events are sent
        at most once per output_interval_s per job; metrics: observes each batch (None: nothing)."""
        super().__init__(name="relay", daemon=True)
        self.client = client
        self.ttl_s = ttl_s
        self.notifier = notifier
        self.output_interval_s = output_interval_s
        self.metrics = metrics
        self.held: dict[str, Held] = {}  # job id → Held; added by track(), removed at its final
        self._inbox: queue.SimpleQueue[list[Delta] | _Failure] = queue.SimpleQueue()
        self._finalize = client.register_script(FINALIZE)

    # --- called from other threads ------------------------------------------------------
    def track(self, held: Held) -> None:
        self.held[held.job.id] = held
        if self.notifier is not None:
            self.notifier.emit(held.job, WebhookEventType.STARTED, output="")

    def publish(self, deltas: list[Delta]) -> None:
        self._inbox.put(deltas)

    def fail(self, job_id: str, error: str) -> None:
        self._inbox.put(_Failure(job_id, error))

    # --- the relay thread -----------------------------------------------------------------
    def run(self) -> None:
        while True:
            batch = [self._inbox.get()]
            while not self._inbox.empty():  # coalesce every step that piled up into one pipeline
                batch.append(self._inbox.get_nowait())
            self._write_with_retry(batch)

    def _write_with_retry(self, batch: list[list[Delta] | _Failure]) -> None:
        ops, finals = self._plan(batch)  # job state advances once, however often we retry
        delay = 0.1
        while True:
            try:
                pipe = self.client.pipeline(transaction=True)  # all of a batch or none of it
                for op in ops:
                    op(pipe)
                results = pipe.execute()
                written = results[len(results) - len(finals) :]  # the finals are staged last
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                # Redis restarting: keep the batch and retry; nothing is dropped
                log.warning("relay write failed (%s); retrying in %.1fs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except redis.RedisError:  # a bug, not an outage: retrying would spin forever
                log.exception("relay write rejected; %d jobs' final states were not written", len(finals))
                written = [0] * len(finals)
                break
        for (held, job), won in zip(finals, written, strict=True):
            if won and self.notifier is not None and held.terminal is not None:  # final state written
                self.notifier.send(held.terminal, outboxed=True)  # the outbox holds it until sent
            if not won:
                log.warning("job %s attempt %d was fenced off: a newer attempt owns it", job.id, held.attempt)
            held.future.set_result(job)

    def _plan(self, batch: list[list[Delta] | _Failure]) -> tuple[list[_Op], list[tuple[Held, Job]]]:
        ops: list[_Op] = []
        finals: list[tuple[Held, Job]] = []
        if self.metrics is not None:  # before the loop below lets go of the finished jobs
            self.metrics.delivered([i for i in batch if not isinstance(i, _Failure)], self.held)
        for item in batch:
            if isinstance(item, _Failure):
                held = self.held.get(item.job_id)
                if held is not None:
                    finals.append((held, self._final_job(held, JobStatus.FAILED, None, item.error, None)))
                    del self.held[item.job_id]
                continue
            now = time.time()  # first tokens are stamped as they go to Redis: what a client sees
            for delta in item:
                held = self.held.get(delta.request_id)
                if held is None:
                    continue
                ops += self._plan_delta(held, delta, now)
                if delta.finish_reason is not None:
                    prompt = held.job.usage.prompt_tokens if held.resumed_tokens else delta.prompt_tokens
                    completion = delta.completion_tokens + held.resumed_tokens
                    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
                    status = _STATUS[delta.finish_reason]
                    final = self._final_job(held, status, delta.finish_reason, delta.error, usage)
                    finals.append((held, final))
                    del self.held[delta.request_id]  # one terminal state per job, whatever follows
        ops += [self._plan_final(held, job) for held, job in finals]
        if self.metrics is not None:
            self.metrics.finished([job for _, job in finals])
        return ops, finals

    def _plan_delta(self, held: Held, delta: Delta, at: float) -> list[_Op]:
        job_id = held.job.id
        ops: list[_Op] = []
        held.tokens += len(delta.token_ids)
        if held.first_token_at is None and delta.token_ids:
            held.first_token_at = at
            first = encode_fields({"timings": {"first_token_at": at}})
            ops.append(lambda pipe: pipe.hset(keys.job(job_id), mapping=first))  # type: ignore[arg-type]
        held.unsent_tokens += len(delta.token_ids)
        if delta.text:
            held.text.append(delta.text)
            self._maybe_output_event(held, delta)
            held.entries += 1
            fields = token_fields(delta.text, held.unsent_tokens, held.attempt, held.entries)
            held.unsent_tokens = 0
            ops.append(lambda pipe: pipe.xadd(keys.events(job_id), fields))  # type: ignore[arg-type]
            if len(held.text) == 1:
                ops.append(lambda pipe: pipe.expire(keys.events(job_id), self.ttl_s))
        return ops

    def _maybe_output_event(self, held: Held, delta: Delta) -> None:
        """An `output` event with the text so far, throttled; the last text rides on `completed`."""
        if self.notifier is None or delta.finish_reason is not None:
            return
        if not wants(held.job, WebhookEventType.OUTPUT):
            return
        now = time.monotonic()
        if now - held.output_sent_at >= self.output_interval_s:
            held.output_sent_at = now
            self.notifier.emit(held.job, WebhookEventType.OUTPUT, output="".join(held.text))

    def _final_job(
        self,
        held: Held,
        status: JobStatus,
        reason: FinishReason | None,
        error: str | None,
        usage: Usage | None,
    ) -> Job:
        job = held.job.model_copy(deep=True)
        job.status = status
        job.output = "".join(held.text)
        job.finish_reason = reason.value if reason else None
        job.error = error
        job.usage = usage or job.usage
        job.timings.first_token_at = held.first_token_at
        job.timings.finished_at = time.time()
        return job

    def _plan_final(self, held: Held, job: Job) -> _Op:
        fields = encode_fields(
            {
                "status": job.status.value,
                "output": job.output,
                "finish_reason": job.finish_reason,
                "error": job.error,
                "usage": job.usage.model_dump(),
                "timings": {"finished_at": job.timings.finished_at},
            }
        )
        held.terminal = delivery_for(job, TERMINAL_EVENT[job.status]) if self.notifier else None
        hook = held.terminal.model_dump_json() if held.terminal else ""
        args: list[str | int] = [str(held.attempt), self.ttl_s, done_fields(DoneEvent.of(job))["data"], hook]
        for k, v in fields.items():
            args += [k, v]
        job_keys = [
            keys.job(job.id),
            keys.events(job.id),
            keys.running(job.worker or ""),
            keys.WEBHOOK_OUTBOX,
        ]
        return lambda pipe: self._finalize(keys=job_keys, args=args, client=pipe)
