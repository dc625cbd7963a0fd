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
parameters to pinned host memory, puts [slots, ...] ones in their place, and replaces
forward_modular with `_InPlaceLayer.forward`: the experts a forward needs that are resident run on
the slots, the others in place from host memory (a UVA view, which the kernel reads over PCIe as
vLLM's own offload does), one call of the layer's own modular kernel each (`moe_kernel.apply`, the
call vLLM makes), so a forward never waits for a copy; the experts it admits (`SlotTable`, shared
with the torch engine's cache in moe_core/expert_cache.py) are copied into their slots on the copy
stream for the forwards after, and the next layer's predicted experts ahead of it (its gate's
top-k of its logits, applied to this layer's input).

CUDA graphs: each cached layer's forward asks the host which experts it needs, which a captured
graph cannot replay; the engine makes vLLM's fused-MoE ops graph splitting ops (piecewise graphs
around them, the MoE layers run eagerly) or runs eagerly (moe_core/vllm_engine.py).

Held: unquantized fused-MoE layers with modular kernels, without expert biases or expert
parallelism; anything else is refused (ValueError) with the reason.

vLLM is imported lazily: this module imports without it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import torch

from moe_core.choice import resident_slots
from moe_core.expert_cache import ExpertCache, Predict, RoutingTrace, _CachedLayer

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

    layers: list[_CachedLayer] = []
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
            layer = _InPlaceLayer(cache, routed, resident_slots(fraction, num_experts), predict)
            layer.hold(routed, cache.device)
            vars(routed)["forward_modular"] = layer.forward
            layers.append(layer)
    return layers


def _refusal(routed: Any) -> str | None:
    """Why this layer cannot be held (None: it can)."""
    method = routed.quant_method
    if type(method).__name__ != "UnquantizedFusedMoEMethod":
        return f"its experts are quantized ({type(method).__name__})"
    if method.is_monolithic:
        return "its kernel routes inside itself (a monolithic fused-MoE kernel)"
    if getattr(method, "moe_kernel", None) is None:
        return "its method has no modular kernel to call (moe_kernel)"
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


class _InPlaceLayer(_CachedLayer):
    """A fused-MoE layer whose forward never waits for a copy: the experts it needs that are
    resident run on the slots, the others where they are, in host memory the device reads in place
    (a UVA view on CUDA, as vLLM's own offload reads; on CPU the host copy itself), one call of the
    layer's kernel each. The experts admitted (`SlotTable.settle`: a free slot, or the slot of a
    resident expert with well under their load) are copied in on the copy stream after the
    forward's kernels are queued, for the forwards after; a slot whose copy may still run counts as
    not resident until the layer's `ready` event says the copies are done (queried, never waited
    for).

    Both calls route by the same ids [T, k]; each skips the other's experts: on CUDA through the
    kernel's expert map (expert → row of the weights it is given, -1: skipped, as under expert
    parallelism), on CPU (whose kernels take no map) by a routing weight of 0 and, for the slots'
    call, an id remapped to a slot. Their outputs are summed; the shared experts run with the first."""

    def __init__(self, cache: ExpertCache, routed: Any, slots: int, predict: Predict | None) -> None:
        super().__init__(cache, int(routed.local_num_experts), slots, predict, sentinel=False)
        self.kernel = routed.quant_method.moe_kernel
        self.activation = routed.activation
        self.weight_on_input = bool(routed.apply_router_weight_on_input)
        self.view: dict[str, torch.Tensor] = {}  # weight name → [E, ...] host memory, as kernels read it
        self.pending: set[int] = set()  # slots copied into since `ready` was last seen done
        self.use_map = False  # the kernel skips ids an expert map sends to -1 (CUDA's Triton kernel)

    def hold(self, module: torch.nn.Module, device: torch.device) -> None:
        super().hold(module, device)
        self.use_map = device.type == "cuda"
        for name, host in self.host.items():
            if device.type == "cuda":
                from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

                self.view[name] = get_accelerator_view_from_cpu_tensor(host)
            else:
                self.view[name] = host

    def copied(self, copies: list[tuple[int, int]]) -> None:
        # the forward builds its own maps from the table; the device slot map is not read
        if self.ready is not None:
            self.pending.update(slot for _, slot in copies)

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RoutedExperts.forward_modular's contract: x [T, H], topk_* [T, k] → [T, H]."""
        index, counted = self.route(x, topk_ids)
        if self.pending and self.ready is not None and self.ready.query():  # type: ignore[no-untyped-call]
            self.pending.clear()
        needed = [e for e, n in enumerate(counted) if n]
        slot_of = self.table.slot_of
        resident = [e for e in needed if slot_of[e] >= 0 and slot_of[e] not in self.pending]
        missed = [e for e in needed if e not in set(resident)]
        self.count(needed, len(resident))
        self.cache.stats.bytes_in_place += self.expert_bytes * len(missed)
        ids = index.to(topk_ids.dtype)
        shared = [shared_experts, shared_experts_input]
        out: torch.Tensor | None = None
        for experts, weights_of in ((resident, self.device), (missed, self.view)):
            if not experts:
                continue
            part = self._call(x, topk_weights, ids, experts, weights_of, shared)
            shared[0] = shared[1] = None  # the shared experts run once, with the first call
            out = part if out is None else out + part
        if self.done is not None:  # the copies queued next wait for these kernels
            self.done.record()
        self.cache.copy(self, self.table.settle(needed, [counted[e] for e in needed]))
        assert out is not None  # a router chooses k >= 1 experts for each of T >= 1 tokens
        return out

    def _call(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        experts: list[int],
        tensors: dict[str, torch.Tensor],
        shared: list[Any],
    ) -> torch.Tensor:
        """The kernel over `tensors` (the slots [S, ...] or host memory [E, ...]) for `experts` only."""
        on_slots = tensors is self.device
        row = [-1] * self.num_experts  # expert → its row in `tensors`; -1: not this call's
        for e in experts:
            row[e] = self.table.slot_of[e] if on_slots else e
        rows = _to_device(row, x.device)
        expert_map: torch.Tensor | None = None
        if self.use_map:
            expert_map, global_experts = rows.to(torch.int32), self.num_experts
        else:  # no map: other experts' ids to row 0 with a routing weight of 0
            mine = rows[ids.long()]
            weights = weights.masked_fill(mine < 0, 0)
            ids, global_experts = mine.clamp(min=0).to(ids.dtype), int(tensors["w13_weight"].shape[0])
        out = self.kernel.apply(
            hidden_states=x,
            w1=tensors["w13_weight"],
            w2=tensors["w2_weight"],
            topk_weights=weights,
            topk_ids=ids,
            activation=self.activation,
            apply_router_weight_on_input=self.weight_on_input,
            global_num_experts=global_experts,
            expert_map=expert_map,
            shared_experts=shared[0],
            shared_experts_input=shared[1],
        )
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(
                f"the expert cache sums the experts' outputs, and this kernel returns {type(out)}"
            )
        return out


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on `device` without a host sync (from pinned memory on CUDA, whose
    allocator keeps the buffer until the copy is done)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
