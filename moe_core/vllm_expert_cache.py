"""The expert cache inside vLLM's fused-MoE layers, for the vLLM engine (`engine.offload: experts`).

It runs in vLLM's worker process. The engine asks vLLM for the load format LOAD_FORMAT, whose
loader (`ExpertCacheLoader`, registered when vLLM's worker imports this module as its
`worker_extension_cls`) loads the model as vLLM's default loader does and installs the cache in
it, before vLLM profiles its memory and captures its CUDA graphs; `ExpertCacheExtension`'s
methods, called by name through `collective_rpc`, then keep it between steps and report it. On
CUDA the engine has vLLM load the routed experts' weights (`w13_weight`, `w2_weight`) into pinned
host memory (vLLM's UVA offload), so a model larger than the GPU loads; everything else is on the
GPU as usual.

The seam: vLLM's MoE runner routes (top-k weights and ids [T, k] from the router) and then calls
`RoutedExperts.forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)`,
whose kernel reads the layer's `w13_weight` / `w2_weight` — [E, ...] in the kernel's own layout
(Triton's on CUDA, a prepacked one on vLLM's CPU build) — at every call. The cache takes those
parameters to pinned host memory, puts [slots, ...] ones in their place, and replaces
forward_modular with `_InPlaceLayer.forward`: the layer's own modular kernel (`moe_kernel.apply`,
the call vLLM makes) runs once over the slots for the resident experts and once in place over the
host copy for the others (a UVA view the kernel reads over PCIe, as vLLM's own offload reads), so
no forward waits for a copy or reads anything back to the host. Which experts are resident changes
between steps (`_VllmCache.between_steps`, run before each of the worker's steps): the tokens each
expert took, counted on the device and read a step late, go to `SlotTable.settle` (shared with the
torch engine's cache, moe_core/expert_cache.py), whose copies run on a copy stream.

CUDA graphs: the forward reads nothing back to the host and runs both calls at every step, so
vLLM's graphs capture the cached layers as they are; between replays only the device maps, the
slots' contents and the counters change. A replayed routing (benchmarks) is a device buffer that
`between_steps` fills with the step's rows, for the same reason.

Held: unquantized fused-MoE layers with modular kernels, without expert biases or expert
parallelism; anything else is refused (ValueError) with the reason.

vLLM is imported lazily: this module imports without it.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict
from typing import Any

import torch

from host.settings import Admission, Misses
from moe_core.choice import resident_slots
from moe_core.expert_cache import ExpertCache, RoutingTrace, _CachedLayer
from moe_core.expert_gather import gather_experts, miss_rows, scratch_rows
from moe_core.pinned import PinnedTurns

EXTENSION = f"{__name__}.ExpertCacheExtension"  # vLLM's worker_extension_cls
# vLLM's load format for a model with the cache (ExpertCacheLoader), and the key of its
# model_loader_extra_config that carries the resident share of each layer's experts
LOAD_FORMAT = "localmoe-expert-cache"
FRACTION_KEY = "localmoe_resident_fraction"
MISSES_KEY = "localmoe_misses"  # and how it computes the experts outside the slots (Misses)
ADMISSION_KEY = "localmoe_admission"  # and who decides what the slots hold (Admission)
CACHE_ATTR = "_localmoe_expert_cache"  # where the loaded model keeps its ExpertCache
# The weights vLLM's UVA offload keeps in host memory (segments of "...experts.w13_weight")
EXPERT_WEIGHTS = frozenset({"w13_weight", "w2_weight"})


COUNTS = 3  # per layer after its E token counts: experts needed, hits, admitted on the device
# admission "device": an expert's load is the tokens routed to it, decayed by this per forward. On
# the embedded model's recorded routing (bench/expert_cache.py --policies, batch 1) 0.97 moved
# 5-9 % fewer experts over the link than the torch cache's 0.9 with 4 of 8 resident (2-5 % with 2):
# a miss costs one read whether it takes a slot or not, so what counts is keeping the experts that
# come back, and a longer memory of the load keeps them better; 0.95-0.98 are alike, 1.0 worse.
DEVICE_LOAD_DECAY = 0.97


def admit_on_device(
    load: torch.Tensor,
    routed: torch.Tensor,
    slot_row: torch.Tensor,
    pairs: int,
    decay: float = DEVICE_LOAD_DECAY,
) -> torch.Tensor:
    """One forward's admissions, decided where it runs (admission "device"). load [E] float: each
    expert's tokens, decayed by `decay` per forward, this forward's `routed` [E] added here;
    slot_row [E] int32: each expert's slot, -1 outside, updated here. Each needed expert outside
    the slots, the busiest first, takes the slot of the resident expert this forward does not need
    with the least load, if its own load is above that one's (at most `pairs` a forward:
    min(slots, E - slots), fixed at install). → [E] int32: the slot each admitted expert's weights
    go to before the forward computes (its one read over the link), -1 for the others. Ties go to
    the lower expert id. Fixed shapes and no host read, so a CUDA graph captures it."""
    load.mul_(decay).add_(routed)
    needed, resident = routed > 0, slot_row >= 0
    miss, spare = needed & ~resident, resident & ~needed
    top = torch.finfo(load.dtype).max
    m = torch.argsort(torch.where(miss, -load, top), stable=True)[:pairs]  # busiest misses first
    v = torch.argsort(torch.where(spare, load, top), stable=True)[:pairs]  # least busy spares first
    ok = miss[m] & spare[v] & (load[m] > load[v])  # [pairs]: once one pair fails, all after it do
    slot = torch.where(ok, slot_row[v], -1)
    rows = torch.full_like(slot_row, -1).scatter_(0, m, slot)
    slot_row.scatter_(0, v, torch.where(ok, -1, slot_row[v]))
    slot_row.scatter_(0, m, torch.where(ok, slot, slot_row[m]))
    return rows


class _Counter:
    """Every layer's counts in one device table [L, E + COUNTS] (the tokens routed to each expert,
    then needed, hits and admitted), read in one copy to pinned memory a step late: between two
    steps one copy, one zeroing and one event for the whole model, into host buffers kept between
    steps (PinnedTurns: no pinned allocation per step)."""

    def __init__(self, layers: int, width: int, device: torch.device) -> None:
        self.table = torch.zeros((layers, width), dtype=torch.long, device=device)
        self.stage = PinnedTurns((width,), torch.long, device.type == "cuda")
        self.reading: tuple[torch.cuda.Event | None, torch.Tensor] | None = None  # on their way

    def take(self, wait: bool) -> list[list[int]] | None:
        """The rows counted up to the last reading's start, once they have arrived (wait: now, a
        host sync: statistics, not steps); None while they are on their way. A reading taken
        starts the next."""
        if self.reading is None:
            self._start()
        assert self.reading is not None
        event, buffer = self.reading
        if wait and event is not None:
            event.synchronize()
        elif event is not None and not event.query():  # type: ignore[no-untyped-call]
            return None
        rows: list[list[int]] = buffer.tolist()  # before the next reading may reuse the buffer
        self._start()
        return rows

    def _start(self) -> None:
        stage = self.stage
        buffer = stage.take(self.table.shape[0])
        buffer.copy_(self.table, non_blocking=stage.cuda)
        self.table.zero_()
        stage.queued()
        self.reading = (stage.events[stage.turn] if stage.cuda else None, buffer)


class _VllmCache(ExpertCache):
    """The cache of a vLLM model: its layers are `_InPlaceLayer`s, counted by one `_Counter`."""

    counter: _Counter

    def between_steps(self, wait: bool = False, tokens: int = 0) -> None:
        """Before a step (tokens: its size, for a replayed routing) or a statistics read (wait):
        each layer's landed copies and replayed rows, then what the counts read decide. On CUDA on
        the stream vLLM runs its steps on (its own, per thread), so that the maps change between
        the kernels of two steps. A step's call counts its host time in stats (steps, host_ns)."""
        started = time.perf_counter_ns()
        context: Any = contextlib.nullcontext()
        if self.device.type == "cuda":
            from vllm.utils.torch_utils import current_stream

            context = torch.cuda.stream(current_stream())
        with context:
            layers = [layer for layer in self.layers if isinstance(layer, _InPlaceLayer)]
            for layer in layers:
                layer.prepare(tokens)
            rows = self.counter.take(wait)
            if rows is not None:
                for layer, row in zip(layers, rows, strict=True):
                    layer.settle_counts(row)
        if not wait:
            self.stats.steps += 1
            self.stats.host_ns += time.perf_counter_ns() - started


