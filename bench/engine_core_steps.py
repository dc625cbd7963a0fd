"""Where vLLM's engine core spends a step, timed inside it (a benchmark tool, not the product).

`scheduler` is a vLLM `scheduler_cls`. It builds the scheduler LocalMoE's vLLM engine runs
(moe_core/vllm_masks.py; STEP_MASKS in the environment names which of engine.vllm.structured_masks'
ways: parallel, the default, in-turn or vllm) and times the scheduler's calls in the engine core's
loop, per step:

- `schedule()`, and the period from one `schedule()` to the next: the whole step as the engine core
  lives it. What the period holds beyond the three calls below is the model runner's input
  preparation, launches and waits for the GPU (one process, one thread, in turn);
- `update_from_output()`: a step's tokens taken in, the grammars' accepts among them;
- `get_grammar_bitmask()`: the step's masks (with `parallel`, the next step's `schedule()` run
  during the fill is inside it, and the loop's own call then only hands that output out).

A step is "structured" when it schedules a structured-output request, "plain" otherwise. The
totals go, as JSON, to the file named by STEP_TIMES (at most every 0.2 s and when the last request
ends, written whole and renamed); `read` gives them and `per_step` one phase's mean per step. A
gap of more than IDLE_S between two schedules (the engine idle between phases) is not counted as a
step's period.

    python -m bench.structured_output --backend vllm --step-times ...
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from moe_core import vllm_masks

SCHEDULER = f"{__name__}.scheduler"
STEP_TIMES = "LOCALMOE_BENCH_STEP_TIMES"  # the file the engine core writes its totals to
STEP_MASKS = "LOCALMOE_BENCH_STEP_MASKS"  # "parallel" (LocalMoE's, the default), "in-turn" or "vllm"
IDLE_S = 0.5
KINDS = ("structured", "plain")
FIELDS = ("steps", "period_ms", "schedule_ms", "update_ms", "masks_ms")


def scheduler(*args: Any, **kwargs: Any) -> Any:
    """vLLM's scheduler_cls: the scheduler LocalMoE's engine would build, its calls timed."""
    ways = {"parallel": vllm_masks.scheduler, "in-turn": vllm_masks.scheduler_in_turn}
    built = ways.get(os.environ.get(STEP_MASKS, "parallel"), vllm_masks.vllms_scheduler)(*args, **kwargs)
    path = os.environ.get(STEP_TIMES)
    if path:
        Timeline(Path(path)).wrap(built)
    return built


class Timeline:
    """The totals of one engine core's scheduler calls, by kind of step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.totals = {kind: dict.fromkeys(FIELDS, 0.0) for kind in KINDS}
        self._last: tuple[float, str] | None = None  # the last schedule()'s start and kind
        self._written = 0.0

    def wrap(self, sched: Any) -> None:
        schedule, update, masks = sched.schedule, sched.update_from_output, sched.get_grammar_bitmask

        def timed_schedule(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if self._last is not None and start - self._last[0] < IDLE_S:
                kind = self.totals[self._last[1]]
                kind["steps"] += 1
                kind["period_ms"] += 1000 * (start - self._last[0])
            out = schedule(*args, **kwargs)
            kind_name = _kind(out)
            self.totals[kind_name]["schedule_ms"] += 1000 * (time.perf_counter() - start)
            self._last = (start, kind_name)
            self._write(start)
            return out

        def timed_update(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return update(scheduler_output, *args, **kwargs)
            finally:
                now = time.perf_counter()
                self.totals[_kind(scheduler_output)]["update_ms"] += 1000 * (now - start)
                if not sched.has_requests():  # the last step of a phase: its totals out now
                    self._write(now, force=True)

        def timed_masks(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return masks(scheduler_output, *args, **kwargs)
            finally:
                self.totals[_kind(scheduler_output)]["masks_ms"] += 1000 * (time.perf_counter() - start)

        sched.schedule, sched.update_from_output = timed_schedule, timed_update
        sched.get_grammar_bitmask = timed_masks

    def _write(self, now: float, force: bool = False) -> None:
        if now - self._written < 0.2 and not force:
            return
        self._written = now
        scratch = self.path.with_suffix(".part")
        scratch.write_text(json.dumps(self.totals))
        os.replace(scratch, self.path)


def _kind(scheduler_output: Any) -> str:
    return "structured" if getattr(scheduler_output, "has_structured_output_requests", False) else "plain"


def read(path: Path) -> dict[str, dict[str, float]]:
    """The totals the engine core wrote last (zeros before its first write)."""
    try:
        totals: dict[str, dict[str, float]] = json.loads(path.read_text())
        return totals
    except (FileNotFoundError, ValueError):
        return {kind: dict.fromkeys(FIELDS, 0.0) for kind in KINDS}


def per_step(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], kind: str
) -> dict[str, float]:
    """One phase's mean ms per step of `kind` (between two reads): period, schedule, update,
    masks, and the rest of the period ("runner": the model runner's preparation, launches and
    waits); steps: how many. The calls of a phase's last step, whose period ends idle and is not
    counted, are in the sums: the means are high by about one step in `steps`."""
    delta = {f: after[kind][f] - before[kind][f] for f in FIELDS}
    steps = delta["steps"]
    if not steps:
        return {"steps": 0}
    mean = {f: round(delta[f] / steps, 3) for f in FIELDS if f != "steps"}
    mean["runner_ms"] = round(
        mean["period_ms"] - mean["schedule_ms"] - mean["update_ms"] - mean["masks_ms"], 3
    )
    return {"steps": int(steps), **mean}
