"""Which engine serves a model on this worker, and why.

vLLM when the model fits the worker's GPU memory budget (it is 13–15× faster than transformers on an
H200: 14.4–16.6k against 1.1k tokens/s, 256 × (512 → 256), the reference model); DeepSpeed
ZeRO-Inference with parameters offloaded to CPU memory when it does not fit; PyTorch/transformers
otherwise (no GPU, or neither installed). A configured backend other than "auto" is used as it is,
or refused with the reason it cannot run.

A quantized checkpoint (its config.json names a quantization_config: fp8, compressed-tensors, AWQ,
GPTQ, MXFP4) runs on vLLM only, which reads its method from the config; the PyTorch and DeepSpeed
engines here would load it wrong or not at all, so a worker configured for them, or one without
vLLM on a GPU, refuses it at start with the reason. Its weights count as the files hold them
(quantized); a bf16 checkpoint vLLM quantizes on load (engine.vllm.quantization: fp8) counts one
byte per parameter.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from moe_core.loader import ModelInfo

Backend = Literal["torch", "vllm", "deepspeed"]

# Weights are not all a model needs: KV cache, activations and CUDA graphs want room beside them.
# A model "fits" when its weights take at most this share of the budget.
WEIGHTS_SHARE_OF_BUDGET = 0.8


@dataclass(frozen=True)
class Choice:
    backend: Backend
    offload: bool  # DeepSpeed: parameters live off the GPU (ZeRO-3 inference)
    reason: str
    fallbacks: tuple[Backend, ...]  # what to switch to, in order, if this one fails


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose(
    requested: Literal["auto", "torch", "vllm", "deepspeed"],
    model: ModelInfo,
    device: str,
    budget_bytes: int,
    have: frozenset[str] | None = None,
    quantize: str | None = None,
) -> Choice:
    """`have`: the installed engine packages (default: looked up); tests pass their own.
    quantize: what vLLM quantizes a checkpoint to on load (engine.vllm.quantization), if anything."""
    if have is None:
        have = frozenset(p for p in ("vllm", "deepspeed") if installed(p))
    if model.quantization is not None:
        return _quantized(requested, model.quantization, device, have)
    weights = (
        model.num_parameters_estimate
        if quantize == "fp8" and requested in ("auto", "vllm")
        else model.size_bytes
    )
    gb = weights / 1e9
    fits = weights <= WEIGHTS_SHARE_OF_BUDGET * budget_bytes
    if requested != "auto":
        if requested != "torch" and requested not in have:
            raise RuntimeError(
                f"engine {requested!r} is configured but the {requested} package is not installed"
            )
        offload = requested == "deepspeed" and device != "cpu" and not fits
        return Choice(requested, offload, f"configured: {requested}", _fallbacks(requested))
    if not device.startswith("cuda"):
        return Choice("torch", False, f"no GPU ({device}): PyTorch", ())
    if fits and "vllm" in have:
        why = f"weights {gb:.1f} GB fit the {budget_bytes / 1e9:.0f} GB budget: vLLM"
        return Choice("vllm", False, why, _fallbacks("vllm"))
    if not fits and "deepspeed" in have:
        share = f"{WEIGHTS_SHARE_OF_BUDGET:.0%} of the {budget_bytes / 1e9:.0f} GB budget"
        why = f"weights {gb:.1f} GB exceed {share}:"
        return Choice(
            "deepspeed", True, f"{why} DeepSpeed with parameters offloaded to CPU", _fallbacks("deepspeed")
        )
    missing = "vLLM" if fits else "DeepSpeed"
    return Choice("torch", False, f"weights {gb:.1f} GB; {missing} is not installed: PyTorch", ())


def _quantized(requested: str, method: str, device: str, have: frozenset[str]) -> Choice:
    if requested in ("torch", "deepspeed"):
        raise RuntimeError(
            f"this checkpoint is quantized ({method}): only the vLLM engine runs it, not {requested}; "
            "set engine.backend to vllm (or auto)"
        )
    if "vllm" not in have:
        raise RuntimeError(f"this checkpoint is quantized ({method}): it needs vLLM, which is not installed")
    if requested == "auto" and not device.startswith("cuda"):
        raise RuntimeError(
            f"this checkpoint is quantized ({method}): it needs vLLM on a GPU (device {device})"
        )
    why = "configured: vllm" if requested == "vllm" else f"quantized checkpoint ({method}): vLLM"
    return Choice("vllm", False, why, ())  # no PyTorch to fall back to: it cannot run these weights


def _fallbacks(backend: Backend) -> tuple[Backend, ...]:
    return () if backend == "torch" else ("torch",)