def install(
    model: torch.nn.Module,
    resident_fraction: float,
    max_tokens: int,
    misses: Misses = "in_place",
    admission: Admission = "device",
) -> _VllmCache:
    """Hold `resident_fraction` of each fused-MoE layer's experts of `model` (vLLM's, loaded) on
    its device, at least one, the slots filled with its first experts; max_tokens: the most tokens
    a step runs (vLLM's max_num_batched_tokens: the rows of a replayed routing's buffers);
    misses: how the experts outside the slots are computed; admission: who decides what the slots
    hold (the host between steps, or the device within each forward). The model keeps the cache."""
    device = next(model.parameters()).device

    def layers(cache: ExpertCache, model: torch.nn.Module, fraction: float) -> list[_CachedLayer]:
        return vllm_layers(cache, model, fraction, max_tokens)

    cache = _VllmCache(model, device, resident_fraction, prefetch=False, install=layers)
    width = max(layer.num_experts for layer in cache.layers) + COUNTS
    cache.counter = _Counter(len(cache.layers), width, device)
    in_place = [layer for layer in cache.layers if isinstance(layer, _InPlaceLayer)]
    for row, layer in zip(cache.counter.table, in_place, strict=True):
        experts = layer.num_experts
        layer.tokens, layer.counts = row[:experts], row[experts : experts + COUNTS]
        layer.fill()
        if admission == "device":
            layer.pairs = min(layer.table.slots, experts - layer.table.slots)
    if misses == "gather":
        _share_scratch(in_place, device)
    vars(model)[CACHE_ATTR] = cache
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the experts' host-mapped weights are the cache's now
    return cache


