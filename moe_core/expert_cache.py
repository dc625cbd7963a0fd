"""A device cache of a MoE model's routed experts (`engine.offload: experts`), for the torch engine
and, inside vLLM's fused-MoE layers, for the vLLM engine (moe_core/vllm_expert_cache.py).

Only the experts make a MoE model large, and each token uses k of a layer's E. So every MoE layer
keeps `slots` of its experts on the device and all E in host memory (pinned on CUDA, so a copy is
an asynchronous DMA); attention, norms, routers and shared experts stay on the device. A layer's
forward, in `_CachedLayer.run`:

1. its router has chosen: top-k ids [T, k] over the T tokens → the experts needed, counted on
   the device together with step 2's prediction and read in one host sync per layer;
2. the next layer's router, applied to this layer's input, predicts which experts that layer
   will need; those not resident are copied in ahead (on a copy stream on CUDA, while this layer
   computes) into slots whose experts are not predicted (`SlotTable.prefetch`);
3. the experts needed and not resident are copied in (`SlotTable.admit`: a free slot, else the
   least recently needed expert not needed now, the one with the least recent load among equals);
4. the backend's own experts computation runs as it always does, on its slot tensors
   [slots, ...], the ids remapped to slots (a device map [E] kept current as experts come and
   go: a step whose experts are all resident gathers it and copies nothing from the host). A
   forward that needs more experts than there are slots runs them in turns of `slots`, the
   turns' outputs summed (an id of another turn's expert goes to a sentinel the backend skips,
   or to a slot with a routing weight of 0).

The output is the model's with every expert on the device, up to the order the tokens' expert
outputs are summed in (greedy tokens alike: tests/test_expert_cache.py, one slot per layer too).
Which layers (transformers): each module with one router child (`*TopKRouter`, as expert telemetry
finds them) and one experts child built on transformers' experts interface
(`use_experts_implementation`: forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])),
whose parameters with E rows are the per-expert weights. Every family LocalMoE builds has that form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_core.choice import resident_slots
from moe_core.pinned import PinnedTurns
from moe_core.telemetry import routers

LOAD_DECAY = 0.9  # per forward of the layer: an expert's load is the tokens routed to it, decayed
# Prefetch copies only while its predictions come true this often (of the predicted experts not
# resident, the share the next forward needed: what fetching them would have been worth; an EWMA
# kept whether it copies or not): a wrong prediction evicts an expert the layer still uses. On
# the embedded model's trained routing about three quarters of the experts fetched ahead were
# needed; on random weights, whose routers keep choosing the same few experts, a few percent, and
# fetching them lowered the hit rate (bench/expert_cache.py, BENCHMARKS.md).
PREFETCH_MIN_ACCURACY = 0.5
# SlotTable.settle: an expert computed in place takes a resident one's slot once its decayed load
# is this many times that one's
ADMIT_MARGIN = 1.5
ACCURACY_DECAY = 0.9


@dataclass
class CacheStats:
    """Counted over every layer since the cache was made."""

    needed: int = 0  # experts a forward needed (per layer and forward)
    hits: int = 0  # of them, resident already (prefetched ones included)
    prefetched: int = 0  # experts copied in ahead of their layer
    prefetch_hits: int = 0  # of those, needed by the forward they were fetched for
    bytes_fetched: int = 0  # host → device, on demand and ahead
    bytes_in_place: int = 0  # experts a kernel read from host memory where they are (vLLM's cache)
    # vLLM's cache: the steps it was kept between, and the host time that took (ns)
    steps: int = 0
    host_ns: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 1.0


class SlotTable:
    """Which expert each of one layer's `slots` device slots holds, and what to evict."""

    def __init__(self, experts: int, slots: int) -> None:
        if not 1 <= slots <= experts:
            raise ValueError(f"slots must be 1..{experts}, not {slots}")
        self.slots = slots
        self.slot_of = [-1] * experts  # expert → its slot, -1 when not resident
        self.holds = [-1] * slots  # slot → its expert, -1 when free
        self.used = [0] * experts  # the forward each expert was last needed in (0: never)
        self.load = [0.0] * experts  # tokens routed to it, decayed per forward: the layer's profile
        self.ahead: set[int] = set()  # prefetched and not yet needed
        self.tick = 0
        self.predicted: set[int] = set()  # what the last prediction would fetch for the next forward
        self.accuracy = 1.0  # EWMA of the share of those the next forward needed

    def admit(self, needed: Sequence[int], tokens: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """One forward needs `needed` (distinct, at most `slots`; `tokens`: how many tokens each
        takes). → the (expert, slot) copies to make first, none into a slot another needed
        expert holds."""
        if len(needed) > self.slots:
            raise ValueError(f"{len(needed)} experts do not fit in {self.slots} slots")
        self.tick += 1
        self.load = [x * LOAD_DECAY for x in self.load]
        keep = set(needed)
        if self.predicted:  # how the prediction for this forward did (one forward in turns: once)
            right = len(self.predicted & keep) / len(self.predicted)
            self.accuracy = ACCURACY_DECAY * self.accuracy + (1 - ACCURACY_DECAY) * right
            self.predicted = set()
        copies: list[tuple[int, int]] = []
        for i, expert in enumerate(needed):
            self.used[expert] = self.tick
            self.load[expert] += tokens[i] if tokens is not None else 1
            if self.slot_of[expert] < 0:
                copies.append((expert, self._place(expert, keep)))
        self.ahead -= keep
        return copies

    def settle(
        self, needed: Sequence[int], tokens: Sequence[int], limit: int | None = None
    ) -> list[tuple[int, int]]:
        """For a layer that computes the experts it lacks where they are (vLLM's in-place calls):
        one forward needed `needed` (distinct; `tokens`: how many tokens each took), the resident
        ones already run. → the copies that make the busier experts resident: an expert not
        resident takes a free slot, or the slot of the resident expert with the least load if its
        own load is above that one's by ADMIT_MARGIN (so that experts of about equal load, as at
        a large batch whose steps each need nearly every expert, do not trade places at every
        step: each trade costs an expert's copy over the same link the in-place calls read from).
        limit: at most this many copies (the busiest first), None: no limit."""
        self.tick += 1
        self.load = [x * LOAD_DECAY for x in self.load]
        for expert, n in zip(needed, tokens, strict=True):
            self.used[expert] = self.tick
            self.load[expert] += n
        copies: list[tuple[int, int]] = []
        for expert in sorted((e for e in needed if self.slot_of[e] < 0), key=lambda e: -self.load[e]):
            if limit is not None and len(copies) >= limit:
                break
            if -1 in self.holds:
                slot = self.holds.index(-1)
            else:
                slot = min(range(self.slots), key=lambda s: self.load[self.holds[s]])
                if self.load[expert] <= self.load[self.holds[slot]] * ADMIT_MARGIN:
                    break  # the others are no busier
                self.slot_of[self.holds[slot]] = -1
            self.holds[slot], self.slot_of[expert] = expert, slot
            copies.append((expert, slot))
        return copies

    def fill(self) -> list[tuple[int, int]]:
        """Empty slots taken by experts 0, 1, ... in order (a cache's start before any routing: its
        first steps find those resident). → the copies to make."""
        return self.settle(list(range(self.slots)), [0] * self.slots)

    def prefetch(self, predicted: Sequence[int]) -> list[tuple[int, int]]:
        """The next forward will probably need `predicted`: → copies of those not resident, into
        free slots or slots of experts not predicted (at most `slots` of them are kept); none
        while such predictions come true less than PREFETCH_MIN_ACCURACY of the time."""
        keep = set(predicted[: self.slots])
        self.predicted = {e for e in keep if self.slot_of[e] < 0}
        if self.accuracy < PREFETCH_MIN_ACCURACY:
            return []
        copies = []
        for expert in predicted[: self.slots]:
            if self.slot_of[expert] < 0:
                copies.append((expert, self._place(expert, keep)))
                self.ahead.add(expert)
        return copies

    def _place(self, expert: int, keep: set[int]) -> int:
        slot = self._victim(keep)
        if (old := self.holds[slot]) >= 0:
            self.slot_of[old] = -1
            self.ahead.discard(old)
        self.holds[slot], self.slot_of[expert] = expert, slot
        return slot

    def _victim(self, keep: set[int]) -> int:
        """A free slot, else the slot of the expert outside `keep` needed least recently (the
        least load among those needed as recently)."""
        if -1 in self.holds:
            return self.holds.index(-1)
        candidates = [s for s, e in enumerate(self.holds) if e not in keep]
        return min(candidates, key=lambda s: (self.used[self.holds[s]], self.load[self.holds[s]]))


def _experts_of(router: torch.nn.Module) -> int:
    """E: a router's weight is [E, H]."""
    weight = router.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def _turns(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _routed(router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """The router's top-k ids [T, k] for `hidden` [T, H] (its one integer output), its hooks
    (expert telemetry's) not run; None for a router that gives none."""
    out = router.forward(hidden)
    outputs = out if isinstance(out, tuple) else (out,)
    return next((o for o in outputs if isinstance(o, torch.Tensor) and not o.is_floating_point()), None)


# (hidden [T, H], slot ids [T, k], routing weights [T, k]) → the experts' output [T, H], computed on
# the layer's slot tensors (a weight of 0 where an id stands for no expert of this turn)
Compute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# hidden [T, H] → the top-k expert ids [T, k] a layer's router would choose for it (None: no guess)
Predict = Callable[[torch.Tensor], "torch.Tensor | None"]


class _CachedLayer:
    """One MoE layer's routed experts, their weights in `slots` device slots.

    Backend-neutral: `hold` takes the per-expert parameters out of the module that computes the
    experts (transformers' experts module, vLLM's fused-MoE layer) and `run` serves one forward
    with a `Compute` of that backend. sentinel: an id for "no expert of this turn" the backend
    skips (transformers' expert-parallel sentinel, `slots`); None: such ids go to slot 0 with a
    routing weight of 0 (a kernel that knows no sentinel computes them and adds nothing)."""

    def __init__(
        self, cache: ExpertCache, num_experts: int, slots: int, predict: Predict | None, sentinel: bool
    ) -> None:
        self.cache = cache
        self.num_experts = num_experts
        self.table = SlotTable(num_experts, slots)
        self.predict = predict  # this layer's router, for the layer before it to fetch ahead
        self.sentinel = slots if sentinel else None
        self.host: dict[str, torch.Tensor] = {}  # weight name → [E, ...] in host memory
        self.device: dict[str, torch.Tensor] = {}  # weight name → [slots, ...] on the device
        self.next: _CachedLayer | None = None  # the layer after this one, whose experts it predicts
        self.ready: torch.cuda.Event | None = None  # its copies are done (CUDA)
        self.done: torch.cuda.Event | None = None  # its last forward is done with its slots (CUDA)
        self.expert_bytes = 0
        self.needed = self.hits = 0  # this layer's share of CacheStats' counts
        self.number = 0  # its place among the cache's layers
        self.cursor = 0  # tokens of a replayed trace this layer has taken
        self.slot_map = torch.zeros(num_experts, dtype=torch.long)  # expert → its slot, on the device

    def hold(self, module: torch.nn.Module, device: torch.device) -> None:
        """`module`'s parameters with a row per expert ([E, ...], whatever layout its kernel
        keeps them in) to host memory, pinned on CUDA (from the device, or from a view of host
        memory the device reads in place); `slots` rows of each on `device` take their place, and
        the module computes on those from now on."""
        pin = device.type == "cuda"
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0 or param.shape[0] != self.num_experts:
                continue
            host = param.data.to("cpu")
            self.host[name] = host.pin_memory() if pin else host
            # zeros: a free slot computed on (rows an implementation runs and then drops) stays finite
            slots = torch.zeros((self.table.slots, *param.shape[1:]), dtype=param.dtype, device=device)
            self.device[name] = slots
            setattr(module, name, torch.nn.Parameter(slots, requires_grad=False))
            self.expert_bytes += host[0].numel() * host.element_size()
        if not self.host:
            raise ValueError(f"{type(module).__name__} holds no per-expert weights")
        self.slot_map = self.slot_map.to(device)
        if pin:
            self.ready, self.done = torch.cuda.Event(), torch.cuda.Event()  # type: ignore[no-untyped-call]

    def route(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The ids this forward routes by ([T, k] int64: the router's, or a replayed trace's) and
        the tokens per expert [E], read in one host sync together with the next layer's
        prediction, whose experts are copied in ahead (prefetch, on the copy stream on CUDA).

        The counts are made on the device ([E] each, by scatter-add: torch.unique and bincount
        would each sync again)."""
        trace = self.cache.trace
        after = self.next if self.cache.prefetch or trace is not None else None
        guess = None  # the next layer's top-k ids [T, k], predicted
        if trace is not None and trace.replaying:  # the recorded model's choices and predictions
            top_k_index, guess = trace.replay(self, top_k_index)
        elif after is not None and after.predict is not None:
            guess = after.predict(hidden)
        index = top_k_index.long()
        counts = _counts(index, self.num_experts)  # [E]
        if trace is not None and not trace.replaying:
            trace.record(self, index, guess)
        if after is None or guess is None or not self.cache.prefetch:
            return index, counts.tolist()
        both = torch.cat([counts, _counts(guess.long(), after.num_experts)]).tolist()
        counted, predicted = both[: self.num_experts], both[self.num_experts :]
        ahead = after.table.prefetch([e for e, n in enumerate(predicted) if n])
        self.cache.stats.prefetched += len(ahead)
        self.cache.copy(after, ahead)  # on CUDA: while this layer computes
        return index, counted

    def count(self, needed: list[int], hits: int) -> None:
        """One forward needed `needed`, `hits` of them resident: into the cache's and this layer's counts."""
        self.tally(len(needed), hits)
        self.cache.stats.prefetch_hits += sum(1 for e in needed if e in self.table.ahead)

    def tally(self, needed: int, hits: int) -> None:
        """`needed` experts needed by forwards, `hits` of them resident: into the cache's and this
        layer's counts."""
        stats = self.cache.stats
        stats.needed, stats.hits = stats.needed + needed, stats.hits + hits
        self.needed, self.hits = self.needed + needed, self.hits + hits

    def run(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, compute: Compute
    ) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, k] expert ids, top_k_weights [T, k]: the experts'
        output [T, H], `compute` run on the slots once per turn of at most `slots` experts."""
        index, counted = self.route(hidden, top_k_index)
        needed = [e for e, n in enumerate(counted) if n]
        self.count(needed, sum(1 for e in needed if self.table.slot_of[e] >= 0))
        out: torch.Tensor | None = None
        turns = list(_turns(needed, self.table.slots))
        for experts in turns:
            self.cache.copy(self, self.table.admit(experts, [counted[e] for e in experts]))
            if self.ready is not None:
                torch.cuda.current_stream(hidden.device).wait_event(self.ready)
            if len(turns) == 1:  # every expert routed to is resident: the slot map as it stands
                mapped, weights = self.slot_map[index].to(top_k_index.dtype), top_k_weights
            else:  # another turn's experts: the sentinel, or slot 0 with a routing weight of 0
                absent = self.sentinel if self.sentinel is not None else 0
                remap = [absent] * self.num_experts
                for expert in experts:
                    remap[expert] = self.table.slot_of[expert]
                mapped = torch.tensor(remap, device=hidden.device)[index].to(top_k_index.dtype)
                ours = torch.zeros(self.num_experts, dtype=torch.bool)
                ours[experts] = True
                weights = top_k_weights.masked_fill(~ours.to(hidden.device)[index], 0)
            part = compute(hidden, mapped, weights)
            if self.done is not None:  # the next copies into these slots wait for this
                self.done.record()
            out = part if out is None else out + part
        assert out is not None  # a router chooses k >= 1 experts for each of T >= 1 tokens
        return out

    def copied(self, copies: list[tuple[int, int]]) -> None:
        """The cache is about to copy these (expert, slot)s in: the device's slot map follows (on
        the current stream: before the layer's next compute reads it)."""
        self.map_slots()

    def map_slots(self) -> None:
        """The device's expert → slot map [E] after a change of residency (0 where an expert is
        not resident: a forward reads it only for experts it made resident)."""
        slot_of = torch.tensor([max(s, 0) for s in self.table.slot_of], dtype=torch.long)
        self.slot_map.copy_(slot_of)


def _counts(index: torch.Tensor, experts: int) -> torch.Tensor:
    """Tokens routed to each expert: [experts] int64 from ids [T, k] (any shape), on their device."""
    flat = index.flatten()
    return torch.zeros(experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


# Finds the MoE layers of a model and hands each its slots: → the cache's layers, in model order.
Install = Callable[["ExpertCache", torch.nn.Module, float], "list[_CachedLayer]"]


def _transformers_layers(cache: ExpertCache, model: torch.nn.Module, fraction: float) -> list[_CachedLayer]:
    """Each (router, experts module) of a transformers model (`moe_layers`), the experts module
    computing on its slots; the rest of the model moved to the cache's device."""
    layers = []
    for router, experts in moe_layers(model):
        num_experts = _experts_of(router)
        slots = resident_slots(fraction, num_experts)
        layer = _CachedLayer(cache, num_experts, slots, functools.partial(_routed, router), sentinel=True)
        layer.hold(experts, cache.device)
        # Ids >= num_experts are expert parallelism's sentinels, which every implementation skips
        # once told (_is_expert_parallel), given a routing weight of 0 there.
        vars(experts)["num_experts"] = slots
        vars(experts)["_is_expert_parallel"] = True
        compute = experts.forward
        experts.forward = functools.partial(_run_on, layer, compute)
        layers.append(layer)
    model.to(cache.device)
    return layers


def _run_on(
    layer: _CachedLayer,
    compute: Compute,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    return layer.run(hidden, top_k_index, top_k_weights, compute)


@dataclass
class RoutingTrace:
    """Routing recorded in one model, to replay in another (bench/offload_gpu.py: a trained model's
    routing on a random-weight model, whose routers choose unlike a trained model's).

    Per recorded layer, one row of k expert ids per token, in the order the tokens went through
    the model: `chosen` by that layer's router; `predicted` for it by the layer before (the
    prefetch's guess: the layer's router applied to the previous layer's input; [] for the first
    layer). Replayed, layer n of the model takes recorded layer n mod the recorded layers, each
    forward the next rows (cycling), ids mod its experts; its router's weights stay. The cache's
    hit rate and traffic are then the recorded model's on this model's sizes, and the tokens are
    not this model's own. k must be the model's."""

    chosen: list[list[list[int]]] = field(default_factory=list)
    predicted: list[list[list[int]]] = field(default_factory=list)
    replaying: bool = False  # False: recording into the lists
    # (predicted?, layer) → its recorded rows as one [R, k] int32 array, for replaying
    _arrays: dict[tuple[bool, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    # (predicted?, layer) → the pinned buffers its replayed rows go to the GPU through
    _stages: dict[tuple[bool, int], PinnedTurns] = field(default_factory=dict, repr=False, compare=False)

    def record(self, layer: _CachedLayer, index: torch.Tensor, guess: torch.Tensor | None) -> None:
        """index: the layer's [T, k] ids; guess: its prediction of the next layer's, [T, k]."""
        while len(self.chosen) <= layer.number + 1:
            self.chosen.append([])
            self.predicted.append([])
        self.chosen[layer.number] += index.tolist()
        if guess is not None:
            self.predicted[layer.number + 1] += guess.tolist()

    def rows(self, layer: _CachedLayer, tokens: int) -> np.ndarray:
        """The layer's ids for its next `tokens` tokens, [tokens, k] int32 (its cursor moves on)."""
        start = layer.cursor
        layer.cursor += tokens
        picked = self._pick(self.chosen, layer.number, layer.num_experts, start, tokens)
        assert picked is not None, "a replayed layer has recorded rows"
        return picked

    def replay(self, layer: _CachedLayer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ (the layer's ids for the T tokens of `like` [T, k], the next layer's predicted ids)."""
        tokens, start = like.shape[0], layer.cursor

        def device(rows: np.ndarray, predicted: bool) -> torch.Tensor:
            if like.device.type != "cuda":
                return torch.from_numpy(rows).to(like.device, like.dtype)
            key = (predicted, layer.number)  # staged through pinned buffers kept for it: no host sync
            stage = self._stages.get(key)
            if stage is None or stage.dtype != like.dtype or stage.row != rows.shape[1:]:
                stage = self._stages[key] = PinnedTurns(tuple(rows.shape[1:]), like.dtype, cuda=True)
            return stage.send(rows, torch.empty(rows.shape, dtype=like.dtype, device=like.device))

        chosen = device(self.rows(layer, tokens), predicted=False)
        assert chosen.shape == like.shape, "the trace's k must be the model's"
        after = layer.next
        guess = None
        if after is not None:
            guess = self._pick(self.predicted, layer.number + 1, after.num_experts, start, tokens)
        return chosen, None if guess is None else device(guess, predicted=True)

    def _pick(
        self, table: list[list[list[int]]], number: int, experts: int, start: int, tokens: int
    ) -> np.ndarray | None:
        """Rows start.. of recorded layer `number` mod the recorded layers (cycling), ids mod
        `experts`; None where that layer has no rows (the first layer's predictions)."""
        layers = len([rows for rows in self.chosen if rows])
        number %= layers
        recorded = table[number]
        if not recorded:
            return None
        key = (table is self.predicted, number)
        array = self._arrays.get(key)
        if array is None or array.shape[0] != len(recorded):  # made once, again if recording went on
            array = self._arrays[key] = np.asarray(recorded, dtype=np.int32)
        return array[(start + np.arange(tokens)) % len(recorded)] % experts


class ExpertCache:
    """Every MoE layer of `model` with `resident_fraction` of its routed experts on `device` (at
    least one each) and all of them in host memory. prefetch: fetch the next layer's predicted
    experts ahead (off: on demand only, for comparison). install: how to find and hold the
    layers: a transformers model loaded in host memory by default (the rest of it is then moved
    to `device` too); vLLM's model in its worker: moe_core/vllm_expert_cache.py."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device,
        resident_fraction: float,
        prefetch: bool = True,
        install: Install = _transformers_layers,
    ) -> None:
        if not 0 < resident_fraction <= 1:
            raise ValueError("resident_fraction must be in (0, 1]")
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.stats = CacheStats()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self.layers = install(self, model, resident_fraction)
        if not self.layers:
            raise ValueError(
                "the model has no MoE layer the expert cache can hold (a router beside an experts "
                "module on transformers' experts interface)"
            )
        for layer, after in zip(self.layers, self.layers[1:], strict=False):
            layer.next = after
        for number, layer in enumerate(self.layers):
            layer.number = number
        self.trace: RoutingTrace | None = None  # recording, or replaying (RoutingTrace)

    def reset_stats(self) -> None:
        """Count from zero: the cache's stats and each layer's share."""
        self.stats = CacheStats()
        for layer in self.layers:
            layer.needed = layer.hits = 0

    def follow(self, trace: RoutingTrace | None) -> None:
        """Record into `trace` (replaying False) or replay it from its start (True); None: the
        routers' own choices again."""
        self.trace = trace
        for layer in self.layers:
            layer.cursor = 0

    @property
    def slots(self) -> list[int]:
        return [layer.table.slots for layer in self.layers]

    def copy(self, layer: _CachedLayer, copies: list[tuple[int, int]]) -> None:
        """The (expert, slot) copies into `layer`'s slots: on CUDA on the copy stream, after the
        layer's last forward is done with them; its `ready` event marks their end."""
        if not copies:
            return
        self.stats.bytes_fetched += layer.expert_bytes * len(copies)
        layer.copied(copies)
        if self.stream is None:
            for expert, slot in copies:
                for name, host in layer.host.items():
                    layer.device[name][slot].copy_(host[expert])
            return
        assert layer.done is not None and layer.ready is not None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(layer.done)
            for expert, slot in copies:
                for name, host in layer.host.items():
                    layer.device[name][slot].copy_(host[expert], non_blocking=True)
            layer.ready.record(self.stream)


def moe_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(router, experts) of each MoE layer, in the model's order: a module's router child and its
    experts child (transformers' experts interface, weights with a row per expert)."""
    found = {id(r) for r in routers(model)}
    layers = []
    for module in model.modules():
        children = list(module.children())
        owned = [c for c in children if id(c) in found]
        experts = [c for c in children if hasattr(c, "has_gate") and hasattr(c, "is_concatenated")]
        if len(owned) == 1 and len(experts) == 1:
            layers.append((owned[0], experts[0]))
    return layers
