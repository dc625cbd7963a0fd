"""Where a job goes: its estimated cost and the Celery queue that should run it.

Every worker consumes its own queue (localmoe.worker.NAME) and the shared one. The API routes
each job onto one worker's queue (Scheduler.route), or onto the shared queue when it knows of no
fresh worker; the chosen queue and the reason are recorded on the job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import redis
from tokenizers import Tokenizer

from host.settings import SchedulerSettings
from scheduler import keys
from scheduler.jobs import Job
from scheduler.prefix import PrefixIndex, Sent
from scheduler.registry import WorkerInfo, queued_costs, read_workers

log = logging.getLogger(__name__)


class PromptCounter:
    """Counts prompt tokens exactly as the engine will (the model's own tokenizer.json) and knows
    the model's context length, so intake can refuse what the engine could never run."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "config.json").read_text())
        self.max_context = int(config.get("max_position_embeddings", 2048))
        # the logits' width: token ids a request may name (logit_bias, stop_token_ids) lie below it
        self.vocab_size = int(
            config.get("vocab_size") or self.tokenizer.get_vocab_size(with_added_tokens=True)
        )
        # the text of its special tokens (a detokenizer skips them unless a request says not to)
        added = self.tokenizer.get_added_tokens_decoder().values()
        self.special_tokens = frozenset(t.content for t in added if t.special)

    def count(self, prompt: str) -> int:
        return len(self.encode(prompt))

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids


@dataclass(frozen=True)
class Route:
    queue: str
    reason: str
    worker: str | None = None  # None: the shared queue
    cached_tokens: int = 0  # prompt tokens the worker's prefix cache probably holds
    sent: Sent | None = None  # the prompt blocks to record as sent to the worker (Enqueuer)


SHARED = Route(keys.SHARED_QUEUE, "shared queue (policy)")


def job_cost(prompt_tokens: int, max_tokens: int, prefill_weight: float) -> float:
    """A job's cost in decode tokens: every generated token is a decode step of the job's row;
    its prompt is prefilled in parallel, each token a fraction of a decode step."""
    return max_tokens + prefill_weight * prompt_tokens


@dataclass
class _View:
    """What the router knows of one worker: its last heartbeat plus what was routed to it since."""

    info: WorkerInfo
    queued: float  # cost of jobs on its own queue, not yet claimed (Redis, plus local additions)

    def expected_completion(self, cost: float, speed_prior: float) -> float:
        """Seconds until a new job of `cost` would be done here: the wait, then the job's own
        tokens at one per step. The wait: the work ahead of it (its held jobs' remaining tokens and
        unprefilled prompts, and its queue) drained at the full batch's decode rate (every row one
        token a step: a job beside the others runs with them), but the prompts ahead (and the
        queue) no faster than the most work a second the worker has lately done. The batch's rate
        alone counts no prefill and no slower step with more rows: a worker with long prompts
        still to prefill would look many times faster than it is and take every job. Unmeasured
        workers count at the other workers' step rate."""
        info = self.info
        rate = info.step_rate or speed_prior  # tokens per second of one running job
        ahead = max(info.cost_in_flight, info.tokens_in_flight) + self.queued
        wait = ahead / (rate * max(info.capacity, 1))
        if info.peak_cost_per_s > 0:
            prefill = max(0.0, info.cost_in_flight - info.tokens_in_flight) + self.queued
            wait = max(wait, prefill / max(info.peak_cost_per_s, rate))
        return wait + cost / rate


class Scheduler:
    """Picks each job's Celery queue from the worker registry (refreshed every refresh_s by a
    background thread; `route` never waits on Redis).

    auto: among fresh, ready, healthy workers (GPU temperature, GPU memory and KV-cache usage under
    their limits), the one with the earliest expected completion (_View.expected_completion: the
    work ahead at the batch's rate, its prompts to prefill no faster than the work rate measured);
    workers within affinity_margin
    of it count as equal, and among those the one whose recent expert load has the largest share
    of the job's modality wins. With prefix_routing, a worker whose engine caches prefixes costs
    the job no prefill for the prompt blocks recently routed there (the `prefixes` index): repeated
    prefixes go back where they were computed until that worker's work ahead outweighs the
    prefill saved, then a second worker takes them (and holds them from then on). A routed job's
    cost is added to the worker's view at once, so a burst spreads before the next heartbeat. No
    fresh worker: the shared queue, which every worker also consumes. shared / round_robin: the
    baselines.
    """

    def __init__(self, client: redis.Redis, cfg: SchedulerSettings) -> None:
        self.client = client
        self.cfg = cfg
        self.prefixes = PrefixIndex(cfg.prefix_ttl_s, cfg.prefix_blocks_per_worker)
        self._views: dict[str, _View] = {}
        self._lock = threading.Lock()
        self._turn = 0

    def start(self) -> None:
        """Read the registry once now (so the first jobs are routed on data), then keep reading."""
        try:
            self.refresh()
        except (redis.RedisError, ValueError) as e:
            log.warning("scheduler could not read the worker registry: %s", e)
        threading.Thread(target=self._refresh_forever, name="scheduler-refresh", daemon=True).start()

    def refresh(self) -> None:
        now = time.time()
        workers = read_workers(self.client, now)
        queued = queued_costs(self.client, [w.name for w in workers])
        sent = self.prefixes.pull(self.client, now) if self.cfg.prefix_routing else []
        with self._lock:
            self._views = {w.name: _View(w, queued[w.name]) for w in workers}
            if self.cfg.prefix_routing:
                self.prefixes.ttl_s = self.cfg.prefix_ttl_s  # live settings may have changed
                self.prefixes.default_capacity = self.cfg.prefix_blocks_per_worker
                for w in workers:
                    self.prefixes.known(w.name, w.started_at, self._block_capacity(w))
                self.prefixes.apply(sent, now)
                self.prefixes.expire(now)

    def _block_capacity(self, info: WorkerInfo) -> int | None:
        """The worker's KV cache in the router's blocks, when its engine says."""
        if not info.kv_blocks:
            return None
        return info.kv_blocks * max(1, (info.kv_block_size or 0) // self.cfg.prefix_block_size)

    def _refresh_forever(self) -> None:
        while True:
            try:
                self.refresh()
            except (redis.RedisError, ValueError) as e:
                log.warning("scheduler could not read the worker registry: %s", e)
            except Exception:  # this thread must outlive any bad record: every route reads its views
                log.exception("scheduler refresh failed")
            time.sleep(self.cfg.refresh_s)

    def drain_tokens_per_s(self) -> float:
        """How fast the fresh workers together make tokens at full batch (0 when unmeasured)."""
        with self._lock:
            now = time.time()
            return sum(
                v.info.step_rate * max(v.info.capacity, 1) for v in self._views.values() if v.info.fresh(now)
            )

    def fleet(self) -> tuple[int, list[str]]:
        """The fresh, ready workers: (their batch slots together, their names)."""
        with self._lock:
            now = time.time()
            fresh = [v.info for v in self._views.values() if v.info.ready and v.info.fresh(now)]
        return sum(max(w.capacity, 1) for w in fresh), [w.name for w in fresh]

    def route(self, job: Job, blocks: Sequence[int] = ()) -> Route:
        """blocks: the chained hashes of the prompt's blocks (scheduler/prefix.py block_hashes)."""
        if self.cfg.policy == "shared":
            return SHARED
        with self._lock:
            now = time.time()
            fresh = [v for v in self._views.values() if v.info.ready and v.info.fresh(now)]
            if not fresh:
                return Route(keys.SHARED_QUEUE, "shared queue: no fresh worker heartbeat")
            if self.cfg.policy == "round_robin":
                view = sorted(fresh, key=lambda v: v.info.name)[self._turn % len(fresh)]
                self._turn += 1
                return self._take(view, job, "round robin")
            return self._earliest(fresh, job, blocks if self.cfg.prefix_routing else ())

    def _cached_tokens(self, view: _View, blocks: Sequence[int]) -> int:
        """Prompt tokens the worker's prefix cache probably holds: the leading blocks sent there,
        in whole blocks of its engine."""
        info = view.info
        if not blocks or not info.prefix_caching:
            return 0
        tokens = self.prefixes.matched(info.name, blocks) * self.cfg.prefix_block_size
        engine_block = info.kv_block_size or self.cfg.prefix_block_size
        return tokens // engine_block * engine_block

    def _earliest(self, fresh: list[_View], job: Job, blocks: Sequence[int]) -> Route:
        refused = {v.info.name: why for v in fresh if (why := self._unhealthy(v.info))}
        healthy = [v for v in fresh if v.info.name not in refused]
        if not healthy:
            reasons = "; ".join(f"{name}: {why}" for name, why in refused.items())
            return Route(keys.SHARED_QUEUE, f"shared queue: no healthy worker ({reasons})")
        measured = [v.info.step_rate for v in healthy if v.info.step_rate > 0]
        prior = sorted(measured)[len(measured) // 2] if measured else 1.0
        cached = {v.info.name: self._cached_tokens(v, blocks) for v in healthy}
        costs = {n: max(0.0, job.cost - self.cfg.prefill_weight * c) for n, c in cached.items()}
        times = {v.info.name: v.expected_completion(costs[v.info.name], prior) for v in healthy}
        best = min(times.values())
        close = [v for v in healthy if times[v.info.name] <= best * (1 + self.cfg.affinity_margin)]
        modality = str(job.modality)
        chosen = max(close, key=lambda v: (v.info.modality_mix.get(modality, 0.0), -times[v.info.name]))
        others = ", ".join(f"{n} {t:.2f}s" for n, t in sorted(times.items()) if n != chosen.info.name)
        reason = f"earliest expected completion {times[chosen.info.name]:.2f}s" + (
            f" (vs {others})" if others else ""
        )
        if len(close) > 1:
            share = chosen.info.modality_mix.get(modality, 0.0)
            reason += f"; {modality} share {share:.2f}, best of {len(close)} within the margin"
        here = chosen.info.name
        holds = bool(blocks) and chosen.info.prefix_caching
        if holds:
            reason += f"; prefix {cached[here]} of {job.usage.prompt_tokens} prompt tokens cached here"
            if elsewhere := [f"{n} {c}" for n, c in sorted(cached.items()) if n != here and c]:
                reason += f" (vs {', '.join(elsewhere)})"
        if refused:
            reason += "; avoided " + ", ".join(f"{name} ({why})" for name, why in refused.items())
        route = self._take(chosen, job, reason, costs[here])
        if holds:
            self.prefixes.touch(here, blocks, time.time())
            route = replace(route, cached_tokens=cached[here], sent=Sent(here, blocks))
        return route

    def _unhealthy(self, info: WorkerInfo) -> str | None:
        cfg = self.cfg
        for gpu in info.gpus:
            if gpu.temperature_c is not None and gpu.temperature_c > cfg.max_temperature_c:
                return f"GPU {gpu.index} at {gpu.temperature_c:.0f} C"
            if gpu.memory_used_bytes is not None and gpu.memory_total_bytes:
                used = gpu.memory_used_bytes / gpu.memory_total_bytes
                if used > cfg.max_memory_fraction:
                    return f"GPU {gpu.index} memory {used:.0%} used"
        if info.kv_usage is not None and info.kv_usage > cfg.max_kv_usage:
            return f"KV cache {info.kv_usage:.0%} used"
        return None

    def _take(self, view: _View, job: Job, reason: str, cost: float | None = None) -> Route:
        view.queued += job.cost if cost is None else cost  # until the next refresh reads it back from Redis
        return Route(keys.worker_queue(view.info.name), f"{view.info.name}: {reason}", view.info.name)