def _share_scratch(layers: list[_InPlaceLayer], device: torch.device) -> None:
    """One scratch for all `layers` (they run one after another on one stream): per weight name
    and row shape, as many rows as the layer that needs the most (expert_gather.scratch_rows);
    each layer gathers its misses into the first rows it needs."""

    def key(name: str, host: torch.Tensor) -> tuple[str, tuple[int, ...], torch.dtype]:
        return (name, tuple(host.shape[1:]), host.dtype)

    rows = {id(layer): scratch_rows(layer.num_experts, layer.table.slots) for layer in layers}
    need: dict[tuple[str, tuple[int, ...], torch.dtype], int] = {}
    for layer in layers:
        for name, host in layer.host.items():
            need[key(name, host)] = max(need.get(key(name, host), 0), rows[id(layer)])
    scratch = {k: torch.zeros((n, *k[1]), dtype=k[2], device=device) for k, n in need.items()}
    for layer in layers:
        layer.scratch = {
            name: scratch[key(name, host)][: rows[id(layer)]] for name, host in layer.host.items()
        }


def _register_loader() -> None:
    """ExpertCacheLoader as vLLM's load format LOAD_FORMAT (in each process that imports this
    module: vLLM's worker imports it as its worker_extension_cls before it loads the model)."""
    try:
        from vllm.model_executor.model_loader import register_model_loader
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    except ImportError:  # no vLLM: nothing to register with
        return

    @register_model_loader(LOAD_FORMAT)
    class ExpertCacheLoader(DefaultModelLoader):  # type: ignore[misc]
        """vLLM's default loader, then the cache installed in the model it loaded: before vLLM
        profiles its memory (the slots counted in) and captures its CUDA graphs (around the
        cached layers, whose forward reads nothing back to the host)."""

        def __init__(self, load_config: Any) -> None:
            extra = dict(load_config.model_loader_extra_config or {})
            self.resident_fraction = float(extra.pop(FRACTION_KEY))
            self.misses: Misses = extra.pop(MISSES_KEY, "in_place")
            self.admission: Admission = extra.pop(ADMISSION_KEY, "device")
            config = copy.copy(load_config)
            config.load_format, config.model_loader_extra_config = "auto", extra
            super().__init__(config)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
            model: torch.nn.Module = super().load_model(vllm_config, model_config, prefix)
            tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
            install(model, self.resident_fraction, tokens, self.misses, self.admission)
            return model


_register_loader()


