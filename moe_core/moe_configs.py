"""Where vLLM finds fused-MoE kernel configurations for the served model, as the engine needs to
know at load: the model's expert shape under its parallelism and the file name vLLM looks up for
it. Writing those files is model building's (moe_build/moe_tuning.py, `localmoe tune-moe`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_FOLDER = "VLLM_TUNED_CONFIG_FOLDER"  # vLLM reads tuned configs from this folder first


@dataclass(frozen=True)
class MoeShape:
    """The expert GEMMs one GPU runs: E experts of w1 [2N, K] and w2 [K, N], top_k per token."""

    experts: int  # E: experts on this GPU
    intermediate: int  # N: expert intermediate size on this GPU
    hidden: int  # K
    top_k: int
    dtype: str  # the weights' torch dtype name, e.g. "bfloat16"


def moe_shape(
    model_dir: Path,
    *,
    tensor_parallel_size: int = 1,
    enable_expert_parallel: bool = False,
    dtype: str = "bfloat16",
) -> MoeShape:
    """The shape vLLM's fused MoE layer has for this model under this parallelism, as vLLM splits
    it: expert parallelism splits the experts over the GPUs, tensor parallelism the intermediate
    size. dtype: what the engine serves the weights in."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    experts = _first(config, ("num_local_experts", "num_experts", "n_routed_experts"))
    # qwen2_moe: moe_intermediate_size is the routed experts' (intermediate_size, a dense MLP's);
    # mixtral and olmoe: intermediate_size is the experts'
    intermediate = _first(config, ("moe_intermediate_size", "intermediate_size"))
    top_k = _first(config, ("num_experts_per_tok", "moe_top_k"))
    hidden = int(config["hidden_size"])
    tp = tensor_parallel_size
    if enable_expert_parallel:
        if experts % tp:
            raise ValueError(f"{experts} experts do not split over {tp} GPUs")
        experts //= tp
    else:
        if intermediate % tp:
            raise ValueError(f"intermediate size {intermediate} does not split over {tp} GPUs")
        intermediate //= tp
    return MoeShape(experts, intermediate, hidden, top_k, dtype)


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise ValueError(f"config.json has none of {keys}: not a mixture-of-experts model vLLM fuses")


def vllm_dtype_selector(shape: MoeShape) -> str | None:
    """vLLM's dtype part of the file name: None for unquantized 16/32-bit weights (the only kind
    tuned here)."""
    if shape.dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"tuning covers unquantized weights only, not {shape.dtype}")
    return None


def config_file_name(shape: MoeShape) -> str:
    """The file name vLLM looks up for this shape on this machine's GPU (vLLM's own function)."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    return str(get_config_file_name(shape.experts, shape.intermediate, vllm_dtype_selector(shape)))


# Triton compiles a kernel once per distinct set of constexpr values (the config) and, for each
# integer argument, again whether it is divisible by 16 or not (its "specialization"). The fused-
# MoE kernel's integer arguments that follow the step's token count M (the routed tokens, M ×
# top_k, and their padded count) are affine in M, so 16 consecutive M meet every such variant.
SPECIALIZATION = 16


def fused_moe_config_of(shape: MoeShape, quantization: str | None) -> Callable[[int], dict[str, Any]]:
    """M → the fused-MoE kernel config vLLM picks for a step of M tokens on this shape (its own
    function: a tuned file's nearest entry, else its defaults by M). Imports vLLM. quantization:
    the engine's ("fp8": per-tensor fp8 kernels); a checkpoint's own method is not looked at."""
    from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

    w1 = (shape.experts, 2 * shape.intermediate, shape.hidden)
    w2 = (shape.experts, shape.hidden, shape.intermediate)
    dtype = "fp8_w8a8" if quantization == "fp8" else vllm_dtype_selector(shape)
    return lambda m: dict(try_get_optimal_moe_config(w1, w2, shape.top_k, dtype, m))


def kernel_batch_sizes(config_of: Callable[[int], dict[str, Any]], most: int) -> list[int]:
    """The step sizes (tokens, 1..most) whose steps launch every fused-MoE kernel variant a step
    of at most `most` tokens can: the first SPECIALIZATION sizes of each run of sizes that share
    a config. Ascending."""
    sizes: list[int] = []
    current: tuple[tuple[str, Any], ...] | None = None
    start = 1
    for m in range(1, most + 1):
        config = tuple(sorted(config_of(m).items()))
        if config != current:
            current, start = config, m
        if m - start < SPECIALIZATION:
            sizes.append(m)
    return sizes
