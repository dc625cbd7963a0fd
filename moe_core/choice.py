"""Which engine serves a model on this worker, where the weights that do not fit its GPU go, and why.

vLLM when the model fits the worker's GPU memory budget (it is 13–15× faster than transformers on an
H200: 14.4–16.6k against 1.1k tokens/s, 256 × (512 → 256), the reference model). When it does not
fit, vLLM still serves it where it can, with the weights that do not fit in pinned CPU memory
(`cpu_offload_gb`: the GPU reads them over PCIe at every step, zero-copy); DeepSpeed ZeRO-3, which
streams every weight from CPU memory at every step, only where vLLM cannot run the model (not
installed, an architecture its registry lacks, or `engine.offload: zero3`). On the H200, the
reference model with half its weights off the GPU made 37 tokens/s at batch 1 through vLLM's
offload against 4 through ZeRO-3 (BENCHMARKS.md). PyTorch/transformers otherwise (no GPU, or
neither installed). A configured backend other than "auto" is used as it is, or refused with the
reason it cannot run; `engine.offload: none` refuses a model that does not fit. `engine.offload:
experts` keeps as many routed experts on the GPU as the budget leaves and fetches the others as
they are routed: inside vLLM's fused-MoE layers where vLLM runs the model, else in the torch
engine (moe_core/expert_cache.py).

The memory plan (`plan_memory`) is per GPU; its arithmetic is in the function.

A quantized checkpoint (its config.json names a quantization_config: fp8, compressed-tensors, AWQ,
GPTQ, MXFP4) runs on vLLM only, which reads its method from the config; the PyTorch and DeepSpeed
engines here would load it wrong or not at all, so a worker configured for them, or one without
vLLM on a GPU, refuses it at start with the reason. Its weights count as the files hold them
(quantized); a bf16 checkpoint vLLM quantizes on load (engine.vllm.quantization: fp8) counts one
byte per parameter.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, cast

from host.settings import Misses, Offload, OffloadSetting
from moe_core.expert_gather import scratch_rows
from moe_core.loader import ModelInfo

Backend = Literal["torch", "vllm", "deepspeed"]
OFFLOAD_OF: dict[str, Offload] = {"vllm": "vllm_cpu", "deepspeed": "zero3"}  # the one each backend does

GIB = 2**30

# The budget's share weights may take at most: KV cache, activations and CUDA graphs want room
# beside them, and a large budget keeps a proportionate KV cache (more sequences in a batch).
WEIGHTS_SHARE_OF_BUDGET = 0.8
# The CUDA context (~0.5 GiB), CUDA graphs and the allocator's slack: outside what vLLM's profile
# run measures as activations.
RUNTIME_FIXED_BYTES = 1 * GIB
# The KV cache is planned for every sequence of a full batch at this many tokens (or for one
# sequence of the whole context, vLLM's minimum, if that is more).
KV_TOKENS_PER_SEQUENCE = 1024


@dataclass(frozen=True)
class Budget:
    """One GPU of the worker as the engine will use it.

    gpu_bytes: engine.gpu_memory_budget_gb, per GPU. gpus: the GPUs the weights are split over
    (vLLM's tensor parallel size). max_batch_size: sequences decoded together (vLLM's max_num_seqs).
    max_num_batched_tokens: tokens of one scheduler step, the size of vLLM's profile run.
    act_bytes: bytes of one activation or KV-cache element (2: bf16 / fp16; 4: float32)."""

    gpu_bytes: int
    gpus: int = 1
    max_batch_size: int = 64
    max_num_batched_tokens: int = 16384
    act_bytes: int = 2


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU. Invariants: gpu_weights + reserve == the budget; kv_cache + runtime == reserve;
    gpu_weights + offload >= weights (equal when anything is offloaded)."""

    weights: int  # the model's weights on this GPU (its 1/gpus share)
    reserve: int  # the budget kept from the weights: runtime + kv_cache
    runtime: int  # activations of one step + RUNTIME_FIXED_BYTES
    kv_cache: int  # what the reserve leaves the KV cache (>= its planned minimum)
    gpu_weights: int  # the budget left to weights
    offload: int  # weights that do not fit: in CPU memory (0 when the model fits)

    @property
    def fits(self) -> bool:
        return self.offload == 0


