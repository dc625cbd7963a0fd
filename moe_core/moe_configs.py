"""Where vLLM finds fused-MoE kernel configurations for the served model, as the engine needs to
know at load: the model's expert shape under its parallelism and the file name vLLM looks up for
it. Writing those files is model building's (moe_build/moe_tuning.py, `localmoe tune-moe`).
"""

from __future__ import annotations

import json
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
