"""The worker's token relay: the one place a worker writes job progress to Redis.

The engine loop hands over each step's deltas for all jobs; the relay thread writes every step that
piled up since its last write in ONE script call (RELAY): each job's token entries, first-token
stamps and terminal states, atomically, in one round trip. A round trip per token would cap the
service far below a GPU (256 jobs × one XADD each: 10.7k tokens/s on 2 cores, against 118k for
one pipeline per step), and a pipeline of 256 XADDs still costs this process 2.8 ms of CPU per
step (redis-py packs and parses each command; with hiredis), the script 0.5 ms: this process also
runs the engine's Python side, so that time comes off the GPU's. Each terminal state is written
exactly once (scheduler/record.py `finalize`, which RELAY composes, fenced on the attempt). A
job's future resolves only after its terminal state is in Redis, so the Celery task acknowledges
a message only once it is durable. The same script publishes the batch's task events for Flower
(scheduler/task_events.py): the claims since the last write, and each terminal state it wrote.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from host.settings import FlowerSettings
from moe_core.engine import Delta, FinishReason
from scheduler import keys, record, task_events
from scheduler.jobs import Job, JobStatus, SequenceOutput, Usage
from scheduler.notify import TERMINAL_EVENT, Notifier, delivery_for, wants
from scheduler.stream import FEED_KEYS, FEED_LUA, feed_record_json, sequence_token_fields, token_fields
from scheduler.webhooks import Delivery, WebhookEventType

if TYPE_CHECKING:
    from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# A relay batch. KEYS: the streams of n token entries, then of x sequence token entries, then f job
# hashes whose first token this batch carries, then 4 keys per terminal state (`finalize`'s), then
# FEED_KEYS. ARGV: n, f, m (terminal states), ttl, the first-token time (JSON), e (task events to
# publish whatever happens), the task events' channel and message head and tail
# (scheduler/task_events.py), x; then 8 values per token entry: text, tokens, attempt, entry
# number, "1" if it is its stream's first entry (the stream gets its ttl) else "", its feed
# record's head and tail (feed_record_json), and its logprobs' JSON ("": none); then 10 per
# sequence token entry (of a job with n > 1): those 8, its sequence's index and how the sequence
# ended ("": not yet); then per terminal state: attempt, done-event data, hook, k, and k
# field/value pairs (record.finalize_operands); then the e task events, then per terminal state
# its task event ("": none), published only if its finalize wrote. The token entries' fields are
# scheduler/stream.py's token_fields (sequence_token_fields); the whole batch is one feed entry
# and one task event message. `first_token` and `finalize` change the job records (scheduler/record.py).
# → m results, `finalize`'s each.
RELAY = (
    FEED_LUA
    + record.FIRST_TOKEN_LUA
    + record.FINALIZE_LUA
    + task_events.TASK_EVENTS_LUA
    + """
local n, f, m, ttl, e = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[6])
local x = tonumber(ARGV[10])
local a = 11
for i = 1, n do
  local id
  if ARGV[a + 7] == '' then
    id = redis.call('XADD', KEYS[i], '*', 'type', 'token', 'text', ARGV[a], 'n', ARGV[a + 1],
      'a', ARGV[a + 2], 's', ARGV[a + 3])
  else
    id = redis.call('XADD', KEYS[i], '*', 'type', 'token', 'text', ARGV[a], 'n', ARGV[a + 1],
      'a', ARGV[a + 2], 's', ARGV[a + 3], 'lp', ARGV[a + 7])
  end
  stage(ARGV[a + 5], id, ARGV[a + 6])
  if ARGV[a + 4] == '1' then redis.call('EXPIRE', KEYS[i], ttl) end
  a = a + 8