def plan_memory(model: ModelInfo, weights: int, budget: Budget) -> MemoryPlan:
    """weights: the model's weight bytes as the engine holds them (all GPUs together).

    Per GPU, b = budget.act_bytes, T = max_num_batched_tokens, S = max_batch_size:
      activations  T × (k × (3I + H) + 6H) × b   the step vLLM profiles, T tokens [T, ·]: fused MoE's
                                                 gate/up output [T, k, 2I], its activation [T, k, I],
                                                 the experts' outputs [T, k, H]; residual, norm,
                                                 QKV and attention output ~[T, 6H]
                 + S × V × 8                     the sampler's logits and probabilities [S, V], fp32
      runtime      activations + RUNTIME_FIXED_BYTES
      kv_min       max(max_context, S × KV_TOKENS_PER_SEQUENCE) × kv_values_per_token × b ÷ gpus
      reserve      max((1 − WEIGHTS_SHARE_OF_BUDGET) × budget, runtime + kv_min)
      gpu_weights  budget − reserve;  offload = max(0, weights ÷ gpus − gpu_weights)
      kv_cache     reserve − runtime  (>= kv_min)
    A config without the sizes (0s) plans no activations or KV cache beyond the 20 % floor. The
    estimate errs high: vLLM measures its real activation peak at start-up and logs it.
    """
    per_gpu = math.ceil(weights / budget.gpus)
    b, t, s = budget.act_bytes, budget.max_num_batched_tokens, budget.max_batch_size
    h, i, k = model.hidden_size, model.expert_intermediate_size, model.experts_per_token
    activations = t * (k * (3 * i + h) + 6 * h) * b + s * model.vocab_size * 8
    runtime = activations + RUNTIME_FIXED_BYTES
    kv_tokens = max(model.max_context, s * KV_TOKENS_PER_SEQUENCE)
    kv_min = math.ceil(kv_tokens * model.kv_values_per_token * b / budget.gpus)
    reserve = max(math.ceil((1 - WEIGHTS_SHARE_OF_BUDGET) * budget.gpu_bytes), runtime + kv_min)
    gpu_weights = budget.gpu_bytes - reserve
    offload = max(0, per_gpu - gpu_weights)
    return MemoryPlan(per_gpu, reserve, runtime, reserve - runtime, gpu_weights, offload)


