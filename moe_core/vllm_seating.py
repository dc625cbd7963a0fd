"""An urgent request seated in vLLM's engine core by preempting a row of the batch tier.

vLLM's scheduler preempts a running request only when the KV cache runs out of blocks. A request
waiting for a row (max_num_seqs running) waits until one ends, whatever its priority: with the
batch tier's lines in every row, an interactive request would wait for a line to end. So the
adapter used to keep the batch tier out of some rows (moe_core/vllm_engine.py batch_rows), and a
batch alone could use only those.

`Seating` wraps the scheduler's `schedule`. Before each step is scheduled, while every row is
taken and requests more urgent than the batch tier (priority < rank) wait, it preempts as many
running batch-tier requests as those need rows, the one vLLM's own preemption would pick first
(the largest (priority, arrival)), the way vLLM preempts for memory (`_preempt_request`: its KV
blocks freed, its tokens and sampling state kept, its KV recomputed when it is scheduled again;
under async scheduling an output already on its way is still taken in). The urgent requests then
take those rows in this very step, by vLLM's priority order. The batch tier may then hold every
row, as the torch engine's does (it preempts the same way).

If the seating ever raises, it is switched off with a warning, and the scheduler goes on as
vLLM's own. vLLM is not imported here: the scheduler is vLLM's, handed in.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

RANK_KEY = "localmoe_batch_rank"  # vLLM's additional_config: the batch tier's rank (seating on)
SEAM = ("schedule", "_preempt_request", "running", "waiting", "max_num_running_reqs")
# vLLM's RequestStatus names of a waiting request the scheduler can seat now (not one waiting for
# its grammar to compile or for KV from elsewhere: a row freed for it would go to another)
SEATABLE = frozenset({"WAITING", "PREEMPTED"})


class Seating:
    """`sched.schedule` seats urgent waiting requests first (the module's docstring)."""

    def __init__(self, sched: Any, rank: int) -> None:
        self.sched = sched
        self.rank: int | None = rank  # None once switched off
        self.preempted = 0  # batch-tier requests preempted so far
        self.in_flight = 0  # of them, with a token on its way (async scheduling: vLLM still takes it in)
        self._schedule = sched.schedule
        sched.schedule = self.schedule
        sched.localmoe_seating = self

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.rank is not None:
            try:
                self._seat(self.rank)
            except Exception:  # never the step's failure: vLLM's own scheduling from now on
                logger.warning("seating urgent requests failed: vLLM's scheduling from now on", exc_info=True)
                self.rank = None
        return self._schedule(*args, **kwargs)

    def _seat(self, rank: int) -> None:
        """At every step, so cheap where nothing is to do: rows free, nothing waiting or no
        batch-tier row (O(rows)); else the waiting queue read up to its first batch-tier request
        (vLLM's priority queue hands them out by priority) or the batch rows' count of urgent ones."""
        sched = self.sched
        running: list[Any] = sched.running
        if sched.max_num_running_reqs > len(running) or not sched.waiting:  # vLLM seats them itself
            return
        batch = [r for r in running if r.priority >= rank and _status(r) in ("", "RUNNING")]
        if not batch:
            return
        by_priority = getattr(getattr(sched, "policy", None), "name", "") == "PRIORITY"
        urgent = 0
        for request in sched.waiting:
            if request.priority >= rank:
                if by_priority:
                    break  # the rest are no more urgent
                continue
            urgent += _seatable(request)
            if urgent == len(batch):
                break
        if not urgent:
            return
        batch.sort(key=lambda r: (r.priority, r.arrival_time))
        now = time.monotonic()
        for victim in reversed(batch[-urgent:]):  # the largest (priority, arrival) first
            at = running.index(victim)
            on_its_way = getattr(victim, "num_output_placeholders", 0) > 0  # (preempting may reset it)
            running.pop(at)
            try:
                sched._preempt_request(victim, now)
            except Exception:
                running.insert(at, victim)  # not lost: it runs on, and the seating goes off
                raise
            self.in_flight += on_its_way
            self.preempted += 1


def _status(request: Any) -> str:
    """vLLM's RequestStatus name of the request ("" where it has none)."""
    return str(getattr(getattr(request, "status", None), "name", ""))


def _seatable(request: Any) -> bool:
    return _status(request) in ("", *SEATABLE)


def install(sched: Any) -> Seating | None:
    """Seating on `sched` where its engine's additional_config (sched.vllm_config's) names the
    batch tier's rank (RANK_KEY); None otherwise, or (with a warning) where this vLLM's scheduler
    lacks a part of SEAM."""
    config = getattr(sched, "vllm_config", None)
    additional = getattr(config, "additional_config", None)
    rank = additional.get(RANK_KEY) if isinstance(additional, dict) else None
    if rank is None:
        return None
    if not all(hasattr(sched, name) for name in SEAM):
        logger.warning("this vLLM's scheduler has not %s: urgent requests wait for a free row", SEAM)
        return None
    return Seating(sched, int(rank))