end
for i = n + 1, n + x do
  local fields = {'type', 'token', 'text', ARGV[a], 'n', ARGV[a + 1], 'a', ARGV[a + 2], 's', ARGV[a + 3]}
  if ARGV[a + 7] ~= '' then table.insert(fields, 'lp'); table.insert(fields, ARGV[a + 7]) end
  table.insert(fields, 'i'); table.insert(fields, ARGV[a + 8])
  if ARGV[a + 9] ~= '' then table.insert(fields, 'f'); table.insert(fields, ARGV[a + 9]) end
  stage(ARGV[a + 5], redis.call('XADD', KEYS[i], '*', unpack(fields)), ARGV[a + 6])
  if ARGV[a + 4] == '1' then redis.call('EXPIRE', KEYS[i], ttl) end
  a = a + 10
end
for i = n + x + 1, n + x + f do
  first_token(KEYS[i], ARGV[5])
end
local out, k = {}, n + x + f
for j = 1, m do
  local pairs = tonumber(ARGV[a + 3])
  local fields = {}
  for x = 1, 2 * pairs do fields[x] = ARGV[a + 3 + x] end
  out[j] = finalize(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], ARGV[a], ttl, ARGV[a + 1],
    ARGV[a + 2], fields)
  k = k + 4
  a = a + 4 + 2 * pairs
end
publish()
local parts = {}
for j = 1, e do parts[j] = ARGV[a + j - 1] end
a = a + e
for j = 1, m do
  if out[j] == 1 and ARGV[a] ~= '' then parts[#parts + 1] = ARGV[a] end
  a = a + 1
end
task_events(ARGV[7], ARGV[8], ARGV[9], parts)
return out
"""
)

_STATUS = {
    FinishReason.STOP: JobStatus.SUCCEEDED,
    FinishReason.LENGTH: JobStatus.SUCCEEDED,
    FinishReason.ABORT: JobStatus.CANCELLED,
    FinishReason.ERROR: JobStatus.FAILED,
}


@dataclass
class _Write:
    """One relay batch as RELAY's keys and arguments (see RELAY)."""

    at: float  # when it was planned: the first-token time of the jobs whose first token it carries
    streams: list[str] = field(default_factory=list)  # one per token entry
    entries: list[str] = field(default_factory=list)  # eight per token entry
    sequence_streams: list[str] = field(default_factory=list)  # one per sequence token entry
    sequence_entries: list[str] = field(default_factory=list)  # ten per sequence token entry
    firsts: list[str] = field(default_factory=list)  # job hashes
    # (job hash, attempt, its prompt_logprobs' JSON): written before RELAY, so before the job's
    # first token entry (record.PROMPT_LOGPROBS)
    prompts: list[tuple[str, int, str]] = field(default_factory=list)
    final_keys: list[str] = field(default_factory=list)  # four per terminal state
    final_args: list[str] = field(default_factory=list)
    finals: list[tuple[Held, Job]] = field(default_factory=list)  # in RELAY's order
    events: list[str] = field(default_factory=list)  # task events published whatever happens
    final_events: list[str] = field(default_factory=list)  # one per terminal state ("": none)

    def keys(self) -> list[str]:
        return [*self.streams, *self.sequence_streams, *self.firsts, *self.final_keys, *FEED_KEYS]

    def args(self, ttl_s: int, events_channel: str, envelope: tuple[str, str]) -> list[str | int]:
        head: list[str | int] = [
            len(self.streams),
            len(self.firsts),
            len(self.finals),
            ttl_s,
            json.dumps(self.at),
            len(self.events),
            events_channel,
            *envelope,
            len(self.sequence_streams),
        ]
        tail = [*self.final_args, *self.events, *self.final_events]
        return [*head, *self.entries, *self.sequence_entries, *tail]

    def empty(self) -> bool:
        return not (
            self.streams or self.sequence_streams or self.firsts or self.finals or self.events or self.prompts
        )


def sequence_id(job_id: str, index: int) -> str:
    """The engine's request id for sequence `index` of a job with n > 1 (a job of one sequence is
    requested under its own id)."""
    return f"{job_id}-{index}"


@dataclass
class HeldSequence:
    """One sequence of a held job with n > 1: what Held gathers itself for a job of one sequence."""

    index: int
    text: list[str] = field(default_factory=list)
    tokens: int = 0  # generated so far, earlier attempts' included
    resumed_tokens: int = 0  # what earlier attempts of the job generated of it (their text leads `text`)
    unsent_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)
    logprobs_sent: int = 0
    finish_reason: FinishReason | None = None  # once it ended (here, or in an earlier attempt)
    completion_tokens: int = 0  # set when it ends
    cached_tokens: int = 0  # of the prompt, found in the engine's prefix cache (set when it ends)
    error: str | None = None  # with FinishReason.ERROR


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
    streamed: bool = False  # this attempt has written a token entry
    seated: bool = False  # the engine said it gave this attempt a row (record.SEATED written)
    logprobs: list[Any] = field(default_factory=list)  # every token's so far, when the job asked
    logprobs_sent: int = 0  # logprobs[:logprobs_sent] went out in stream entries
    prompt_logprobs: list[Any] | None = None  # the scored prompt, when the job asked (Job.prompt_logprobs)
    entries: int = 0  # token entries this attempt has staged: the next one's `s` is entries + 1
    terminal: Delivery | None = None  # its terminal webhook event, written with its final state
    claimed_at: float = 0.0  # when this worker took it (unix seconds): its task's start in Flower
    # A job with n > 1: its sequences (index k at k), each gathering its own text, tokens and
    # logprobs (this Held's fields of those stay empty); [] for a job of one sequence.
    sequences: list[HeldSequence] = field(default_factory=list)

    @property
    def tokens_left(self) -> int:
        """Tokens its running sequences may still generate."""
        if not self.sequences:
            return max(0, self.job.spec.max_tokens - self.tokens)
        left = (self.job.spec.max_tokens - s.tokens for s in self.sequences if s.finish_reason is None)
        return sum(max(0, t) for t in left)