@dataclass(frozen=True)
class Choice:
    backend: Backend
    offload: Offload  # where the weights that do not fit live ("none": they all fit)
    reason: str
    fallbacks: tuple[Backend, ...]  # what to switch to, in order, if this one fails
    cpu_offload_gb: float = 0.0  # vllm_cpu: GiB of weights per GPU vLLM keeps in CPU memory
    kv_cache_bytes: int | None = None  # vllm_cpu, experts: vLLM's KV cache per GPU, what the budget leaves it
    resident_fraction: float | None = None  # experts: the share of each layer's experts on the GPU


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose(
    requested: Literal["auto", "torch", "vllm", "deepspeed"],
    model: ModelInfo,
    device: str,
    budget: Budget,
    have: frozenset[str] | None = None,
    quantize: str | None = None,
    offload: OffloadSetting = "auto",
    vllm_archs: Collection[str] | None = None,
    resident_fraction: float | None = None,
    misses: Misses = "in_place",
) -> Choice:
    """`have`: the installed engine packages (default: looked up); tests pass their own.
    quantize: what vLLM quantizes a checkpoint to on load (engine.vllm.quantization), if anything.
    offload: engine.offload. vllm_archs: the architectures vLLM's registry runs (default: looked up,
    only for a model that does not fit). resident_fraction, misses: engine.expert_cache's (offload
    experts)."""
    if offload == "experts" and requested not in ("auto", "torch", "vllm"):
        raise RuntimeError(
            f"engine.offload experts is the vLLM and torch engines' cache, not engine.backend {requested}'s"
        )
    if offload == "experts" and model.quantization is not None:
        raise RuntimeError(
            f"this checkpoint is quantized ({model.quantization}), and the expert cache (engine.offload "
            "experts) holds unquantized experts only; set engine.offload to auto or vllm_cpu"
        )
    if requested != "auto" and offload in ("vllm_cpu", "zero3") and offload != OFFLOAD_OF.get(requested):
        raise RuntimeError(f"engine.backend {requested} cannot offload as engine.offload {offload} asks")
    if have is None:
        have = frozenset(p for p in ("vllm", "deepspeed") if installed(p))
    if model.quantization is not None:
        return _quantized(requested, model, device, budget, have, offload)
    if requested not in ("auto", "torch") and requested not in have:
        raise RuntimeError(f"engine {requested!r} is configured but the {requested} package is not installed")
    weights = (
        model.num_parameters_estimate
        if quantize == "fp8" and requested in ("auto", "vllm")
        else model.size_bytes
    )
    plan = plan_memory(model, weights, budget)
    on_gpu = device.startswith("cuda")
    if on_gpu and plan.gpu_weights <= 0:
        raise RuntimeError(_too_small(plan, budget))
    if not on_gpu or plan.fits:
        return _in_place(requested, device, plan, budget, have)
    if offload == "none":
        raise RuntimeError(f"{_does_not_fit(plan, budget)}, and engine.offload is none: {_NONE_HELP}")
    if offload == "experts":
        backend: Backend = "torch"
        if requested != "torch" and _why_not_vllm(requested, model, have, offload, vllm_archs) is None:
            backend = "vllm"
        return _expert_cache(backend, model, plan, budget, resident_fraction, misses)
    return _over_budget(requested, model, plan, budget, have, offload, vllm_archs)


def _in_place(requested: str, device: str, plan: MemoryPlan, budget: Budget, have: frozenset[str]) -> Choice:
    """Every weight on the GPU (or no GPU at all)."""
    if requested != "auto":
        backend = cast(Backend, requested)  # not auto
        return Choice(backend, "none", f"configured: {requested}", _fallbacks(backend))
    if not device.startswith("cuda"):
        return Choice("torch", "none", f"no GPU ({device}): PyTorch", ())
    gb = plan.weights / 1e9
    if "vllm" not in have:
        return Choice("torch", "none", f"weights {gb:.1f} GB; vLLM is not installed: PyTorch", ())
    why = f"weights {gb:.1f} GB fit the {budget.gpu_bytes / 1e9:.0f} GB budget: vLLM"
    return Choice("vllm", "none", why, _fallbacks("vllm"))


def routed_expert_parameters(model: ModelInfo) -> int:
    """E experts of 3 × H × I parameters in each layer (a dense first layer counted as one too: an
    upper bound)."""
    return model.num_layers * model.num_experts * 3 * model.hidden_size * model.expert_intermediate_size


def routed_expert_bytes(model: ModelInfo, weights: int) -> int:
    """The routed experts' share of `weights` (the model's bytes as held)."""
    experts = routed_expert_parameters(model)
    return min(weights, int(experts * weights / max(model.num_parameters_estimate, 1)))


def resident_slots(fraction: float, experts: int) -> int:
    """The device slots an expert cache holding `fraction` of a layer's `experts` has (at least
    one): what the choice reports, the caches build and the vLLM kernel's E is. (slots / experts
    gives slots back: the product is rounded before it is cut.)"""
    return max(1, int(round(fraction * experts, 6)))


