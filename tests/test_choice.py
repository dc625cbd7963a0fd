"""The automatic engine choice, on the real small model's ModelInfo with its size varied."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from moe_core.choice import choose
from moe_core.loader import ModelInfo, inspect_model

GB = 10**9


@pytest.fixture(scope="module")
def info(model_dir: Path) -> ModelInfo:
    return inspect_model(model_dir)


def sized(info: ModelInfo, gb: float) -> ModelInfo:
    return dataclasses.replace(info, size_bytes=int(gb * GB))


def test_fits_the_budget_takes_vllm(info: ModelInfo) -> None:
    c = choose("auto", sized(info, 26), "cuda", 40 * GB, frozenset({"vllm", "deepspeed"}))
    assert (c.backend, c.offload, c.fallbacks) == ("vllm", False, ("torch",))
    assert "fit" in c.reason and "26.0 GB" in c.reason


def test_too_large_takes_deepspeed_offload(info: ModelInfo) -> None:
    c = choose("auto", sized(info, 93), "cuda", 40 * GB, frozenset({"vllm", "deepspeed"}))
    assert (c.backend, c.offload) == ("deepspeed", True)
    assert "offloaded" in c.reason


def test_headroom_counts(info: ModelInfo) -> None:  # 35 GB of weights leave too little of 40 GB
    assert (
        choose("auto", sized(info, 35), "cuda", 40 * GB, frozenset({"vllm", "deepspeed"})).backend
        == "deepspeed"
    )


def test_nothing_installed_or_no_gpu_takes_torch(info: ModelInfo) -> None:
    assert choose("auto", sized(info, 26), "cuda", 40 * GB, frozenset()).backend == "torch"
    assert "vLLM is not installed" in choose("auto", sized(info, 26), "cuda", 40 * GB, frozenset()).reason
    assert choose("auto", info, "cpu", 40 * GB, frozenset({"vllm", "deepspeed"})).backend == "torch"


def test_configured_backend_wins_or_is_refused(info: ModelInfo) -> None:
    assert choose("torch", sized(info, 26), "cuda", 40 * GB, frozenset({"vllm"})).backend == "torch"
    with pytest.raises(RuntimeError, match="vllm package is not installed"):
        choose("vllm", info, "cuda", 40 * GB, frozenset())


def test_real_lookup_on_this_machine(info: ModelInfo) -> None:
    assert choose("auto", info, "cpu", 40 * GB).backend == "torch"


def test_a_quantized_checkpoint_goes_to_vllm_or_is_refused(info: ModelInfo) -> None:
    fp8 = dataclasses.replace(info, quantization="fp8")
    c = choose("auto", fp8, "cuda", 40 * GB, frozenset({"vllm", "deepspeed"}))
    assert (c.backend, c.fallbacks) == ("vllm", ())  # PyTorch cannot run its weights: no fallback
    assert "quantized checkpoint (fp8)" in c.reason
    assert choose("vllm", fp8, "cuda", 40 * GB, frozenset({"vllm"})).backend == "vllm"
    for backend in ("torch", "deepspeed"):
        with pytest.raises(RuntimeError, match=r"quantized \(fp8\): only the vLLM engine runs it"):
            choose(backend, fp8, "cuda", 40 * GB, frozenset({"vllm", "deepspeed"}))
    with pytest.raises(RuntimeError, match="needs vLLM on a GPU"):
        choose("auto", fp8, "cpu", 40 * GB, frozenset({"vllm", "deepspeed"}))
    with pytest.raises(RuntimeError, match="needs vLLM, which is not installed"):
        choose("auto", fp8, "cuda", 40 * GB, frozenset({"deepspeed"}))


def test_fp8_on_load_counts_a_byte_per_parameter(info: ModelInfo) -> None:
    """A bf16 checkpoint of 40 GB does not fit a 40 GB budget; quantized to fp8 as vLLM loads it, its
    20 GB do."""
    big = dataclasses.replace(info, size_bytes=40 * GB, num_parameters_estimate=20 * GB)
    have = frozenset({"vllm", "deepspeed"})
    assert choose("auto", big, "cuda", 40 * GB, have).backend == "deepspeed"
    c = choose("auto", big, "cuda", 40 * GB, have, quantize="fp8")
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
