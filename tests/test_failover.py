"""FailoverEngine with real TorchEngines on CPU; faults come from one deliberate seam, an engine
wrapper that fails to load or fails its steps on cue."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_core.engine import Delta, Engine, EngineStats, FinishReason, GenerationRequest, SamplingParams
from moe_core.failover import FailoverEngine
from moe_core.torch_engine import TorchEngine


class FaultInjector:
    """A real engine whose load fails, or whose steps fail from step `fail_from` on."""

    def __init__(self, engine: Engine, fail_from: int | None = None, fail_load: bool = False) -> None:
        self.engine, self.fail_from, self.fail_load, self.steps = engine, fail_from, fail_load, 0
        self.name = f"faulty-{engine.name}"

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def load(self) -> None:
        if self.fail_load:
            raise RuntimeError("injected load fault")
        self.engine.load()

    def count_tokens(self, prompt: str) -> int:
        return self.engine.count_tokens(prompt)

    def add_request(self, request: GenerationRequest) -> None:
        self.engine.add_request(request)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def step(self) -> list[Delta]:
        self.steps += 1
        if self.fail_from is not None and self.steps >= self.fail_from:
            raise RuntimeError("injected step fault")
        return self.engine.step()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def expert_tokens(self) -> dict[str, list[list[int]]]:
        return self.engine.expert_tokens()

    def close(self) -> None:
        self.engine.close()


def run(engine: FailoverEngine, prompts: list[str], max_tokens: int) -> dict[str, list[Delta]]:
    for i, p in enumerate(prompts):
        engine.add_request(
            GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        )
    out: dict[str, list[Delta]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return out
        for d in engine.step():
            out.setdefault(d.request_id, []).append(d)
    raise AssertionError("did not finish")


PROMPTS = ["def fibonacci(n):\n", "The router sends each token to", "import os\nimport sys\n"]


def test_load_failure_falls_back(model_dir: Path) -> None:
    engine = FailoverEngine(
        [
            ("broken", lambda: FaultInjector(TorchEngine(model_dir), fail_load=True)),
            ("torch", lambda: TorchEngine(model_dir)),
        ]
    )
    engine.load()
    assert engine.name == "torch" and engine.index == 1
    out = run(engine, PROMPTS, 6)
    assert all(ds[-1].finish_reason is FinishReason.LENGTH for ds in out.values())


def test_step_failures_switch_engines_and_continue_in_flight_jobs(model_dir: Path) -> None:
    engine = FailoverEngine(
        [
            ("primary", lambda: FaultInjector(TorchEngine(model_dir), fail_from=6)),
            ("torch", lambda: TorchEngine(model_dir)),
        ],
        max_failures=2,
    )
    engine.load()
    seated: list[str] = []
    engine.on_seated = seated.extend  # the worker's hook reaches the engine that takes over
    out = run(engine, PROMPTS, 20)
    assert engine.name == "torch" and engine.stats().failovers == 1
    # the retries, seated by the fallback (the primary, a wrapper, takes no hook)
    assert sorted(seated) == ["r0", "r1", "r2"]
    for ds in out.values():
        final = ds[-1]
        assert final.finish_reason is FinishReason.LENGTH
        assert final.completion_tokens == 20  # the retry made only what was missing
        assert final.prompt_tokens == ds[0].prompt_tokens  # counted on the original prompt
        made_first = sum(len(d.token_ids) for d in ds)
        assert made_first == 20  # no token handed out twice


def test_a_job_failing_twice_ends_in_error(model_dir: Path) -> None:
    engine = FailoverEngine(
        [
            ("a", lambda: FaultInjector(TorchEngine(model_dir), fail_from=3)),
            ("b", lambda: FaultInjector(TorchEngine(model_dir), fail_from=3)),
            ("torch", lambda: TorchEngine(model_dir)),
        ],
        max_failures=1,
    )
    engine.load()
    out = run(engine, PROMPTS[:1], 30)
    final = out["r0"][-1]
    assert final.finish_reason is FinishReason.ERROR and final.error and "failed twice" in final.error
    assert engine.stats().failovers == 2


def test_half_open_probe_returns_to_the_preferred_engine(model_dir: Path) -> None:
    now = [0.0]
    builds = {"n": 0}

    def preferred() -> Engine:
        builds["n"] += 1  # the first build is broken; after its cool-down it works again
        return FaultInjector(TorchEngine(model_dir), fail_from=2 if builds["n"] == 1 else None)

    engine = FailoverEngine(
        [("preferred", preferred), ("torch", lambda: TorchEngine(model_dir))],
        max_failures=1,
        cooldown_s=30,
        clock=lambda: now[0],
    )
    engine.load()
    run(engine, PROMPTS[:1], 5)
    assert engine.index == 1
    now[0] = 10.0
    run(engine, PROMPTS[:1], 2)
    assert engine.index == 1  # still cooling down
    now[0] = 31.0
    assert engine.step() == []  # an idle step, as the worker's loop makes when nothing runs
    out = run(engine, PROMPTS[:1], 3)
    assert engine.index == 0 and builds["n"] == 2  # probed, and serving again
    assert out["r0"][-1].finish_reason is FinishReason.LENGTH


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