def _expert_cache(
    backend: Backend,
    model: ModelInfo,
    plan: MemoryPlan,
    budget: Budget,
    fraction: float | None,
    misses: Misses = "in_place",
) -> Choice:
    """Weights that do not fit, engine.offload experts: `backend` (vLLM where it runs the model,
    its cache in the fused-MoE layers; else torch) keeps everything but the routed experts on the
    GPU and as many of those as the budget leaves room for (or `fraction` of them, if that fits).
    vLLM's cache gathering its misses (misses "gather") also holds scratch rows for them, shared
    by its layers: scratch_rows(E, slots) experts of one layer, counted in the same room. vLLM's KV
    cache gets what the plan leaves it, the torch engine being the fallback."""
    if model.num_experts <= 1:
        raise RuntimeError("engine.offload experts: the model has no routed experts to cache")
    experts = routed_expert_bytes(model, plan.weights)
    others = plan.weights - experts
    room = plan.gpu_weights - others
    if room < experts / model.num_experts:
        raise RuntimeError(
            f"{_does_not_fit(plan, budget)}, and besides its routed experts the model takes "
            f"{others / 1e9:.2f} GB: the {plan.gpu_weights / 1e9:.2f} GB left to weights cannot hold one "
            "expert per layer as well (engine.offload experts)"
        )
    E = model.num_experts
    one = experts / (E * model.num_layers)  # one expert's bytes

    def held(slots: int) -> float:  # the slots of every layer, and the scratch if there is one
        scratch = scratch_rows(E, slots) if backend == "vllm" and misses == "gather" else 0
        return (slots * model.num_layers + scratch) * one

    fits = min(1.0, room / experts)
    slots = resident_slots(fraction if fraction is not None else fits, E)
    if fraction is None:
        while slots > 1 and held(slots) > room:
            slots -= 1
    if held(slots) > room:
        kept, scratch = slots * model.num_layers * one, held(slots) - slots * model.num_layers * one
        what = f"{slots} of {E} routed experts per layer ({kept / 1e9:.2f} GB)"
        if scratch:
            what += (
                f" and rows for the step's others ({scratch / 1e9:.2f} GB, engine.expert_cache.misses gather)"
            )
        fix = "lower engine.expert_cache.resident_fraction or leave it unset"
        if fraction is None:
            fix = "set engine.expert_cache.misses to in_place (no rows) or raise the budget"
        raise RuntimeError(f"{what} do not fit the {room / 1e9:.2f} GB the budget leaves them: {fix}")
    share = slots / E if fraction is None else fraction
    why = (
        f"{_does_not_fit(plan, budget)}: the {backend} engine with {slots} of {model.num_experts} routed "
        f"experts per layer on the GPU, the rest in pinned CPU memory (engine.offload experts)"
    )
    if backend == "torch":
        return Choice("torch", "experts", why, (), resident_fraction=share)
    return Choice("vllm", "experts", why, ("torch",), resident_fraction=share, kv_cache_bytes=plan.kv_cache)


def _over_budget(
    requested: str,
    model: ModelInfo,
    plan: MemoryPlan,
    budget: Budget,
    have: frozenset[str],
    offload: str,
    vllm_archs: Collection[str] | None,
) -> Choice:
    """Weights that do not fit: vLLM's offload where it runs the model, else ZeRO-3."""
    if requested == "torch":
        return Choice("torch", "none", "configured: torch (it offloads nothing)", ())
    why_not_vllm = _why_not_vllm(requested, model, have, offload, vllm_archs)
    if why_not_vllm is None:
        return _vllm_cpu(requested, plan, budget, have)
    if offload == "vllm_cpu":
        raise RuntimeError(f"engine.offload is vllm_cpu, but {why_not_vllm}")
    if "deepspeed" in have:
        zero3 = f"DeepSpeed ZeRO-3 with parameters offloaded to CPU ({why_not_vllm})"
        return Choice(
            "deepspeed", "zero3", f"{_does_not_fit(plan, budget)}: {zero3}", _fallbacks("deepspeed")
        )
    if offload == "zero3":
        raise RuntimeError("engine.offload is zero3, but the deepspeed package is not installed")
    why = f"weights {plan.weights / 1e9:.1f} GB do not fit; {why_not_vllm} and DeepSpeed is not installed"
    return Choice("torch", "none", f"{why}: PyTorch", ())


_NONE_HELP = (
    "refusing to start it. Set engine.offload to auto (weights in CPU memory), raise "
    "engine.gpu_memory_budget_gb, or quantize it on load (engine.vllm.quantization: fp8)"
)


