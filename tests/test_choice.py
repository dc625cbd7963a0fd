"""The automatic engine choice and its GPU memory plan, on the real small model's ModelInfo with its
size varied (and the reference model's shapes, for the plan's arithmetic)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from moe_core.choice import GIB, Budget, choose, plan_memory, routed_expert_bytes
from moe_core.loader import ModelInfo, inspect_model

GB = 10**9
B40 = Budget(40 * GB)
BOTH = frozenset({"vllm", "deepspeed"})
MIXTRAL = frozenset({"MixtralForCausalLM"})  # what vLLM's registry is said to run


@pytest.fixture(scope="module")
def info(model_dir: Path) -> ModelInfo:
    return inspect_model(model_dir)


def sized(info: ModelInfo, gb: float) -> ModelInfo:
    return dataclasses.replace(info, size_bytes=int(gb * GB))


def test_fits_the_budget_takes_vllm(info: ModelInfo) -> None:
    c = choose("auto", sized(info, 26), "cuda", B40, frozenset({"vllm", "deepspeed"}))
    assert (c.backend, c.offload, c.fallbacks) == ("vllm", "none", ("torch",))
    assert "fit" in c.reason and "26.0 GB" in c.reason


def test_too_large_takes_vllm_with_the_rest_in_cpu_memory(info: ModelInfo) -> None:
    """93 GB of weights, 40 GB budget: the tiny shapes need less than the 20 % floor (8 GB) for
    activations and KV cache, so 32 GB of weights stay on the GPU and 61 GB = 56.81 GiB go to CPU
    memory (rounded up to 0.01 GiB); the KV cache gets what the reserve leaves beside activations."""
    c = choose("auto", sized(info, 93), "cuda", B40, BOTH, vllm_archs=MIXTRAL)
    assert (c.backend, c.offload, c.cpu_offload_gb, c.fallbacks) == (
        "vllm",
        "vllm_cpu",
        56.82,
        ("deepspeed", "torch"),
    )
    plan = plan_memory(info, 93 * GB, B40)
    assert plan.reserve == 8 * GB and c.kv_cache_bytes == plan.kv_cache == 8 * GB - plan.runtime
    assert "exceed the 32.00 GB" in c.reason and "56.82 GiB" in c.reason and "cpu_offload_gb" in c.reason


def test_deepspeed_offload_only_where_vllm_cannot_run_it(info: ModelInfo) -> None:
    big = sized(info, 93)
    c = choose("auto", big, "cuda", B40, frozenset({"deepspeed"}))  # no vLLM
    assert (c.backend, c.offload, c.fallbacks) == ("deepspeed", "zero3", ("torch",))
    assert "offloaded to CPU (vLLM is not installed)" in c.reason
    c = choose("auto", big, "cuda", B40, BOTH, vllm_archs={"OlmoeForCausalLM"})  # not Mixtral
    assert (c.backend, c.offload) == ("deepspeed", "zero3")
    assert "vLLM's registry has no MixtralForCausalLM" in c.reason
    c = choose("auto", big, "cuda", B40, BOTH, offload="zero3", vllm_archs=MIXTRAL)  # asked for
    assert (c.backend, c.offload) == ("deepspeed", "zero3") and "(engine.offload: zero3)" in c.reason
    c = choose("deepspeed", big, "cuda", B40, BOTH, vllm_archs=MIXTRAL)  # configured
    assert (c.backend, c.offload) == ("deepspeed", "zero3")
    c = choose("vllm", big, "cuda", B40, BOTH, vllm_archs={"OlmoeForCausalLM"})  # configured: as it is
    assert (c.backend, c.offload, c.fallbacks) == ("vllm", "vllm_cpu", ("torch",))


def test_offload_none_refuses_what_does_not_fit(info: ModelInfo) -> None:
    assert choose("auto", sized(info, 26), "cuda", B40, BOTH, offload="none").offload == "none"
    for backend in ("auto", "vllm", "deepspeed", "torch"):
        with pytest.raises(
            RuntimeError, match=r"weights 35\.00 GB exceed the 32\.00 GB .* engine.offload is none"
        ):
            choose(backend, sized(info, 35), "cuda", B40, BOTH, offload="none", vllm_archs=MIXTRAL)  # type: ignore[arg-type]


def test_an_offload_that_cannot_run_is_refused(info: ModelInfo) -> None:
    big = sized(info, 93)
    with pytest.raises(RuntimeError, match=r"engine\.offload is vllm_cpu, but vLLM is not installed"):
        choose("auto", big, "cuda", B40, frozenset({"deepspeed"}), offload="vllm_cpu")
    with pytest.raises(
        RuntimeError, match=r"engine\.offload is zero3, but the deepspeed package is not installed"
    ):
        choose("auto", big, "cuda", B40, frozenset({"vllm"}), offload="zero3")
    with pytest.raises(
        RuntimeError, match=r"engine\.backend vllm cannot offload as engine\.offload zero3 asks"
    ):
        choose("vllm", big, "cuda", B40, BOTH, offload="zero3")
    with pytest.raises(RuntimeError, match="cannot hold the KV cache and activations"):
        choose("auto", big, "cuda", Budget(1 * GB), BOTH, vllm_archs=MIXTRAL)  # 1 GiB fixed alone


def test_headroom_counts(info: ModelInfo) -> None:  # 35 GB of weights leave too little of 40 GB
    assert choose("auto", sized(info, 35), "cuda", B40, BOTH, vllm_archs=MIXTRAL).offload == "vllm_cpu"


REFERENCE = ModelInfo(  # bench/offload_gpu.py's model: 4.76 B bf16 Mixtral, 16 layers, 8 KV heads of 128
    path=Path("reference"),
    arch="mixtral",
    num_parameters_estimate=4_760_000_000,
    size_bytes=9_520_000_000,
    max_context=2048,
    num_experts=8,
    experts_per_token=2,
    num_layers=16,
    eos_token_ids=(2,),
    architectures=("MixtralForCausalLM",),
    hidden_size=2048,
    expert_intermediate_size=5632,
    vocab_size=32000,
    kv_values_per_token=16 * 2 * 8 * 128,
)


def test_the_expert_cache_keeps_as_many_experts_as_the_budget_leaves() -> None:
    """engine.offload experts, the reference shapes over a 10 GB budget: the routed experts are
    16 layers × 8 × 3 × 2048 × 5632 parameters at 2 B (8.86 of the 9.52 GB); everything else stays
    on the GPU, and the experts get what the weights' share of the budget leaves beside it. vLLM
    holds the cache where it runs the model (its KV cache what the plan leaves, torch the
    fallback), the torch engine otherwise. vLLM's cache computing its misses in place needs no
    more; gathering them into rows of their own first (engine.expert_cache.misses gather) takes up
    to E - slots + 2 experts of GPU memory, counted in the same room: one slot fewer here."""
    budget = Budget(10 * GB, max_batch_size=16)
    plan = plan_memory(REFERENCE, REFERENCE.size_bytes, budget)
    experts = 16 * 8 * 3 * 2048 * 5632 * 2
    assert routed_expert_bytes(REFERENCE, REFERENCE.size_bytes) == experts
    share = (plan.gpu_weights - (REFERENCE.size_bytes - experts)) / experts
    c = choose("auto", REFERENCE, "cuda", budget, BOTH, offload="experts", vllm_archs=MIXTRAL)
    assert (c.backend, c.offload, c.fallbacks, c.kv_cache_bytes) == (
        "vllm",
        "experts",
        ("torch",),
        plan.kv_cache,
    )
    assert 0.625 < share < 0.65  # 5 of 8 slots fit, and not the 5 + 5 rows of gathered misses
    assert c.resident_fraction == 0.625
    assert "the vllm engine with 5 of 8 routed experts per layer on the GPU" in c.reason
    c = choose(
        "auto", REFERENCE, "cuda", budget, BOTH, offload="experts", vllm_archs=MIXTRAL, misses="gather"
    )
    assert c.resident_fraction == 0.5
    assert "the vllm engine with 4 of 8 routed experts per layer on the GPU" in c.reason
    assert choose("vllm", REFERENCE, "cuda", budget, BOTH, offload="experts").backend == "vllm"
    for have, archs in ((frozenset({"deepspeed"}), MIXTRAL), (BOTH, frozenset({"OtherForCausalLM"}))):
        c = choose("auto", REFERENCE, "cuda", budget, have, offload="experts", vllm_archs=archs)
        assert (c.backend, c.offload, c.fallbacks, c.kv_cache_bytes) == ("torch", "experts", (), None)
        assert "the torch engine with 5 of 8 routed experts per layer on the GPU" in c.reason
    c = choose("torch", REFERENCE, "cuda", budget, BOTH, offload="experts", resident_fraction=0.25)
    assert (c.backend, c.offload, c.resident_fraction) == ("torch", "experts", 0.25)
    # a given share: its slots (int(0.9 x 8) = 7 of 16 x 69.2 MB), and 3 rows when gathering
    seven = r"7 of 8 routed experts per layer \(7\.75 GB\)"
    for misses, what in (
        ("in_place", " do not fit"),
        ("gather", r" and rows for the step's others \(0\.21 GB"),
    ):
        with pytest.raises(
            RuntimeError, match=seven + what + r".*lower engine\.expert_cache\.resident_fraction"
        ):
            choose(
                "auto",
                REFERENCE,
                "cuda",
                budget,
                BOTH,
                offload="experts",
                resident_fraction=0.9,
                vllm_archs=MIXTRAL,
                misses=misses,  # type: ignore[arg-type]
            )
    # one slot a layer fits, but not with the 8 rows its misses may need: in place does
    small = Budget(5.8 * GB, max_batch_size=16)
    with pytest.raises(RuntimeError, match=r"0\.55 GB, engine\.expert_cache\.misses gather.*to in_place"):
        choose("auto", REFERENCE, "cuda", small, BOTH, offload="experts", vllm_archs=MIXTRAL, misses="gather")
    c = choose("auto", REFERENCE, "cuda", small, BOTH, offload="experts", vllm_archs=MIXTRAL)
    assert c.resident_fraction == 1 / 8
    with pytest.raises(RuntimeError, match="cannot hold one expert per layer as well"):
        choose(
            "auto",
            REFERENCE,
            "cuda",
            Budget(5 * GB, max_batch_size=16),
            BOTH,
            offload="experts",
            vllm_archs=MIXTRAL,
        )
    with pytest.raises(
        RuntimeError, match=r"the vLLM and torch engines' cache, not engine\.backend deepspeed's"
    ):
        choose("deepspeed", REFERENCE, "cuda", budget, BOTH, offload="experts")
    # a model that fits, or no GPU: every weight in place, whatever engine.offload says
    assert choose("auto", REFERENCE, "cuda", B40, BOTH, offload="experts").offload == "none"
    c = choose("auto", REFERENCE, "cpu", budget, BOTH, offload="experts")
    assert (c.backend, c.offload, c.resident_fraction) == ("torch", "none", None)


def test_the_plan_reserves_activations_and_kv_cache_from_the_shapes() -> None:
    """Reference shapes, batch 16, 16384 tokens a step, bf16: activations 16384 × (2 × (3 × 5632 +
    2048) + 6 × 2048) × 2 B + 16 × 32000 × 8 B; KV for 16 × 1024 tokens (more than the 2048 of one
    full context) × 32768 values × 2 B = 1 GiB. That reserve beats the 20 % floor of a 10 GB
    budget, and leaves 10 GB − reserve to weights."""
    budget = Budget(10 * GB, max_batch_size=16)
    plan = plan_memory(REFERENCE, REFERENCE.size_bytes, budget)
    activations = 16384 * (2 * (3 * 5632 + 2048) + 6 * 2048) * 2 + 16 * 32000 * 8
    assert plan.runtime == activations + GIB
    assert plan.kv_cache == 16 * 1024 * 32768 * 2 == GIB
    assert plan.reserve == plan.runtime + plan.kv_cache > 2 * GB
    assert plan.gpu_weights + plan.reserve == budget.gpu_bytes
    assert plan.gpu_weights + plan.offload == plan.weights == REFERENCE.size_bytes
    # a larger batch plans more KV cache, and so more weights go to CPU memory
    assert (
        plan_memory(REFERENCE, REFERENCE.size_bytes, Budget(10 * GB, max_batch_size=64)).offload
        > plan.offload
    )
    # a large budget keeps its 20 % floor: the KV cache grows with it
    roomy = plan_memory(REFERENCE, REFERENCE.size_bytes, Budget(40 * GB, max_batch_size=16))
    assert (roomy.reserve, roomy.offload, roomy.kv_cache) == (8 * GB, 0, 8 * GB - roomy.runtime)


def test_the_budget_is_per_gpu_and_tensor_parallel_splits_the_weights() -> None:
    one = choose("auto", REFERENCE, "cuda", Budget(9 * GB, max_batch_size=16), BOTH, vllm_archs=MIXTRAL)
    two = choose(
        "auto", REFERENCE, "cuda", Budget(9 * GB, gpus=2, max_batch_size=16), BOTH, vllm_archs=MIXTRAL
    )
    assert one.offload == "vllm_cpu" and two.offload == "none"  # 4.76 GB a GPU fit beside the reserve


def test_a_quantized_checkpoint_that_does_not_fit_offloads_in_vllm(info: ModelInfo) -> None:
    fp8 = dataclasses.replace(sized(info, 93), quantization="fp8")
    c = choose("auto", fp8, "cuda", B40, BOTH)
    assert (c.backend, c.offload, c.fallbacks, c.cpu_offload_gb) == ("vllm", "vllm_cpu", (), 56.82)
    with pytest.raises(RuntimeError, match=r"quantized \(fp8\).*engine.offload is zero3: only vLLM runs it"):
        choose("auto", fp8, "cuda", B40, BOTH, offload="zero3")


def test_nothing_installed_or_no_gpu_takes_torch(info: ModelInfo) -> None:
    assert choose("auto", sized(info, 26), "cuda", B40, frozenset()).backend == "torch"
    assert "vLLM is not installed" in choose("auto", sized(info, 26), "cuda", B40, frozenset()).reason
    assert choose("auto", info, "cpu", B40, frozenset({"vllm", "deepspeed"})).backend == "torch"


def test_configured_backend_wins_or_is_refused(info: ModelInfo) -> None:
    assert choose("torch", sized(info, 26), "cuda", B40, frozenset({"vllm"})).backend == "torch"
    with pytest.raises(RuntimeError, match="vllm package is not installed"):
        choose("vllm", info, "cuda", B40, frozenset())


def test_real_lookup_on_this_machine(info: ModelInfo) -> None:
    assert choose("auto", info, "cpu", B40).backend == "torch"


def test_a_quantized_checkpoint_goes_to_vllm_or_is_refused(info: ModelInfo) -> None:
    fp8 = dataclasses.replace(info, quantization="fp8")
    c = choose("auto", fp8, "cuda", B40, frozenset({"vllm", "deepspeed"}))
    assert (c.backend, c.fallbacks) == ("vllm", ())  # PyTorch cannot run its weights: no fallback
    assert "quantized checkpoint (fp8)" in c.reason
    assert choose("vllm", fp8, "cuda", B40, frozenset({"vllm"})).backend == "vllm"
    for backend in ("torch", "deepspeed"):
        with pytest.raises(RuntimeError, match=r"quantized \(fp8\): only the vLLM engine runs it"):
            choose(backend, fp8, "cuda", B40, frozenset({"vllm", "deepspeed"}))
    with pytest.raises(RuntimeError, match="needs vLLM on a GPU"):
        choose("auto", fp8, "cpu", B40, frozenset({"vllm", "deepspeed"}))
    with pytest.raises(RuntimeError, match="needs vLLM, which is not installed"):
        choose("auto", fp8, "cuda", B40, frozenset({"deepspeed"}))


def test_fp8_on_load_counts_a_byte_per_parameter(info: ModelInfo) -> None:
    """A bf16 checkpoint of 40 GB does not fit a 40 GB budget; quantized to fp8 as vLLM loads it, its
    20 GB do."""
    big = dataclasses.replace(info, size_bytes=40 * GB, num_parameters_estimate=20 * GB)
    have = frozenset({"vllm", "deepspeed"})
    assert choose("auto", big, "cuda", B40, have, vllm_archs=MIXTRAL).offload == "vllm_cpu"
    c = choose("auto", big, "cuda", B40, have, quantize="fp8")
    assert c.backend == "vllm" and "20.0 GB" in c.reason


def test_the_checkpoint_says_how_it_is_quantized(model_dir: Path, tmp_path: Path) -> None:
    quantized = tmp_path / "fp8"
    shutil.copytree(model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "FP8", "activation_scheme": "dynamic"}
    (quantized / "config.json").write_text(json.dumps(config))
    assert inspect_model(quantized).quantization == "fp8" and inspect_model(model_dir).quantization is None
    # a worker configured for PyTorch refuses it at start, before loading anything
    from host.settings import EngineSettings
    from workers.engine_setup import start_engine

    with pytest.raises(RuntimeError, match=r"quantized \(fp8\).*set engine.backend to vllm"):
        start_engine(quantized, "cpu", EngineSettings(backend="torch"))


def test_offload_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from host.settings import EngineSettings, Settings

    assert EngineSettings().offload == "auto"
    assert EngineSettings(backend="vllm", offload="vllm_cpu").offload == "vllm_cpu"
    assert EngineSettings(backend="deepspeed", offload="zero3").offload == "zero3"
    for backend, offload in (("vllm", "zero3"), ("deepspeed", "vllm_cpu"), ("torch", "vllm_cpu")):
        with pytest.raises(
            ValidationError, match=f"engine.offload {offload} is .*, not engine.backend {backend}"
        ):
            EngineSettings(backend=backend, offload=offload)  # type: ignore[arg-type]
    with pytest.raises(
        ValidationError, match=r"engine\.offload none contradicts engine\.deepspeed\.offload cpu"
    ):
        EngineSettings(offload="none", deepspeed={"offload": "cpu"})  # type: ignore[arg-type]
    with pytest.raises(
        ValidationError, match="Input should be 'auto', 'none', 'vllm_cpu', 'experts' or 'zero3'"
    ):
        EngineSettings(offload="sometimes")  # type: ignore[arg-type]
    cache = Settings(engine={"offload": "experts", "expert_cache": {"resident_fraction": 0.5}})  # type: ignore[arg-type]
    assert cache.engine.expert_cache.resident_fraction == 0.5
    with pytest.raises(ValidationError, match="resident_fraction"):
        Settings(engine={"expert_cache": {"resident_fraction": 1.5}})  # type: ignore[arg-type]
    assert EngineSettings(backend="vllm", offload="experts").offload == "experts"
    with pytest.raises(
        ValidationError, match=r"offload experts is vllm or torch's, not engine\.backend deepspeed"
    ):
        EngineSettings(backend="deepspeed", offload="experts")
    monkeypatch.setenv("LOCALMOE_ENGINE__OFFLOAD", "zero3")  # the environment twin
    assert Settings().engine.offload == "zero3"


def test_a_worker_builds_the_expert_cache_its_choice_names(model_dir: Path) -> None:
    """construct() hands the choice's resident share to the torch engine, which holds the model's
    experts in its cache (on the CPU here: the same code a GPU runs)."""
    from host.settings import EngineSettings
    from moe_core.choice import Choice
    from moe_core.torch_engine import TorchEngine
    from workers.engine_setup import construct, offload_of

    choice = Choice("torch", "experts", "does not fit", (), resident_fraction=0.25)
    assert offload_of("torch", choice, EngineSettings()) == "experts"
    engine = construct("torch", model_dir, "cpu", EngineSettings(offload="experts"), choice)
    assert isinstance(engine, TorchEngine)
    engine.load()
    try:
        assert engine.expert_cache is not None
        experts = engine.expert_cache.layers[0].num_experts
        assert engine.expert_cache.slots == [max(1, experts // 4)] * len(engine.expert_cache.layers)
        stats = engine.stats()  # the warm-up ran through the cache
        assert (
            0 < stats.expert_cache_hits < stats.expert_cache_needed and stats.expert_cache_fetched_bytes > 0
        )
    finally:
        engine.close()
    plain = construct("torch", model_dir, "cpu", EngineSettings(), Choice("torch", "none", "fits", ()))
    assert isinstance(plain, TorchEngine) and plain._expert_fraction is None