@dataclass
class _Failure:
    job_id: str
    error: str


@dataclass
class _Events:
    """Task events about jobs this worker does not hold, published with the next write."""

    events: list[str]


class Relay(threading.Thread):
    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int,
        notifier: Notifier | None = None,
        output_interval_s: float = 0.5,
        metrics: WorkerMetrics | None = None,
        node: str = "",
        flower: FlowerSettings | None = None,
    ) -> None:
        """notifier: where the jobs' webhook events go (None: nowhere); output events are sent
        at most once per output_interval_s per job; metrics: observes each batch (None: nothing);
        node: the worker's Celery node name, which its jobs' task events carry; flower: whether
        and how they are published (None: the defaults; replaced whole when the config changes)."""
        super().__init__(name="relay", daemon=True)
        self.client = client
        self.ttl_s = ttl_s
        self.notifier = notifier
        self.output_interval_s = output_interval_s
        self.metrics = metrics
        self.node = node
        self.flower = flower or FlowerSettings()
        self.held: dict[str, Held] = {}  # job id → Held; added by track(), removed at its final
        self.prefilled = 0  # prompt tokens of the jobs whose first token came so far (heartbeats read it)
        # a job with n > 1: sequence_id → (its Held, the sequence), until the sequence ends
        self.sequences: dict[str, tuple[Held, HeldSequence]] = {}
        self._inbox: queue.SimpleQueue[list[Delta] | _Failure | _Events] = queue.SimpleQueue()
        # Claims whose task events are not made yet (→ _claimed, by this thread, after the write that
        # carries the claimed jobs' first tokens: that write, on every job's time to first token,
        # waits for no JSON), and the events made, sent with the next write.
        self._claims: queue.SimpleQueue[tuple[Held, FlowerSettings]] = queue.SimpleQueue()
        self._claimed: list[str] = []
        self._envelope = task_events.Envelope(self.node)
        self._relay = client.register_script(RELAY)
        self._prompt_logprobs = client.register_script(record.PROMPT_LOGPROBS)
        self._seated = client.register_script(record.SEATED)
        self._events_channel = task_events.channel(client.connection_pool.connection_kwargs.get("db", 0))

    # --- called from other threads ------------------------------------------------------
    def track(self, held: Held) -> None:
        held.claimed_at = time.time()
        flower = self.flower
        if flower.task_events:
            self._claims.put((held, flower))
        for seq in held.sequences:
            self.sequences[sequence_id(held.job.id, seq.index)] = (held, seq)
        self.held[held.job.id] = held
        if self.notifier is not None:
            self.notifier.emit(held.job, WebhookEventType.STARTED, output="")

    def cancelled_while_queued(self, jobs: list[Job]) -> None:
        """Jobs of a message this worker took that were cancelled before any worker claimed them."""
        flower = self.flower
        if flower.task_events and jobs:
            now, node = time.time(), self.node
            events = [e for job in jobs for e in task_events.cancelled_while_queued(job, node, now, flower)]
            self._inbox.put(_Events(events))

    def failed_elsewhere(self, job: Job) -> None:
        """A job the reaper failed (its workers died under it max_attempts times)."""
        if self.flower.task_events:
            self._inbox.put(_Events([task_events.ended(job, self.node, job.timings.started_at)]))

    def publish(self, deltas: list[Delta]) -> None:
        self._inbox.put(deltas)

    def seated(self, request_ids: list[str]) -> None:
        """The engine gives these requests a row at the step it is about to run: record it now, on
        the caller's thread (the engine process's reader), before anything that engine sends after
        it, so that a prompt that kills the engine in that step counts that run against
        limits.max_attempts (record.py REQUEUE)."""
        attempts: dict[str, int] = {}
        for request_id in request_ids:
            held = self.held.get(request_id) or self.sequences.get(request_id, (None, None))[0]
            if held is not None and not held.seated:
                held.seated = True
                attempts[held.job.id] = held.attempt
        if not attempts:
            return
        try:
            record.seated(self._seated, attempts)
        except redis.RedisError as e:  # Redis restarting: a death now would not count these runs
            log.warning("marking %d jobs seated failed (%r)", len(attempts), e)

    def fail(self, job_id: str, error: str) -> None:
        self._inbox.put(_Failure(job_id, error))

    # --- the relay thread -----------------------------------------------------------------
    def run(self) -> None:
        while True:
            batch = [self._inbox.get()]
            while not self._inbox.empty():  # coalesce every step that piled up into one write
                batch.append(self._inbox.get_nowait())
            self._write_with_retry(batch)

    def _write_with_retry(self, batch: list[list[Delta] | _Failure | _Events]) -> None:
        write = self._plan(batch)  # job state advances once, however often we retry
        publishes = bool(write.events) or any(write.final_events)
        envelope = self._envelope.next() if publishes else ("", "")
        args = write.args(self.ttl_s, self._events_channel, envelope)
        delay = 0.1
        while True:
            if write.empty():
                written: list[int] = []
                break
            try:
                for job_key, attempt, value in write.prompts:  # rare: evaluations ask for them
                    self._prompt_logprobs(keys=[job_key], args=[attempt, value])
                written = self._relay(keys=write.keys(), args=args)  # atomic: all or none
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                # Redis restarting: keep the batch and retry; nothing is dropped
                log.warning("relay write failed (%s); retrying in %.1fs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except redis.RedisError:  # a bug, not an outage: retrying would spin forever
                log.exception(
                    "relay write rejected; %d jobs' final states were not written", len(write.finals)
                )
                written = [0] * len(write.finals)
                break
        self._make_claim_events()
        for (held, job), won in zip(write.finals, written, strict=True):
            if won and self.notifier is not None and held.terminal is not None:  # final state written
                self.notifier.send(held.terminal, outboxed=True)  # the outbox holds it until sent
            if not won:
                log.warning("job %s attempt %d was fenced off: a newer attempt owns it", job.id, held.attempt)
            held.future.set_result(job)

    def _plan(self, batch: list[list[Delta] | _Failure | _Events]) -> _Write:
        write = _Write(at=time.time())  # first tokens are stamped as they go to Redis: what a client sees
        write.events, self._claimed = self._claimed, []
        if self.metrics is not None:  # before the loop below lets go of the finished jobs
            self.metrics.delivered([i for i in batch if isinstance(i, list)], self.held, self.sequences)
        for item in batch:
            if isinstance(item, _Events):
                write.events += item.events
                continue
            if isinstance(item, _Failure):
                held = self.held.get(item.job_id)
                if held is None and (found := self.sequences.get(item.job_id)) is not None:
                    held = found[0]  # one sequence failed: so does the job with all of them
                if held is not None:
                    final = self._final_job(held, JobStatus.FAILED, None, item.error, None)
                    write.finals.append((held, final))
                    self._let_go(held)
                continue
            for delta in item:
                held = self.held.get(delta.request_id)
                if held is None:
                    if (found := self.sequences.get(delta.request_id)) is not None:
                        self._plan_sequence(write, *found, delta)
                    continue
                self._plan_delta(write, held, delta, held)
                if delta.finish_reason is not None:
                    prompt = held.job.usage.prompt_tokens if held.resumed_tokens else delta.prompt_tokens
                    completion = delta.completion_tokens + held.resumed_tokens
                    usage = Usage(
                        prompt_tokens=prompt, completion_tokens=completion, cached_tokens=delta.cached_tokens
                    )
                    status = _STATUS[delta.finish_reason]
                    final = self._final_job(held, status, delta.finish_reason, delta.error, usage)
                    write.finals.append((held, final))
                    del self.held[delta.request_id]  # one terminal state per job, whatever follows
        if write.finals:  # a job may end in the write of its first token: its task starts first
            self._make_claim_events()
            write.events, self._claimed = write.events + self._claimed, []
        for held, job in write.finals:
            self._plan_final(write, held, job)
        if self.metrics is not None:
            self.metrics.finished([job for _, job in write.finals])
        return write

    def _plan_sequence(self, write: _Write, held: Held, seq: HeldSequence, delta: Delta) -> None:
        """A delta of one sequence of a job with n > 1; the job's terminal state once all ended."""
        if seq.finish_reason is None:  # else it ended in an earlier attempt, its end streamed then
            self._plan_delta(write, held, delta, seq)
        if delta.finish_reason is None:
            return
        del self.sequences[delta.request_id]
        if seq.finish_reason is None:
            seq.finish_reason, seq.error = delta.finish_reason, delta.error
            seq.completion_tokens = delta.completion_tokens + seq.resumed_tokens
            seq.cached_tokens = delta.cached_tokens
        reasons = [s.finish_reason for s in held.sequences]
        if None in reasons:
            return
        # the job ends as its worst sequence: an error fails it, an abort cancels it
        reason = next((r for r in (FinishReason.ERROR, FinishReason.ABORT) if r in reasons), reasons[0])
        assert reason is not None
        prompt = held.job.usage.prompt_tokens if held.resumed_tokens else delta.prompt_tokens
        completion = sum(s.completion_tokens for s in held.sequences)
        cached = min(s.cached_tokens for s in held.sequences)  # the prompt counts once: what all found
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
        error = next((s.error for s in held.sequences if s.error), None)
        write.finals.append((held, self._final_job(held, _STATUS[reason], reason, error, usage)))
        self._let_go(held)

    def _let_go(self, held: Held) -> None:
        """One terminal state per job, whatever its engine requests still make."""
        del self.held[held.job.id]
        for seq in held.sequences:
            self.sequences.pop(sequence_id(held.job.id, seq.index), None)

    def _plan_delta(self, write: _Write, held: Held, delta: Delta, out: Held | HeldSequence) -> None:
        """out: what gathers the delta's text, tokens and logprobs: `held` itself (a job of one
        sequence) or one of its sequences."""
        out.tokens += len(delta.token_ids)
        if held.first_token_at is None and delta.token_ids:
            held.first_token_at = write.at
            self.prefilled += held.job.usage.prompt_tokens
            write.firsts.append(keys.job(held.job.id))
        out.unsent_tokens += len(delta.token_ids)
        if delta.prompt_logprobs is not None:  # the first delta of the job's first sequence
            scored = delta.prompt_logprobs
            if out.resumed_tokens:  # it scored the prompt and what earlier attempts made of it
                scored = scored[: held.job.usage.prompt_tokens]
            held.prompt_logprobs = scored
            write.prompts.append((keys.job(held.job.id), held.attempt, orjson.dumps(scored).decode()))
        if delta.logprobs:
            out.logprobs += delta.logprobs
        unsent_logprobs = len(out.logprobs) > out.logprobs_sent
        # An entry per piece of text; and, for a job that asked for logprobs, one without text at
        # its end for tokens that made none (EOS), so that every token's logprob reaches readers;
        # a sequence of a job with n > 1 always ends with one (its `f`).
        if delta.text or (delta.finish_reason is not None and (unsent_logprobs or out is not held)):
            if delta.text:
                out.text.append(delta.text)
                self._maybe_output_event(held, delta)
            held.entries += 1
            lps = out.logprobs[out.logprobs_sent :] if unsent_logprobs else None
            # scheduler/stream.py token_fields(text, unsent, attempt, entries, logprobs), as RELAY writes it
            fields = token_fields(delta.text, out.unsent_tokens, held.attempt, held.entries, lps)
            stream = keys.events(held.job.id)
            first = "" if held.streamed else "1"  # this attempt's first entry: the stream gets its ttl
            held.streamed = True
            if out is held:
                write.streams.append(stream)
                write.entries += [fields["text"], fields["n"], fields["a"], fields["s"], first]
                write.entries += [*feed_record_json(stream, fields), fields.get("lp", "")]
            else:
                assert isinstance(out, HeldSequence)
                finish = delta.finish_reason.value if delta.finish_reason is not None else None
                fields = sequence_token_fields(fields, out.index, finish)
                write.sequence_streams.append(stream)
                write.sequence_entries += [fields["text"], fields["n"], fields["a"], fields["s"], first]
                write.sequence_entries += [*feed_record_json(stream, fields), fields.get("lp", "")]
                write.sequence_entries += [fields["i"], finish or ""]
            out.unsent_tokens = 0
            out.logprobs_sent = len(out.logprobs)

    def _make_claim_events(self) -> None:
        while not self._claims.empty():
            held, flower = self._claims.get_nowait()
            self._claimed += task_events.claimed(held.job, self.node, held.claimed_at, flower)

    def _maybe_output_event(self, held: Held, delta: Delta) -> None:
        """An `output` event with the text so far, throttled; the last text rides on `completed`."""
        if self.notifier is None or delta.finish_reason is not None:
            return
        if not wants(held.job, WebhookEventType.OUTPUT):
            return
        now = time.monotonic()
        if now - held.output_sent_at >= self.output_interval_s:
            held.output_sent_at = now
            outputs = _outputs(held, with_logprobs=False) if held.sequences else None
            output = outputs[0].text if outputs else "".join(held.text)
            self.notifier.emit(held.job, WebhookEventType.OUTPUT, output=output, outputs=outputs)

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
        if job.spec.logprobs is not None:
            job.logprobs = held.logprobs
        job.prompt_logprobs = held.prompt_logprobs
        if held.sequences:
            job.outputs = _outputs(held, with_logprobs=job.spec.logprobs is not None)
            job.output, job.logprobs = job.outputs[0].text, job.outputs[0].logprobs
        return job

    def _plan_final(self, write: _Write, held: Held, job: Job) -> None:
        held.terminal = delivery_for(job, TERMINAL_EVENT[job.status]) if self.notifier else None
        hook = held.terminal.model_dump_json() if held.terminal else ""
        final_keys, final_args = record.finalize_operands(job, held.attempt, hook)
        write.final_keys += final_keys
        write.final_args += final_args
        shown = self.flower.task_events
        write.final_events.append(task_events.ended(job, self.node, held.claimed_at) if shown else "")


def _outputs(held: Held, with_logprobs: bool) -> list[SequenceOutput]:
    """Each sequence of a job with n > 1 as far as it got."""
    return [
        SequenceOutput(
            index=s.index,
            text="".join(s.text),
            finish_reason=s.finish_reason.value if s.finish_reason is not None else None,
            logprobs=s.logprobs if with_logprobs else None,
        )
        for s in held.sequences
    ]
