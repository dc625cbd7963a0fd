"""The engine loop: the one thread that drives a worker's engine, in the engine's own process.

The pipe's reader thread hands requests, aborts and settings in (`put`) and wakes the engine;
between two steps the loop applies all of them, so a new request joins the running batch at the
next step and an aborted one leaves it within one step. Each step's deltas go out on the pipe to
the runtime process (workers/runtime.py), which writes them to Redis: this process never touches
Redis, a job record or a metric, so its one core is spent on the engine alone.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections.abc import Callable

from moe_core.engine import Engine
from moe_core.failover import FailoverEngine
from workers.messages import (
    Abort,
    Add,
    AddMany,
    Configure,
    Experts,
    FromEngine,
    Refused,
    Seated,
    Stats,
    Stepped,
    Stop,
    ToEngine,
)

log = logging.getLogger(__name__)

STATS_S = 0.1  # engine statistics are sent this often while it steps (heartbeats: every 1 s)
EXPERTS_S = 1.0  # expert counts too (reading them syncs the device)


class EngineLoop:
    def __init__(self, engine: Engine, send: Callable[[FromEngine], None], step_delay_s: float = 0.0) -> None:
        """send: puts a message on the pipe to the runtime process (called from this loop only);
        step_delay_s: sleep after every step (a configured slow worker, for benchmarks)."""
        self.engine = engine
        self.send = send
        self.step_delay_s = step_delay_s
        self.live: set[str] = set()  # requests added and not finished: what a failed step fails
        self.busy_s = 0.0  # seconds spent stepping with requests in the engine
        self._inbox: queue.SimpleQueue[ToEngine] = queue.SimpleQueue()
        self._stats_at = 0.0
        self._experts_at = 0.0
        if hasattr(engine, "on_seated"):  # the torch engines say whom they seat before they compute
            engine.on_seated = lambda ids: self.send(Seated(ids))

    def put(self, message: ToEngine) -> None:
        """From the pipe's reader thread: applied before the next step."""
        self._inbox.put(message)
        self.engine.wake()  # a step waiting for the engine's output returns: it applies this now

    def run(self) -> None:
        """Until a Stop arrives; the engine is the caller's to close."""
        self._send_stats()
        while self._admit(block=not self.engine.has_unfinished()):
            busy = self.engine.has_unfinished()
            started = time.perf_counter()
            try:
                deltas = self.engine.step()
            except Exception as e:  # the engine is broken for this batch: fail what it held
                log.exception("engine step failed")
                self._fail_all(f"engine error: {e}")
                continue
            if deltas:
                for d in deltas:
                    if d.finish_reason is not None:
                        self.live.discard(d.request_id)
                self.send(Stepped.of(deltas))
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            if busy:
                self.busy_s += time.perf_counter() - started
            # O(requests): not every step, but at once when the batch empties
            now, emptied = time.monotonic(), busy and not self.engine.has_unfinished()
            if emptied or now - self._stats_at >= STATS_S:
                self._send_stats()
            if emptied or (busy and now - self._experts_at >= EXPERTS_S):
                self._experts_at = now
                self.send(Experts(self.engine.expert_tokens()))

    def _send_stats(self) -> None:
        s = self.engine.stats()
        self.send(Stats(self.engine.name, dataclasses.astuple(s), self.busy_s))
        self._stats_at = time.monotonic()

    def _admit(self, block: bool) -> bool:
        """Applies every message waiting (waits up to 0.5 s for one if `block`). → False on Stop."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(item, Stop):
                return False
            self._apply(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, item: Add | AddMany | Abort | Configure) -> None:
        if isinstance(item, AddMany):
            for add in item.each():
                self._apply(add)
        elif isinstance(item, Abort):
            if item.request_id in self.live:
                self.engine.abort(item.request_id)
        elif isinstance(item, Configure):
            self.step_delay_s = item.step_delay_s
            if isinstance(self.engine, FailoverEngine):
                self.engine.max_failures = item.max_step_failures
                self.engine.cooldown_s = item.failover_cooldown_s
        else:
            try:
                self.engine.add_request(item.request())
            except ValueError as e:  # e.g. a prompt the engine cannot hold
                self.send(Refused(item.request_id, str(e)))
                return
            self.live.add(item.request_id)

    def _fail_all(self, error: str) -> None:
        for request_id in sorted(self.live):
            self.engine.abort(request_id)
            self.send(Refused(request_id, error))
        self.live.clear()
        try:  # drain the aborts so the engine forgets them
            self.engine.step()
        except Exception:
            log.exception("engine could not drain after a failure")
