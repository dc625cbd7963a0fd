"""The runtime process's long-lived parts: the relay, heartbeats, the cancel listener, webhooks
and metrics, around the engine process it starts (workers/engine_proc.py). Built, and the engine
warmed up, before the worker consumes a single message."""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

from host.gpus import gpu_stats, visible_nvml_indices
from host.settings import SchedulerSettings, Settings
from moe_core.engine import FinishReason
from moe_core.loader import inspect_model
from scheduler import keys, record
from scheduler.jobs import Job, JobStatus
from scheduler.notify import Notifier
from scheduler.registry import (
    HEARTBEAT_S,
    LEASE_S,
    RECORD_TTL_S,
    WorkerInfo,
    layer_totals,
    update_mix,
)
from workers.engine_proc import EngineHost
from workers.metrics import WorkerMetrics
from workers.reaper import Reaper
from workers.relay import Held, HeldSequence, Relay

log = logging.getLogger(__name__)

PEAK_DECAY = 0.98  # a busy heartbeat keeps this much of the last peak work rate (half-life ~35 beats)


class Runtime:
    def __init__(
        self,
        client: redis.Redis,
        engine: EngineHost,
        info: WorkerInfo,
        notifier: Notifier | None = None,
        incarnation: str = "",
        reaper: Reaper | None = None,
        metrics: WorkerMetrics | None = None,
        prefill_weight: float = SchedulerSettings().prefill_weight,
    ) -> None:
        """engine: started, its relay not yet; metrics: this worker's Prometheus metrics (None:
        none kept); prefill_weight: scheduler.prefill_weight, the router's cost of a prompt token,
        in which the heartbeat states the work in flight and the work rate."""
        self.client = client
        self.engine = engine
        self.relay: Relay = engine.relay
        self.info = info
        self.notifier = notifier
        self.incarnation = incarnation  # the lease's value: which run of this worker holds its jobs
        self.reaper = reaper
        self.metrics = metrics
        self.prefill_weight = prefill_weight
        # at the last beat: (when, tokens, steps, busy seconds, prompt tokens prefilled)
        self._last: tuple[float, int, int, float, int] = (time.monotonic(), 0, 0, 0.0, 0)
        self._last_layer_totals: dict[str, int] = {}
        self._gpu_indices = visible_nvml_indices()
        self._claim = client.register_script(record.CLAIM)
        self._resume = client.register_script(record.RESUME)

    def start(self) -> None:
        if self.notifier is not None:
            self.notifier.start()
        self.relay.start()
        threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._listen_for_cancels, name="cancels", daemon=True).start()

    def stop(self) -> None:
        """The engine stops stepping and lets go of the device (its memory, its own processes)."""
        self.engine.stop()

    def reconfigure(self, settings: Settings, _version: object = None) -> None:
        """A new config version (host/config_store.py): the engine-side hot settings.
        engine.backend is kept for the next start: an engine is chosen when the worker starts."""
        self.engine.configure(settings)
        self.relay.output_interval_s = settings.webhooks.output_interval_s
        self.relay.flower = settings.flower
        if self.reaper is not None:
            self.reaper.max_attempts = settings.limits.max_attempts
        self.prefill_weight = settings.scheduler.prefill_weight

    def mark_ready(self) -> None:
        self.info.ready = True
        self.beat()
        log.info("worker %s ready: engine %s on %s", self.info.name, self.info.engine, self.info.device)

    def take(self, jobs: list[Job]) -> list[Held | None]:
        """Claims `jobs` in one script call (scheduler/record.py CLAIM; made again while Redis
        restarts, up to record.CLAIM_RETRY_S) and submits those claimed here (RESUME first for a
        job an earlier worker died with). → per job its Held; None for a job not claimed here
        (cancelled while queued, another worker's, or Redis gone for longer: a job left QUEUED is
        sent again by the reaper after record.WAITING_CHECK_S)."""
        try:
            attempts = record.claim(self._claim, jobs, self.info.name, self.engine.name, self.incarnation)
        except redis.RedisError as e:
            log.error("claiming %d jobs failed (%r): the reaper sends them again", len(jobs), e)
            return [None] * len(jobs)
        cancelled = [j for j, a in zip(jobs, attempts, strict=True) if a == record.CANCELLED_WHILE_QUEUED]
        self.relay.cancelled_while_queued(cancelled)
        out: list[Held | None] = []
        for job, attempt in zip(jobs, attempts, strict=True):
            held = None
            try:
                if attempt > 0:
                    resumed = record.resume(self._resume, job.id, attempt) if attempt > 1 else {}
                    held = self.submit(job, attempt, resumed)
            except redis.RedisError as e:  # claimed, not started: the reaper takes it after this worker
                log.error("job %s: resuming attempt %d failed (%r)", job.id, attempt, e)
            out.append(held)
        return out

    def submit(self, job: Job, attempt: int, resumed: dict[int, record.Resumed] | None = None) -> Held:
        """A claimed job joins the batch at the next step; its future resolves after the
        terminal write. resumed: per sequence, what earlier attempts streamed, which this one
        continues (a sequence that ended then is not run again)."""
        job = job.model_copy(update={"status": JobStatus.RUNNING, "attempt": attempt})
        job.worker, job.engine = self.info.name, self.engine.name
        resumed = resumed or {}
        if job.spec.n == 1:
            text, tokens, _ = resumed.get(0, record.Resumed("", 0, None))
            held = Held(job, attempt, resumed_tokens=tokens, tokens=tokens)
            if text:
                held.text.append(text)
        else:
            held = Held(job, attempt, sequences=[_sequence(k, resumed.get(k)) for k in range(job.spec.n)])
            held.resumed_tokens = sum(s.resumed_tokens for s in held.sequences)
        if self.metrics is not None:
            self.metrics.started(job)
        self.engine.submit(held)
        return held

    # --- background threads ---------------------------------------------------------------
    def beat(self) -> None:
        stats = self.engine.stats
        now, mono = time.time(), time.monotonic()
        last_mono, last_tokens, last_steps, last_busy, last_prefilled = self._last
        prefilled = self.relay.prefilled
        dt = max(mono - last_mono, 1e-6)
        info = self.info
        info.heartbeat_at = now
        info.running, info.waiting = stats.running, stats.waiting
        info.max_batch_seen, info.tokens_generated = stats.max_batch_seen, stats.tokens_generated
        info.steps = stats.steps
        info.engine, info.failovers = self.engine.name, stats.failovers  # a failover shows here
        info.offload, info.cpu_offload_gb = self.engine.offload()
        info.tokens_per_s = (stats.tokens_generated - last_tokens) / dt
        busy, steps = self.engine.busy_s - last_busy, stats.steps - last_steps
        if busy >= 0.01 and steps > 0:  # the speeds the router plans with, over the time spent stepping
            info.step_rate = _ewma(info.step_rate, steps / busy)
            info.busy_tokens_per_s = _ewma(
                info.busy_tokens_per_s, (stats.tokens_generated - last_tokens) / busy
            )
            # the work done, in the units of cost_in_flight: a prompt's tokens count once its first
            # token came, less those the engine found cached (an engine that reports them; the
            # record still holds the last beat's count)
            computed = max(0, (prefilled - last_prefilled) - (stats.cached_tokens - info.cached_tokens))
            work = stats.tokens_generated - last_tokens + self.prefill_weight * computed
            info.peak_cost_per_s = max(work / busy, PEAK_DECAY * info.peak_cost_per_s)
        self._last = (mono, stats.tokens_generated, stats.steps, self.engine.busy_s, prefilled)
        held = list(self.relay.held.values())
        info.tokens_in_flight = sum(h.tokens_left for h in held)
        info.cost_in_flight = work_in_flight(held, self.prefill_weight)
        info.batch_occupancy = stats.running / max(info.capacity, 1)
        info.kv_usage = stats.kv_usage
        info.prefix_caching, info.kv_blocks = stats.prefix_caching, stats.kv_blocks
        info.kv_block_size = stats.kv_block_size if stats.kv_blocks else None
        prefilled = stats.prompt_tokens - info.prompt_tokens
        if stats.prefix_caching and prefilled > 0:
            hits = (stats.cached_tokens - info.cached_tokens) / prefilled
            info.prefix_hit_rate = hits if info.prefix_hit_rate is None else _ewma(info.prefix_hit_rate, hits)
        info.prompt_tokens, info.cached_tokens = stats.prompt_tokens, stats.cached_tokens
        needed = stats.expert_cache_needed - info.expert_cache_needed
        if needed > 0:
            hits = (stats.expert_cache_hits - info.expert_cache_hits) / needed
            rate = info.expert_cache_hit_rate
            info.expert_cache_hit_rate = hits if rate is None else _ewma(rate, hits)
        info.expert_cache_needed, info.expert_cache_hits = stats.expert_cache_needed, stats.expert_cache_hits
        info.expert_cache_fetched_bytes = stats.expert_cache_fetched_bytes
        info.expert_cache_in_place_bytes = stats.expert_cache_in_place_bytes
        info.expert_tokens = self.engine.expert_tokens
        totals = layer_totals(info.expert_tokens)
        info.modality_mix = update_mix(info.modality_mix, self._last_layer_totals, totals)
        self._last_layer_totals = totals
        info.gpus = gpu_stats(self._gpu_indices)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(keys.worker(info.name), info.model_dump_json(), ex=RECORD_TTL_S)
        pipe.set(keys.lease(info.name), self.incarnation, px=LEASE_S * 1000)
        pipe.zadd(keys.WORKERS, {info.name: now})
        pipe.execute()

    def _beat_forever(self) -> None:
        while True:
            try:
                self.beat()
                self._sweep_cancels()
                if self.reaper is not None:
                    self.reaper.maybe_sweep()
            except redis.RedisError as e:
                log.warning("heartbeat failed: %s", e)
            time.sleep(HEARTBEAT_S)

    def _sweep_cancels(self) -> None:
        """Pub/sub is at-most-once: the cancel flag in each held job's hash is the truth."""
        held = list(self.relay.held)
        if not held:
            return
        pipe = self.client.pipeline(transaction=False)
        for job_id in held:
            pipe.hget(keys.job(job_id), "cancel_requested")
        for job_id, flag in zip(held, pipe.execute(), strict=True):
            if flag == "true":
                self.engine.cancel(job_id)

    def _listen_for_cancels(self) -> None:
        while True:
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                for message in pubsub.listen():
                    job_id = message.get("data")
                    if isinstance(job_id, str) and job_id in self.relay.held:
                        self.engine.cancel(job_id)
            except redis.RedisError as e:
                log.warning("cancel listener lost Redis (%s); resubscribing", e)
                time.sleep(0.5)


