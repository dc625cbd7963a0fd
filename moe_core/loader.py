"""Inspect and load a Mixture-of-Experts checkpoint directory (Mixtral, Qwen2-MoE, OLMoE).

Works the same on a real checkpoint copied onto the box and on one made by `moe_build.checkpoint`.
Only local files are ever read: nothing here reaches the Hugging Face hub, whatever the environment
says (every from_pretrained call passes local_files_only=True).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing torch/transformers costs seconds; inspect_model must not pay for it
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Config key names for the same quantity differ between architectures; the first one present wins.
# num_local_experts: mixtral; num_experts: qwen2_moe, olmoe; n_routed_experts: deepseek.
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "moe_top_k")
_DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers 5 writes "dtype", older checkpoints "torch_dtype"

_BYTES_PER_PARAM = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint directory holds, read from its JSON files and file sizes only."""

    path: Path
    arch: str  # config.model_type, e.g. "mixtral"
    num_parameters_estimate: int  # weight bytes / bytes per parameter of the config's dtype
    size_bytes: int  # sum of the weight files' sizes
    max_context: int  # max_position_embeddings
    num_experts: int  # routed experts per MoE layer (1 for a dense model)
    experts_per_token: int  # experts each token is routed to (1 for a dense model)
    num_layers: int
    eos_token_ids: tuple[int, ...]  # generation_config's if it names any, else config's; may be empty
    # config.json's quantization_config.quant_method ("fp8", "compressed-tensors", "awq", "gptq",
    # "mxfp4", ...), lower case; None for weights stored in their dtype
    quantization: str | None = None
    # experts every token of a MoE layer goes through besides its routed ones: n_shared_experts
    # (DeepSeek-V2/V3, GLM-4.5), Qwen2-MoE's one gated shared expert; 0 for the other families
    shared_experts: int = 0
    # What the GPU memory plan (moe_core/choice.py) sizes activations and the KV cache from; 0 where
    # config.json does not say.
    architectures: tuple[str, ...] = ()  # config.json's class names, e.g. ("MixtralForCausalLM",)
    hidden_size: int = 0
    expert_intermediate_size: int = 0  # one routed expert's: moe_intermediate_size, else intermediate_size
    vocab_size: int = 0
    kv_values_per_token: int = 0  # KV-cache elements one token holds, all layers together
    latent_attention: bool = False  # DeepSeek-V2/V3's compressed KV (config.json's kv_lora_rank)


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _checkpoint_dir(path: Path | str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    return path


def _first_int(config: dict[str, Any], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    return default


def _token_ids(value: Any) -> tuple[int, ...]:
    """An eos_token_id field (absent, one id or a list of ids) as a tuple without repeats."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    return tuple(dict.fromkeys(int(i) for i in ids))


def _eos_token_ids(path: Path, config: dict[str, Any]) -> tuple[int, ...]:
    # generate() follows generation_config.json, which may list several stop ids (chat models).
    generation_path = path / "generation_config.json"
    if generation_path.is_file():
        ids = _token_ids(_read_json(generation_path).get("eos_token_id"))
        if ids:
            return ids
    return _token_ids(config.get("eos_token_id"))


def _weight_files(path: Path) -> list[Path]:
    # Safetensors win when both are present: hub repos often carry .bin or consolidated .pt copies too.
    safetensors = sorted(path.glob("*.safetensors"))
    return safetensors or sorted(path.glob("pytorch_model*.bin"))


def _bytes_per_param(config: dict[str, Any]) -> int:
    for key in _DTYPE_KEYS:
        name = config.get(key)
        if isinstance(name, str):
            return _BYTES_PER_PARAM.get(name.removeprefix("torch."), 4)
    return 4  # transformers' default dtype


def inspect_model(path: Path | str) -> ModelInfo:
    """Describe the checkpoint at `path` without importing torch or reading any weights."""
    path = _checkpoint_dir(path)
    config = _read_json(path / "config.json")
    size_bytes = sum(f.stat().st_size for f in _weight_files(path))
    return ModelInfo(
        path=path,
        arch=str(config.get("model_type", "unknown")),
        num_parameters_estimate=size_bytes // _bytes_per_param(config),
        size_bytes=size_bytes,
        max_context=_first_int(config, ("max_position_embeddings",), 0),
        num_experts=_first_int(config, _NUM_EXPERTS_KEYS, 1),
        experts_per_token=_first_int(config, _EXPERTS_PER_TOKEN_KEYS, 1),
        num_layers=_first_int(config, ("num_hidden_layers",), 0),
        shared_experts=_shared_experts(config),
        eos_token_ids=_eos_token_ids(path, config),
        quantization=_quant_method(config),
        architectures=tuple(str(a) for a in config.get("architectures") or ()),
        hidden_size=_first_int(config, ("hidden_size",), 0),
        expert_intermediate_size=_first_int(config, ("moe_intermediate_size", "intermediate_size"), 0),
        vocab_size=_first_int(config, ("vocab_size",), 0),
        kv_values_per_token=_kv_values_per_token(config),
        latent_attention=bool(config.get("kv_lora_rank")),
    )


def _kv_values_per_token(config: dict[str, Any]) -> int:
    """Per token, over all layers: latent attention (DeepSeek-V2/V3) caches one compressed
    vector, kv_lora_rank + qk_rope_head_dim wide; every other family keys and values,
    2 × KV heads × head_dim. 0 when the config lacks the sizes."""
    layers = _first_int(config, ("num_hidden_layers",), 0)
    if config.get("kv_lora_rank"):
        return layers * (int(config["kv_lora_rank"]) + _first_int(config, ("qk_rope_head_dim",), 0))
    heads = _first_int(config, ("num_attention_heads",), 0)
    kv_heads = _first_int(config, ("num_key_value_heads",), heads)
    hidden = _first_int(config, ("hidden_size",), 0)
    head_dim = _first_int(config, ("head_dim",), hidden // heads if heads else 0)
    return layers * 2 * kv_heads * head_dim


def _shared_experts(config: dict[str, Any]) -> int:
    n = config.get("n_shared_experts")
    if isinstance(n, int) and n > 0:
        return n
    return 1 if (config.get("shared_expert_intermediate_size") or 0) > 0 else 0


def _quant_method(config: dict[str, Any]) -> str | None:
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    return str(q.get("quant_method") or "unknown").lower()


def resolve_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """The torch dtype to load in: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    resolved: torch.dtype = getattr(torch, dtype)
    return resolved


def load_model(
    path: Path | str, device: str = "cpu", dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model (in eval mode, on `device`) and its tokenizer from a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _checkpoint_dir(path)
    torch_dtype = resolve_dtype(device, dtype)
    # local_files_only keeps the hub out even without HF_HUB_OFFLINE; trust_remote_code=False means a
    # checkpoint can never run code shipped with it.
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype, local_files_only=True, trust_remote_code=False
    )
    # transformers decorates .to with functools.wraps(Module.to), which typeshed sees as unbound.
    model = model.to(device).eval()  # type: ignore[arg-type]
    return model, tokenizer
