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

Yielding (`yield_rows` given): while requests more urgent than the batch tier are in the engine,
and for `hold_s` after the last of them, the batch tier holds at most `yield_rows` rows. Its rows
beyond that are preempted (as above), and the step is scheduled with vLLM's row limit lowered to
the rows held plus the urgent requests waiting plus what the batch tier may still take, so vLLM
seats the urgent ones first (priority order) and no more batch lines than that (the limit vLLM
admits waiting requests under: max_num_running_reqs, or max_num_active_reqs where vLLM has it).
Beside running batch lines an arriving request waits for the step in flight, shares its own with
their rows and the prefills of the lines that replace the ones ending, and its path (the relay, the
API) carries their answers too: on an H100, interactive TTFT p95 was 1.98x its figure alone with
the batch in every row, 1.50x with 2 rows, 1.06x with none (BENCHMARKS.md). Alone, the batch takes
every row. In the hold, with nothing urgent left and no batch line let in, vLLM's engine core
would step with nothing to schedule as fast as it can (it blocks for input only when it holds no
request), its thread holding the interpreter lock that its input thread needs to take in the next
request: such a step sleeps HOLD_IDLE_S instead, as the torch engine's does.

If the seating ever raises, it is switched off with a warning, and the scheduler goes on as
vLLM's own. vLLM is not imported here: the scheduler is vLLM's, handed in.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

RANK_KEY = "localmoe_batch_rank"  # vLLM's additional_config: the batch tier's rank (seating on)
YIELD_KEY = "localmoe_batch_yield"  # additional_config: [rows, hold_s] (yielding on; see the docstring)
SEAM = ("schedule", "_preempt_request", "running", "waiting", "max_num_running_reqs")
# vLLM's RequestStatus names of a waiting request the scheduler can seat now (not one waiting for
# its grammar to compile or for KV from elsewhere: a row freed for it would go to another)
SEATABLE = frozenset({"WAITING", "PREEMPTED"})
HOLD_IDLE_S = 0.002  # a step that schedules nothing in the hold sleeps this (the docstring)


class Seating:
    """`sched.schedule` seats urgent waiting requests first (the module's docstring)."""

    def __init__(self, sched: Any, rank: int, yield_rows: int | None = None, hold_s: float = 1.0) -> None:
        self.sched = sched
        self.rank: int | None = rank  # None once switched off
        self.yield_rows = yield_rows  # the batch tier's rows beside urgent work (None: no yielding)
        self.hold_s = hold_s
        self.urgent_at = -float("inf")  # time.monotonic() of the last step that saw urgent work
        self.preempted = 0  # batch-tier requests preempted so far
        self.in_flight = 0  # of them, with a token on its way (async scheduling: vLLM still takes it in)
        self.yielded = 0  # steps scheduled with the batch tier held to yield_rows
        self.idled = 0  # of them, steps in the hold that scheduled nothing (and slept HOLD_IDLE_S)
        self._holding = False  # this step is in the hold: nothing urgent in the engine
        # the limit vLLM admits waiting requests under: max_num_running_reqs, or (newer vLLM, where
        # that is the runner's row count and checked after the step) max_num_active_reqs
        newer = hasattr(sched, "max_num_active_reqs")
        self._admits = "max_num_active_reqs" if newer else "max_num_running_reqs"
        self._schedule = sched.schedule
        sched.schedule = self.schedule
        sched.localmoe_seating = self

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        limit = None
        if self.rank is not None:
            try:
                self._seat(self.rank)
                if self.yield_rows is not None:
                    limit = self._yield(self.rank, self.yield_rows)
            except Exception:  # never the step's failure: vLLM's own scheduling from now on
                logger.warning("seating urgent requests failed: vLLM's scheduling from now on", exc_info=True)
                self.rank = None
                limit = None
        if limit is None:
            return self._schedule(*args, **kwargs)
        full = getattr(self.sched, self._admits)
        setattr(self.sched, self._admits, limit)
        try:
            out = self._schedule(*args, **kwargs)
        finally:
            setattr(self.sched, self._admits, full)
        if self._holding and getattr(out, "total_num_scheduled_tokens", None) == 0:
            self.idled += 1
            time.sleep(HOLD_IDLE_S)
        return out

    def _yield(self, rank: int, rows: int) -> int | None:
        """→ the row limit this step is scheduled with while the batch tier yields (its rows past
        `rows` preempted), or None (no urgent request lately: vLLM's own limit). O(rows) plus the
        waiting queue up to its first batch-tier request (by priority)."""
        sched = self.sched
        running: list[Any] = sched.running
        now = time.monotonic()
        urgent_running = any(r.priority < rank for r in running)
        by_priority = getattr(getattr(sched, "policy", None), "name", "") == "PRIORITY"
        urgent_waiting = 0  # seatable now
        waiting_at_all = False  # seatable or not (a grammar still compiling: it runs soon)
        for queue in (sched.waiting, getattr(sched, "skipped_waiting", ())):
            for request in queue:
                if request.priority >= rank:
                    if by_priority:
                        break
                    continue
                waiting_at_all = True
                urgent_waiting += queue is sched.waiting and _seatable(request)
        self._holding = not (urgent_running or waiting_at_all)
        if not self._holding:
            self.urgent_at = now
        elif now - self.urgent_at > self.hold_s:
            return None
        batch = [r for r in running if r.priority >= rank and _status(r) in ("", "RUNNING")]
        self._preempt(batch, len(batch) - rows, now)
        held = min(len(batch), rows)
        self.yielded += 1
        full: int = getattr(sched, self._admits)
        return min(full, len(running) + urgent_waiting + rows - held)

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
        self._preempt(batch, urgent, time.monotonic())

    def _preempt(self, batch: list[Any], count: int, now: float) -> None:
        """Preempt `count` of the running batch-tier requests `batch`: the largest (priority,
        arrival) first, as vLLM's own preemption picks."""
        if count <= 0:
            return
        running: list[Any] = self.sched.running
        sched = self.sched
        batch = sorted(batch, key=lambda r: (r.priority, r.arrival_time))
        for victim in reversed(batch[-count:]):
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
    if not isinstance(additional, dict):
        return None
    rank = additional.get(RANK_KEY)
    if rank is None:
        return None
    if not all(hasattr(sched, name) for name in SEAM):
        logger.warning("this vLLM's scheduler has not %s: urgent requests wait for a free row", SEAM)
        return None
    yielding = additional.get(YIELD_KEY)
    if yielding is None:
        return Seating(sched, int(rank))
    rows, hold_s = yielding
    return Seating(sched, int(rank), int(rows), float(hold_s))
