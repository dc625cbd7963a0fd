"""Expert telemetry on the real small models: every routed token is counted once per layer, under
its request's tag, padding never; and counting does not change what the engine generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_build.checkpoint import build_checkpoint
from moe_core.engine import GenerationRequest, SamplingParams
from moe_core.loader import inspect_model
from moe_core.torch_engine import TorchEngine
from scheduler.registry import shared_tokens
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
    # Shared experts, counted apart: every token of a MoE layer, once per shared expert. How many
    # the checkpoint says it has is what the loaded model's shared MLP is as wide as.
    info = inspect_model(model)
    shared = {"deepseek_v2": 2, "deepseek_v3": 1, "glm4_moe": 1, "qwen2_moe": 1}.get(arch, 0)
    assert info.shared_experts == shared
    config = engine.model.config
    for name, module in engine.model.named_modules():
        if name.endswith("shared_experts"):  # DeepSeek, GLM: n_shared_experts experts in one MLP
            assert module.gate_proj.out_features == config.moe_intermediate_size * shared
        elif name.endswith("shared_expert"):  # Qwen2-MoE: one, of its own width
            assert shared == 1
    assert any(n.endswith(("shared_experts", "shared_expert")) for n, _ in engine.model.named_modules()) == (
        shared > 0
    )
    expected = {
        tag: [sum(fed[i] for i in ids) * shared] * len(counts[tag])
        for tag, ids in (("code", ["c1", "c2"]), ("text", ["t1"]))
    }
    assert shared_tokens(counts, top_k, info.shared_experts) == (expected if shared else {})


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


def test_shared_expert_tokens_in_the_heartbeat_and_metrics() -> None:
    """A worker of a model with shared experts reports their tokens apart from the routed
    choices: per modality and layer, every token once per shared expert, in its heartbeat record
    and as its own Prometheus family."""
    from prometheus_client import generate_latest

    from scheduler.registry import WorkerInfo
    from workers.metrics import WorkerMetrics

    routed = {"code": [[3, 1, 0, 2], [0, 2, 2, 2]], "text": [[1, 1, 0, 0], [0, 0, 2, 0]]}  # top-2
    info = WorkerInfo(
        name="w0", pid=1, queues=[], engine="torch", device="cpu", model="m", max_context=64,
        capacity=4, ready=True, started_at=0.0, heartbeat_at=0.0, experts_per_token=2,
        shared_experts=2, expert_tokens=routed,
    )  # fmt: skip
    assert info.shared_expert_tokens == {"code": [6, 6], "text": [2, 2]}  # 3 and 1 tokens, 2 experts each
    assert WorkerInfo.model_validate_json(info.model_dump_json()) == info
    text = generate_latest(WorkerMetrics(info).registry).decode()
    assert 'localmoe_shared_expert_tokens_total{layer="1",modality="code",worker="w0"} 6.0' in text
    assert 'localmoe_expert_tokens_total{expert="0",layer="0",modality="code",worker="w0"} 3.0' in text
