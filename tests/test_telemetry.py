"""Expert telemetry on the real small models: every routed token is counted once per layer, under
its request's tag, padding never; and counting does not change what the engine generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_build.checkpoint import build_checkpoint
from moe_core.engine import GenerationRequest, SamplingParams
from moe_core.torch_engine import TorchEngine
from tests.parity import ARCH_PARAMS


def run(engine: TorchEngine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
    return out


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_counts_every_routed_token_under_its_tag(tmp_path: Path, arch: str) -> None:
    model = build_checkpoint(tmp_path / arch, arch=arch, progress=False)
    engine = TorchEngine(model, max_batch_size=8)
    engine.load()
    assert engine.expert_tokens() == {}  # the warm-up is not counted
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    requests = [
        GenerationRequest("c1", "def fibonacci(n):\n    if n < 2:\n", params, tag="code"),
        GenerationRequest("c2", "import os\n", params, tag="code"),  # shorter: left padding in the prefill
        GenerationRequest(
            "t1", "The weather was mild and the river ran slowly past the town", params, tag="text"
        ),
    ]
    run(engine, requests)
    counts = engine.expert_tokens()
    assert set(counts) == {"code", "text"}
    top_k = 2
    # A request's forwards carry its prompt once, then each sampled token but the last.
    fed = {r.request_id: engine.count_tokens(r.prompt) + 6 - 1 for r in requests}
    for tag, ids in (("code", ["c1", "c2"]), ("text", ["t1"])):
        per_layer = [sum(layer) for layer in counts[tag]]
        assert per_layer == [top_k * sum(fed[i] for i in ids)] * len(per_layer)
        assert all(len(layer) == 8 for layer in counts[tag])


def test_counting_does_not_change_outputs(model_dir: Path) -> None:
    params = SamplingParams(max_tokens=12)
    requests = [
        GenerationRequest(f"r{i}", p, params, tag="code")
        for i, p in enumerate(["def f(x):\n", "class A:\n    pass\n", "x = [i for i in"])
    ]
    with_counts = TorchEngine(model_dir, max_batch_size=4)
    without = TorchEngine(model_dir, max_batch_size=4, telemetry=False)
    with_counts.load()
    without.load()
    assert run(with_counts, requests) == run(without, requests)
    assert without.expert_tokens() == {}


def test_routed_counts_from_reported_routing() -> None:
    """What vLLM reports per finished request ([tokens, layers, k] expert ids), counted per tag."""
    import numpy as np

    from moe_core.telemetry import MAX_TAGS, RoutedCounts

    counts = RoutedCounts(num_experts=4)
    routed = np.array([[[0, 1], [2, 3]], [[0, 2], [3, 3]], [[1, 0], [2, 1]]])  # 3 tokens, 2 layers, k=2
    counts.add("code", routed)
    counts.add("code", routed[:1])
    counts.add("text", routed[2:])
    snap = counts.snapshot()
    assert snap["code"] == [[4, 3, 1, 0], [0, 1, 3, 4]]  # layer 0: (0,1) (0,2) (1,0), then (0,1) again
    assert snap["text"] == [[1, 1, 0, 0], [0, 1, 1, 0]]
    counts.add("code", np.zeros((0, 2, 2), dtype=np.int64))  # a request with no routing: nothing
    assert counts.snapshot()["code"] == snap["code"]
    for i in range(MAX_TAGS + 2):
        counts.add(f"t{i}", routed[:1])
    assert len(counts.snapshot()) == MAX_TAGS
    counts.reset()
    assert counts.snapshot() == {}


def test_counters_move_to_where_the_forward_runs(model_dir: Path) -> None:
    """A tensor-parallel or offloaded model is loaded on the CPU and placed by DeepSpeed afterwards:
    every counter buffer must follow it (on an H200 the first TP load failed on one left behind)."""
    import torch

    from moe_core.loader import load_model
    from moe_core.telemetry import ExpertTelemetry

    model, _ = load_model(model_dir, "cpu", "float32")
    telemetry = ExpertTelemetry(model)
    telemetry.to(torch.device("meta"))  # a device other than the weights': what a GPU would be here
    tensors = [v for v in vars(telemetry).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 3 and {t.device.type for t in tensors} == {"meta"}
    assert telemetry.device == torch.device("meta")
