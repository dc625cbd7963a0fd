"""An engine that keeps serving when its engine fails: a preference list with a circuit breaker.

The first engine of the list that loads serves. When the active engine's `step` fails
`max_failures` times in a row, the breaker opens: the next engine of the list is loaded and the
requests in flight are retried on it once, continuing from the text already sent (prompt + text
so far, max_tokens reduced by what was made), so a client's stream never repeats itself. A
request that fails a second time ends with FinishReason.ERROR. After `cooldown_s` on a fallback,
at a step when nothing is in flight (the worker's loop steps when idle), the breaker is half-open:
the fallback is closed, the preferred engine loaded and probed with a one-token request; it
serves again if that works,
otherwise the fallback comes back and the cool-down restarts. Only one engine holds the device
at a time (vLLM takes most of a GPU's memory).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from moe_core.engine import Delta, Engine, EngineStats, FinishReason, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

Builder = tuple[str, Callable[[], Engine]]  # (backend name, constructs an unloaded engine)


@dataclass
class _Tracked:
    request: GenerationRequest
    text: list[str] = field(default_factory=list)  # every piece of text already handed out
    completion: int = 0  # tokens made so far, over every engine that ran it
    base: int = 0  # of which on engines before the current one
    prompt_tokens: int | None = None  # as counted by the first engine that ran it
    retried: bool = False


class FailoverEngine:
    def __init__(
        self,
        builders: Sequence[Builder],
        max_failures: int = 3,
        cooldown_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not builders:
            raise ValueError("FailoverEngine needs at least one engine")
        self.builders = list(builders)
        self.max_failures = max_failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.index = -1  # position of the active engine in `builders`
        self.active: Engine | None = None
        self.failovers = 0
        self._failures = 0
        self._since = 0.0  # when the active engine took over
        self._tracked: dict[str, _Tracked] = {}
        self._owed: list[Delta] = []  # final deltas of requests that could not be retried
        self._on_seated: Callable[[list[str]], None] | None = None

    # --- the protocol ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._engine().name

    @property
    def max_context(self) -> int:
        return self._engine().max_context

    def load(self) -> None:
        self._activate(0)

    def count_tokens(self, prompt: str) -> int:
        return self._engine().count_tokens(prompt)

    def add_request(self, request: GenerationRequest) -> None:
        self._engine().add_request(request)
        self._tracked[request.request_id] = _Tracked(request)

    def abort(self, request_id: str) -> None:
        if request_id in self._tracked:
            self._engine().abort(request_id)

    def step(self) -> list[Delta]:
        self._maybe_probe_preferred()
        owed, self._owed = self._owed, []
        try:
            deltas = self._engine().step()
        except Exception as e:
            self._failures += 1
            log.warning("engine %s failed a step (%d in a row): %s", self.name, self._failures, e)
            if self._failures >= self.max_failures:
                self._fail_over(f"{self.name} failed {self._failures} steps in a row: {e}")
            return owed
        self._failures = 0
        return owed + [self._account(d) for d in deltas]

    def wake(self) -> None:
        active = self.active  # read once: another thread may swap engines meanwhile
        if active is not None:
            active.wake()

    def has_unfinished(self) -> bool:
        return bool(self._tracked) or bool(self._owed)

    def stats(self) -> EngineStats:
        return replace(self._engine().stats(), failovers=self.failovers)

    def expert_tokens(self) -> dict[str, list[list[int]]]:
        return self._engine().expert_tokens()

    def close(self) -> None:
        if self.active is not None:
            self.active.close()
            self.active = None

    @property
    def on_seated(self) -> Callable[[list[str]], None] | None:
        """Handed to every engine that takes it (the torch engines), now and after a failover."""
        return self._on_seated

    @on_seated.setter
    def on_seated(self, hook: Callable[[list[str]], None] | None) -> None:
        self._on_seated = hook
        if self.active is not None and hasattr(self.active, "on_seated"):
            self.active.on_seated = hook

    # --- switching ------------------------------------------------------------------------
    def _engine(self) -> Engine:
        if self.active is None:
            raise RuntimeError("no engine is loaded")
        return self.active

    def _activate(self, start: int) -> None:
        """Load builders[start:] in order until one loads; raises if none does."""
        errors = []
        for i in range(start, len(self.builders)):
            name, build = self.builders[i]
            try:
                engine = build()
                engine.load()
            except Exception as e:
                log.exception("engine %s failed to load", name)
                errors.append(f"{name}: {e}")
                continue
            self.active, self.index, self._since, self._failures = engine, i, self.clock(), 0
            if hasattr(engine, "on_seated"):
                engine.on_seated = self._on_seated
            return
        raise RuntimeError("no engine could be loaded: " + "; ".join(errors))

    def _fail_over(self, why: str) -> None:
        failed = self._engine()
        try:
            failed.close()
        except Exception:
            log.exception("closing the failed engine %s", failed.name)
        self.active = None
        self.failovers += 1
        log.error("failing over: %s", why)
        self._activate(self.index + 1)  # raises when the list is exhausted
        for tracked in list(self._tracked.values()):
            self._retry(tracked, why)

    def _retry(self, tracked: _Tracked, why: str) -> None:
        rid = tracked.request.request_id
        if tracked.retried:
            del self._tracked[rid]
            self._owed.append(self._final(tracked, FinishReason.ERROR, f"failed twice; last: {why}"))
            return
        tracked.retried = True
        tracked.base = tracked.completion
        made = "".join(tracked.text)
        left = tracked.request.params.max_tokens - tracked.completion
        if left <= 0:
            del self._tracked[rid]
            self._owed.append(self._final(tracked, FinishReason.LENGTH, None))
            return
        params = replace(tracked.request.params, max_tokens=left)
        request = replace(tracked.request, prompt=tracked.request.prompt + made, params=params)
        self._engine().add_request(request)

    def _maybe_probe_preferred(self) -> None:
        """Half-open: back to the preferred engine once the cool-down is over and nothing runs."""
        if self.index == 0 or self._tracked or self.clock() - self._since < self.cooldown_s:
            return
        fallback_index = self.index
        self._engine().close()
        self.active = None
        try:
            self._activate(0)
            self._probe()
            log.info("engine %s is back after its cool-down", self.name)
        except Exception as e:
            log.warning("preferred engine still failing (%s); back to the fallback", e)
            if self.active is not None:
                self.active.close()
                self.active = None
            self._activate(fallback_index)

    def _probe(self) -> None:
        engine = self._engine()
        engine.add_request(GenerationRequest("__probe", "probe", SamplingParams(max_tokens=1)))
        while engine.has_unfinished():
            for d in engine.step():
                if d.finish_reason is FinishReason.ERROR:
                    raise RuntimeError(d.error or "probe failed")

    # --- bookkeeping ----------------------------------------------------------------------
    def _account(self, d: Delta) -> Delta:
        tracked = self._tracked.get(d.request_id)
        if tracked is None:
            return d
        if tracked.prompt_tokens is None:
            tracked.prompt_tokens = d.prompt_tokens
        if d.text:
            tracked.text.append(d.text)
        d.prompt_tokens = tracked.prompt_tokens
        d.completion_tokens += tracked.base
        tracked.completion = d.completion_tokens
        if d.finish_reason is not None:
            del self._tracked[d.request_id]
        return d

    def _final(self, tracked: _Tracked, reason: FinishReason, error: str | None) -> Delta:
        return Delta(
            tracked.request.request_id,
            "",
            [],
            tracked.prompt_tokens or 0,
            tracked.completion,
            finish_reason=reason,
            error=error,
        )
