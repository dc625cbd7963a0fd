"""The engine loop: the one thread that drives a worker's engine.

Celery task threads hand jobs in (`submit`) and cancels arrive from the cancel listener
(`cancel`); both only enqueue. Between two steps the loop admits every new job and applies every
cancel, so a new job joins the running batch at the next step and a cancelled one leaves it
within one step. Each step's deltas go to the relay thread; the loop never waits on Redis.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from moe_core.engine import Delta, Engine, EngineStats, FinishReason, GenerationRequest, SamplingParams
from workers.relay import Held, Relay

log = logging.getLogger(__name__)

STATS_S = 0.1  # engine statistics are refreshed this often while it steps (heartbeats: every 1 s)


@dataclass(frozen=True)
class _Cancel:
    job_id: str


class EngineLoop(threading.Thread):
    def __init__(self, engine: Engine, relay: Relay, step_delay_s: float = 0.0) -> None:
        """step_delay_s: sleep after every step (a configured slow worker, for benchmarks)."""
        super().__init__(name="engine-loop", daemon=True)
        self.engine = engine
        self.step_delay_s = step_delay_s
        self.relay = relay
        self.stats: EngineStats = engine.stats()  # refreshed every STATS_S while busy; heartbeats read it
        self._stats_at = 0.0
        self.expert_tokens: dict[str, list[list[int]]] = {}  # refreshed every second; read by heartbeats
        self._expert_read_at = 0.0
        self.busy_s = 0.0  # seconds spent stepping with requests in the engine (heartbeats read)
        self._inbox: queue.SimpleQueue[Held | _Cancel] = queue.SimpleQueue()
        self._halt = threading.Event()

    def submit(self, held: Held) -> None:
        self.relay.track(held)
        self._inbox.put(held)
        self.engine.wake()  # a step waiting for the engine's output returns: the job joins now

    def cancel(self, job_id: str) -> None:
        self._inbox.put(_Cancel(job_id))
        self.engine.wake()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self._admit(block=not self.engine.has_unfinished())
            busy = self.engine.has_unfinished()
            started = time.perf_counter()
            try:
                deltas = self.engine.step()
            except Exception as e:  # the engine is broken for this batch: fail what it held
                log.exception("engine step failed")
                self._fail_all(f"engine error: {e}")
                continue
            if deltas:
                self.relay.publish(deltas)
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            if busy:
                self.busy_s += time.perf_counter() - started
            now = time.monotonic()  # O(requests): not every step, but at once when the batch empties
            if not self.engine.has_unfinished() or now - self._stats_at >= STATS_S:
                self.stats, self._stats_at = self.engine.stats(), now
            if time.monotonic() - self._expert_read_at >= 1.0:  # a device sync: once a second
                self.expert_tokens, self._expert_read_at = self.engine.expert_tokens(), time.monotonic()

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, item: Held | _Cancel) -> None:
        if isinstance(item, _Cancel):
            if item.job_id in self.relay.held:
                self.engine.abort(item.job_id)
            return
        spec = item.job.spec
        left = spec.max_tokens - item.resumed_tokens  # a resumed job continues its earlier text
        if left <= 0:  # an earlier attempt made every token before its worker died
            done = Delta(item.job.id, "", [], item.job.usage.prompt_tokens, 0, FinishReason.LENGTH)
            self.relay.publish([done])
            return
        params = SamplingParams(
            max_tokens=left,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            seed=spec.seed,
            stop=tuple(spec.stop),
            ignore_eos=spec.ignore_eos,
        )
        prompt = spec.prompt + "".join(item.text)  # item.text holds only the resumed text yet
        try:
            self.engine.add_request(GenerationRequest(item.job.id, prompt, params, tag=item.job.modality))
        except ValueError as e:  # e.g. a prompt the engine cannot hold
            self.relay.fail(item.job.id, str(e))

    def _fail_all(self, error: str) -> None:
        for job_id in list(self.relay.held):
            self.engine.abort(job_id)
            self.relay.fail(job_id, error)
        try:  # drain the aborts so the engine forgets them
            self.engine.step()
        except Exception:
            log.exception("engine could not drain after a failure")
