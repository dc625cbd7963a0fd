"""The automatic engine choice, on the real small model's ModelInfo with its size varied."""

from __future__ import annotations

import dataclasses
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