class ExpertCacheExtension:
    """Methods of vLLM's worker (which provides `get_model`) that `collective_rpc` calls by name."""

    _localmoe_expert_cache: _VllmCache | None = None

    def attach_expert_cache(self) -> list[int]:
        """The cache the loader installed in the model, its residency kept before each step (the
        worker's execute_model, wrapped); → the slots per layer."""
        model: torch.nn.Module = self.get_model()  # type: ignore[attr-defined]
        cache = vars(model).get(CACHE_ATTR)
        if not isinstance(cache, _VllmCache):
            raise RuntimeError(f"the model was not loaded with load_format {LOAD_FORMAT!r}")
        self._localmoe_expert_cache = cache
        step = self.execute_model  # type: ignore[attr-defined]

        def execute_model(*args: Any, **kwargs: Any) -> Any:
            scheduled = getattr(args[0], "total_num_scheduled_tokens", 0) if args else 0
            cache.between_steps(tokens=int(scheduled))
            return step(*args, **kwargs)

        vars(self)["execute_model"] = execute_model  # vLLM's worker wrapper calls it by name
        return cache.slots

    def expert_cache_layers(self) -> list[tuple[int, int]]:
        """(needed, hits) of each fused-MoE layer since install ([] without a cache)."""
        cache = self._localmoe_expert_cache
        if cache is None:
            return []
        cache.between_steps(wait=True)
        return [(layer.needed, layer.hits) for layer in cache.layers]

    def expert_cache_rows(self) -> list[tuple[int, int]]:
        """(device slots, scratch rows its misses are gathered into: 0 in place) of each fused-MoE
        layer ([] without a cache)."""
        cache = self._localmoe_expert_cache
        if cache is None:
            return []
        return [
            (layer.table.slots, layer.scratch_rows)
            for layer in cache.layers
            if isinstance(layer, _InPlaceLayer)
        ]

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
        cache.between_steps(wait=True)
        counts = asdict(cache.stats)
        if reset:
            cache.reset_stats()
        return counts


def vllm_layers(
    cache: ExpertCache, model: torch.nn.Module, fraction: float, max_tokens: int
) -> list[_CachedLayer]:
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
            layer = _InPlaceLayer(cache, routed, resident_slots(fraction, int(routed.local_num_experts)))
            layer.hold(routed, cache.device)
            layer.replay_ids = torch.zeros(
                (max_tokens, int(routed.top_k)), dtype=torch.int32, device=cache.device
            )
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