def _sequence(index: int, resumed: record.Resumed | None) -> HeldSequence:
    """Sequence `index` of a held job with n > 1, continuing what earlier attempts streamed of it."""
    seq = HeldSequence(index)
    if resumed is not None:
        seq.text, seq.tokens, seq.resumed_tokens = [resumed.text], resumed.tokens, resumed.tokens
        if resumed.finish_reason is not None:  # it ended then: its end is in the stream already
            seq.finish_reason, seq.completion_tokens = FinishReason(resumed.finish_reason), resumed.tokens
    return seq


def work_in_flight(held: list[Held], prefill_weight: float) -> float:
    """What the held jobs still need in the router's cost units (scheduler/routing.py job_cost):
    every token they may still generate, and the prompt of each job with no token yet (its prefill
    is still ahead: waiting for a row, or being computed) at prefill_weight a token."""
    return sum(
        h.tokens_left + (prefill_weight * h.job.usage.prompt_tokens if h.first_token_at is None else 0.0)
        for h in held
    )


def _ewma(old: float, new: float, alpha: float = 0.3) -> float:
    return new if old == 0 else (1 - alpha) * old + alpha * new


def worker_info(name: str, engine: EngineHost, model: str, capacity: int) -> WorkerInfo:
    """model: the checkpoint directory the engine serves."""
    now = time.time()
    checkpoint = inspect_model(model)
    offload, cpu_offload_gb = engine.offload()
    return WorkerInfo(
        name=name,
        pid=os.getpid(),
        queues=[keys.SHARED_QUEUE, keys.worker_queue(name)],
        engine=engine.name,
        offload=offload,
        cpu_offload_gb=cpu_offload_gb,
        device=engine.device,
        model=model,
        max_context=engine.max_context,
        capacity=capacity,
        experts_per_token=checkpoint.experts_per_token,
        shared_experts=checkpoint.shared_experts,
        ready=False,
        started_at=now,
        heartbeat_at=now,
    )