def _too_small(plan: MemoryPlan, budget: Budget) -> str:
    return (
        f"the {budget.gpu_bytes / 1e9:.1f} GB GPU budget cannot hold the KV cache and activations "
        f"({plan.reserve / 1e9:.2f} GB) beside any weights: raise engine.gpu_memory_budget_gb, or lower "
        "engine.max_batch_size or engine.vllm.max_num_batched_tokens"
    )


def _does_not_fit(plan: MemoryPlan, budget: Budget) -> str:
    per = " per GPU" if budget.gpus > 1 else ""
    return (
        f"weights {plan.weights / 1e9:.2f} GB{per} exceed the {plan.gpu_weights / 1e9:.2f} GB that the "
        f"{budget.gpu_bytes / 1e9:.1f} GB budget leaves beside {plan.reserve / 1e9:.2f} GB for the KV "
        "cache and activations"
    )


def _vllm_architectures() -> frozenset[str]:
    """The model classes (config.json's `architectures`) vLLM's registry runs; imports vLLM."""
    from vllm import ModelRegistry

    return frozenset(ModelRegistry.get_supported_archs())


def _why_not_vllm(
    requested: str, model: ModelInfo, have: frozenset[str], offload: str, vllm_archs: Collection[str] | None
) -> str | None:
    """Why vLLM cannot serve this model with its weights partly in CPU memory; None if it can
    (configured, it is not second-guessed: its registry is not all it runs)."""
    if offload == "zero3":
        return "engine.offload: zero3"
    if requested != "auto":
        return None if requested == "vllm" else f"engine.backend: {requested}"
    if "vllm" not in have:
        return "vLLM is not installed"
    if vllm_archs is None:
        vllm_archs = _vllm_architectures()
    if not set(model.architectures) & set(vllm_archs):
        return f"vLLM's registry has no {'/'.join(model.architectures) or model.arch}"
    return None


def _vllm_cpu(requested: str, plan: MemoryPlan, budget: Budget, have: frozenset[str]) -> Choice:
    # vLLM moves whole parameters to CPU memory, layer by layer from the first, until at least
    # cpu_offload_gb GiB are there: rounded up here, it may move up to one parameter more.
    gib = math.ceil(plan.offload / GIB * 100) / 100
    vllm = f"vLLM with {gib:.2f} GiB of weights per GPU in CPU memory (cpu_offload_gb)"
    why = f"{_does_not_fit(plan, budget)}: {vllm}"
    fallbacks: tuple[Backend, ...] = (
        ("deepspeed", "torch") if requested == "auto" and "deepspeed" in have else ("torch",)
    )
    return Choice("vllm", "vllm_cpu", why, fallbacks, cpu_offload_gb=gib, kv_cache_bytes=plan.kv_cache)


def _quantized(
    requested: str, model: ModelInfo, device: str, budget: Budget, have: frozenset[str], offload: str
) -> Choice:
    method = model.quantization
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
    plan = plan_memory(model, model.size_bytes, budget)
    if device.startswith("cuda") and plan.gpu_weights <= 0:
        raise RuntimeError(_too_small(plan, budget))
    if device.startswith("cuda") and not plan.fits:
        if offload in ("none", "zero3"):
            only = _NONE_HELP if offload == "none" else "only vLLM runs it (its offload: cpu_offload_gb)"
            raise RuntimeError(
                f"this checkpoint is quantized ({method}): {_does_not_fit(plan, budget)}, "
                f"and engine.offload is {offload}: {only}"
            )
        c = _vllm_cpu(requested, plan, budget, have)
        return Choice("vllm", "vllm_cpu", c.reason, (), c.cpu_offload_gb, c.kv_cache_bytes)
    why = "configured: vllm" if requested == "vllm" else f"quantized checkpoint ({method}): vLLM"
    return Choice("vllm", "none", why, ())  # no PyTorch to fall back to: it cannot run these weights


def _fallbacks(backend: Backend) -> tuple[Backend, ...]:
    return () if backend == "torch" else ("torch",)