class _InPlaceLayer(_CachedLayer):
    """A fused-MoE layer that computes every expert with the weights where they are, and never
    stops the host.

    Device state ([E] each): `slot_row` (expert → its slot, -1 while not resident) and `host_row`
    (expert → itself, -1 while resident): the forward runs the layer's kernel twice over the same
    ids, once over the slots with slot_row as its expert map and once for the other experts, each
    skipping the other's experts; their outputs are summed, the shared experts run with the first.
    The second call (misses "in_place", the default): the kernel runs over the host copy itself (a
    UVA view on CUDA, read over PCIe in the kernel's tile order, as vLLM's own offload reads it)
    with host_row; misses "gather": the step's needed experts outside the slots are first gathered
    from the host copy into `scratch` rows (expert_gather: [E] miss rows made on the device, a
    Triton kernel reading the UVA view with wide loads) and the kernel runs over those rows. On CPU
    (the host copy itself), whose kernels take no map, an id the call does not run gets a routing
    weight of 0 (and row 0). The forward also counts, on the device, the tokens routed to each
    expert and (needed, hits) per forward. Nothing in it reads the device from the host: it is
    captured in vLLM's CUDA graphs as it is.

    Residency changes between steps, in `_VllmCache.between_steps` (vLLM's worker calls it before
    each step): the counts of the forwards since the last read, copied to pinned memory one step
    and read the next, go to `SlotTable.settle`; an expert it admits is first taken from the slots
    call's map (its slot's old expert goes to the host call), copied in on the copy stream once the
    kernels queued before are done, and given its slot in the maps at the first `between_steps`
    after its copy has finished (an event queried, never waited for). At every moment each expert
    runs in exactly one of the two calls. With a scratch, the copies on their way per layer are
    held to what its rows leave room for (expert_gather.SPARE_SLOTS), so that every miss has a row.

    Admission "device" (`pairs` > 0) keeps none of that between steps: each forward decides with
    `admit_on_device` (the step's counts, a `load` [E] kept on the device) which needed experts
    outside the slots take the slots of less busy ones it does not need, gathers their weights
    from the host copy into those slots (expert_gather, the one read of each over the link) and
    updates both maps before the two calls; the host only reads the counts for the statistics."""

    def __init__(self, cache: ExpertCache, routed: Any, slots: int) -> None:
        super().__init__(cache, int(routed.local_num_experts), slots, None, sentinel=False)
        self.kernel = routed.quant_method.moe_kernel
        self.activation = routed.activation
        self.weight_on_input = bool(routed.apply_router_weight_on_input)
        self.view: dict[str, torch.Tensor] = {}  # weight name → [E, ...] host memory, as kernels read it
        self.use_map = False  # the kernel skips ids an expert map sends to -1 (CUDA's Triton kernel)
        self.slot_row = self.host_row = torch.empty(0)  # [E] each, set by hold()
        # views into the cache's _Counter table, set by install: tokens routed to each expert [E]
        # and (needed, hits) [2] since the last reading
        self.tokens = self.counts = torch.empty(0)  # counts: [needed, hits]
        self.generation: list[int] = [0] * slots  # per slot: bumped by each copy into it
        # (expert, slot, the slot's generation, the copy's end: None once done)
        self.landing: list[tuple[int, int, int, torch.cuda.Event | None]] = []
        self.in_slots: dict[int, int] = {}  # expert → slot: what slot_row says, on the host
        self.replay_ids = torch.empty(0, dtype=torch.int32)  # [max tokens, k]: set by vllm_layers
        self.replay_stage: PinnedTurns | None = None  # host rows on their way to replay_ids
        self.replaying = torch.empty(0, dtype=torch.bool)  # []: replay_ids rule (set by hold)
        self.replaying_now = False  # what `replaying` holds, on the host
        # weight name → [K, ...] device rows the step's misses are gathered into (a view of the
        # scratch all layers share); empty: the misses are computed in place (misses "in_place")
        self.scratch: dict[str, torch.Tensor] = {}
        self.pairs = 0  # admission "device": the most experts a forward admits (0: "settle", the host's)
        self.load = torch.empty(0)  # [E] float32: admission "device"'s decayed tokens per expert
        self.experts = torch.empty(0, dtype=torch.int32)  # [E]: 0..E-1, host_row's values

    def hold(self, module: torch.nn.Module, device: torch.device) -> None:
        super().hold(module, device)
        self.use_map = device.type == "cuda"
        for name, host in self.host.items():
            if device.type == "cuda":
                from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

                self.view[name] = get_accelerator_view_from_cpu_tensor(host)
            else:
                self.view[name] = host
        experts = self.num_experts
        self.slot_row = torch.full((experts,), -1, dtype=torch.int32, device=device)
        self.experts = torch.arange(experts, dtype=torch.int32, device=device)
        self.host_row = self.experts.clone()
        self.load = torch.zeros((experts,), dtype=torch.float32, device=device)
        self.replaying = torch.zeros((), dtype=torch.bool, device=device)

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """RoutedExperts.forward_modular's contract: x [T, H], topk_* [T, k] → [T, H]."""
        # benchmarks: a recorded model's routing, put in replay_ids by between_steps before the step
        replayed = self.replay_ids[: topk_ids.shape[0]].to(topk_ids.dtype)
        topk_ids = torch.where(self.replaying, replayed, topk_ids)
        flat = topk_ids.flatten().long()
        routed = torch.zeros_like(self.tokens).scatter_add_(0, flat, torch.ones_like(flat))  # [E]
        self.tokens += routed
        needed = routed > 0
        hits = (needed & (self.slot_row >= 0)).sum()
        admitted = torch.zeros_like(hits)
        if self.pairs:  # admission "device": the misses that take a slot are read into it now
            rows = admit_on_device(self.load, routed.float(), self.slot_row, self.pairs)
            for name, view in self.view.items():
                gather_experts(view, self.device[name], rows)
            self.host_row.copy_(torch.where(self.slot_row >= 0, -1, self.experts))
            admitted = (rows >= 0).sum()
        self.counts += torch.stack([needed.sum(), hits, admitted])  # [needed, hits, admitted]
        # both calls always (a captured graph replays what was there when it was captured), the
        # shared experts with the first
        shared = (shared_experts, shared_experts_input)
        out = self._call(x, topk_weights, topk_ids, self.device, self.slot_row, shared)
        if not self.scratch:
            return out + self._call(x, topk_weights, topk_ids, self.view, self.host_row, (None, None))
        rows = miss_rows(needed, self.slot_row)  # [E]: each miss's scratch row, -1 for the rest
        for name, view in self.view.items():
            gather_experts(view, self.scratch[name], rows)
        return out + self._call(x, topk_weights, topk_ids, self.scratch, rows, (None, None))

    def _call(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        rows: torch.Tensor,
        shared: tuple[Any, torch.Tensor | None],
    ) -> torch.Tensor:
        """The kernel over `tensors` (the slots [S, ...], scratch [K, ...] or host memory [E, ...])
        for the experts `rows` [E] gives a row (-1: another call's)."""
        expert_map: torch.Tensor | None = None
        if self.use_map:
            expert_map, global_experts = rows, self.num_experts
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
            raise RuntimeError(f"the expert cache sums the experts' outputs; this kernel returns {type(out)}")
        return out

    def prepare(self, tokens: int) -> None:
        """Before a step: copies that have landed join the slots call; a replayed routing's next
        `tokens` rows into replay_ids."""
        self._replay(tokens)
        self._land()

    def settle_counts(self, row: list[int]) -> None:
        """The counts of the forwards since the last reading ([E] tokens per expert, needed,
        hits, admitted on the device): into the statistics, and (admission "settle") what to copy
        in next."""
        experts = self.num_experts
        routed, (needed, hits, admitted) = row[:experts], row[experts : experts + COUNTS]
        self.tally(needed, hits)
        stats = self.cache.stats
        stats.bytes_fetched += admitted * self.expert_bytes  # a miss gathered into a slot
        stats.bytes_in_place += (needed - hits - admitted) * self.expert_bytes
        if self.pairs:
            return
        busy = [e for e, n in enumerate(routed) if n]
        if busy:
            self._copy_in(self.table.settle(busy, [routed[e] for e in busy], self._copy_limit()))

    def _copy_limit(self) -> int | None:
        """With a scratch of K rows: how many more slots may be between two experts (a copy on its
        way) with every expert outside the slots still having a row; None: no limit (in place)."""
        if not self.scratch:
            return None
        slots = self.table.slots
        outside = self.num_experts - slots  # experts outside the slots while every slot has landed
        return max(0, self.scratch_rows - outside - (slots - len(self.in_slots)))

    @property
    def scratch_rows(self) -> int:
        """K: the rows its misses are gathered into (0: computed in place)."""
        return next(iter(self.scratch.values())).shape[0] if self.scratch else 0

    def fill(self) -> None:
        """At install: the slots take the layer's first experts (copied now, resident at once), so
        that the first steps compute those on the device and a scratch needs no more rows than
        E - slots + SPARE_SLOTS."""
        for expert, slot in self.table.fill():
            for name, host in self.host.items():
                self.device[name][slot].copy_(host[expert])
            self.slot_row[expert], self.host_row[expert] = slot, -1
            self.in_slots[expert] = slot

    def _replay(self, tokens: int) -> None:
        trace = self.cache.trace
        replaying = trace is not None and trace.replaying
        if replaying and tokens > 0:
            assert trace is not None
            rows = trace.rows(self, tokens)  # [tokens, k] int32
            assert rows.shape[1] == self.replay_ids.shape[1], "the trace's k must be the model's"
            cuda = self.replay_ids.device.type == "cuda"
            if self.replay_stage is None:
                self.replay_stage = PinnedTurns((rows.shape[1],), torch.int32, cuda)
            self.replay_stage.send(rows, self.replay_ids[:tokens])
        if replaying != self.replaying_now:
            self.replaying.fill_(replaying)
            self.replaying_now = replaying

    def _copy_in(self, copies: list[tuple[int, int]]) -> None:
        """settle's (expert, slot)s, copied by the cache (on its copy stream, after the kernels
        queued before: `done`); each new expert joins the slots call once its copy has landed."""
        if not copies:
            return
        if self.done is not None:
            self.done.record()
        self.cache.copy(self, copies)
        stream, landed = self.cache.stream, None
        if stream is not None:  # this batch's end (the cache's `ready` is re-recorded by the next)
            landed = torch.cuda.Event()  # type: ignore[no-untyped-call]
            landed.record(stream)
        self.landing += [(expert, slot, self.generation[slot], landed) for expert, slot in copies]
        if landed is None:  # CPU: copied when copy_ returned
            self._land()

    def copied(self, copies: list[tuple[int, int]]) -> None:
        """Before the cache copies into these slots: each slot's old expert to the host call (the
        maps change on the compute stream, after the kernels queued before)."""
        for _, slot in copies:
            for old in [e for e, s in self.in_slots.items() if s == slot]:
                self.slot_row[old] = -1
                self.host_row[old] = old
                del self.in_slots[old]
            self.generation[slot] += 1

    def _land(self) -> None:
        """Copies that have finished, into a slot no later copy has taken: their experts join the
        slots call."""
        waiting: list[tuple[int, int, int, torch.cuda.Event | None]] = []
        for expert, slot, generation, event in self.landing:
            if event is not None and not event.query():  # type: ignore[no-untyped-call]
                waiting.append((expert, slot, generation, event))
            elif self.generation[slot] == generation:
                self.slot_row[expert] = slot
                self.host_row[expert] = -1
                self.in_slots[expert] = slot
        self.landing = waiting
