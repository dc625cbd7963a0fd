"""The expert cache inside vLLM's fused-MoE layers, for the vLLM engine (`engine.offload: experts`).

It runs in vLLM's worker process: `ExpertCacheExtension` is mixed into vLLM's worker class
(`worker_extension_cls`), and the engine calls its methods by name through `collective_rpc` once
vLLM has loaded the model, before any request. On CUDA the engine has vLLM load the routed
experts' weights (`w13_weight`, `w2_weight`) into pinned host memory (vLLM's UVA offload), so a
model larger than the GPU loads; everything else is on the GPU as usual.

The seam: vLLM's MoE runner routes (top-k weights and ids [T, k] from the router) and then calls
`RoutedExperts.forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)`,
whose kernel reads the layer's `w13_weight` / `w2_weight` — [E, ...] in the kernel's own layout
(Triton's on CUDA, a prepacked one on vLLM's CPU build) — at every call. The cache takes those
parameters to host memory, puts [slots, ...] ones in their place, and wraps forward_modular with
`_CachedLayer.run` (moe_core/expert_cache.py: the same slot table, prefetch and copy stream as the
torch engine's cache): the ids remapped to slots, turns when a step needs more experts than there
are slots (another turn's ids go to slot 0 with a routing weight of 0: these kernels know no
sentinel), the shared experts run with the first turn only. The next layer's experts are predicted
with its gate (top-k of its logits, applied to this layer's input).

CUDA graphs: each cached layer's forward asks the host which experts it needs, which a captured
graph cannot replay; the engine makes vLLM's fused-MoE ops graph splitting ops (piecewise graphs
around them, the MoE layers run eagerly) or runs eagerly (moe_core/vllm_engine.py).

Held: unquantized fused-MoE layers with modular kernels, without expert biases or expert
parallelism; anything else is refused (ValueError) with the reason.

vLLM is imported lazily: this module imports without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from moe_core.choice import resident_slots
from moe_core.expert_cache import ExpertCache, RoutingTrace, _CachedLayer

EXTENSION = f"{__name__}.ExpertCacheExtension"  # vLLM's worker_extension_cls
# The fused-MoE custom ops the engine splits vLLM's CUDA graphs at
MOE_OPS = ("vllm::moe_forward", "vllm::moe_forward_shared")
# The weights vLLM's UVA offload keeps in host memory (segments of "...experts.w13_weight")
EXPERT_WEIGHTS = frozenset({"w13_weight", "w2_weight"})


class ExpertCacheExtension:
    """Methods of vLLM's worker (which provides `get_model`) that `collective_rpc` calls by name."""

    _localmoe_expert_cache: ExpertCache | None = None

    def install_expert_cache(self, resident_fraction: float, prefetch: bool = True) -> list[int]:
        """Hold `resident_fraction` of each fused-MoE layer's experts on the device (at least one);
        → the slots per layer."""
        model: torch.nn.Module = self.get_model()  # type: ignore[attr-defined]
        device = next(model.parameters()).device
        cache = ExpertCache(model, device, resident_fraction, prefetch, install=vllm_layers)
        self._localmoe_expert_cache = cache
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the experts' device (or host-mapped) copies are gone
        return cache.slots

    def expert_cache_layers(self) -> list[tuple[int, int]]:
        """(needed, hits) of each fused-MoE layer since install ([] without a cache)."""
        cache = self._localmoe_expert_cache
        return [(layer.needed, layer.hits) for layer in cache.layers] if cache is not None else []

    def replay_expert_routing(self, chosen: list[list[list[int]]], predicted: list[list[list[int]]]) -> None:
        """Benchmarks: route as a recorded `RoutingTrace` says from now on (its fields)."""
        assert self._localmoe_expert_cache is not None, "no expert cache installed"
        self._localmoe_expert_cache.follow(RoutingTrace(chosen, predicted, replaying=True))

    def expert_cache_stats(self, reset: bool = False) -> dict[str, int]:
        """CacheStats' counts since install or the last reset ({} without a cache); reset: count
        from zero after this."""
        cache = self._localmoe_expert_cache
        if cache is None:
            return {}
        counts = asdict(cache.stats)
        if reset:
            cache.reset_stats()
        return counts


def vllm_layers(cache: ExpertCache, model: torch.nn.Module, fraction: float) -> list[_CachedLayer]:
    """Each fused-MoE layer of a vLLM model (a runner child holding `routed_experts`), in model
    order, computing on its slots from now on."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    layers = []
    for parent in model.modules():
        for runner in parent.children():
            routed = getattr(runner, "routed_experts", None)
            if not isinstance(routed, RoutedExperts):
                continue
            refusal = _refusal(routed)
            if refusal is not None:
                raise ValueError(f"the expert cache cannot hold {type(parent).__name__}'s experts: {refusal}")
            num_experts = int(routed.local_num_experts)
            gate = getattr(parent, "gate", None)
            predict = (
                functools.partial(_predicted, gate, int(routed.top_k))
                if isinstance(gate, torch.nn.Module)
                else None
            )
            layer = _CachedLayer(
                cache, num_experts, resident_slots(fraction, num_experts), predict, sentinel=False
            )
            layer.hold(routed, cache.device)
            vars(routed)["forward_modular"] = functools.partial(
                _forward_modular, layer, routed.forward_modular
            )
            layers.append(layer)
    return layers


def _refusal(routed: Any) -> str | None:
    """Why this layer cannot be held (None: it can)."""
    method = routed.quant_method
    if type(method).__name__ != "UnquantizedFusedMoEMethod":
        return f"its experts are quantized ({type(method).__name__})"
    if method.is_monolithic:
        return "its kernel routes inside itself (a monolithic fused-MoE kernel)"
    if routed.use_ep:
        return "expert parallelism places the experts already"
    if getattr(routed.moe_config, "has_bias", False):
        return "its experts have biases, which the kernel reads apart from the weights"
    return None


def _predicted(gate: torch.nn.Module, k: int, hidden: torch.Tensor) -> torch.Tensor:
    """The top-k experts of `gate`'s logits for hidden [T, H]: [T, k] (vLLM's linear layers
    return (output, bias))."""
    out = gate(hidden)
    logits = out[0] if isinstance(out, tuple) else out
    return torch.topk(logits, k, dim=-1).indices


def _forward_modular(
    layer: _CachedLayer,
    original: Callable[..., Any],
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared_experts: Any = None,
    shared_experts_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoutedExperts.forward_modular over the layer's slots. x [T, H]; topk_* [T, k]."""
    shared = [shared_experts, shared_experts_input]

    def compute(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = original(
            x=hidden,
            topk_weights=weights,
            topk_ids=ids,
            shared_experts=shared[0],
            shared_experts_input=shared[1],
        )
        shared[0] = shared[1] = None  # the shared experts run once, with the first turn
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(
                f"the expert cache sums the experts' outputs, and this kernel returns {type(out)}"
            )
        return out

    return layer.run(x, topk_ids, topk_weights, compute)
