"""The expert cache (moe_core/expert_cache.py): its slot table's eviction and prefetch order, and
on real tiny checkpoints of every architecture, generate()'s greedy tokens with a cache of one
expert per layer and of half the experts, equal to the model with every expert in place.

The parity runs fill memory torch leaves uninitialized with NaN (torch's deterministic mode): a
read of a slot or of a row no expert wrote shows as NaN logits instead of passing by luck (the
first version passed half of the time that way).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_build.checkpoint import build_checkpoint
from moe_core.expert_cache import (
    ADMIT_MARGIN,
    PREFETCH_MIN_ACCURACY,
    ExpertCache,
    RoutingTrace,
    SlotTable,
    _CachedLayer,
    moe_layers,
)
from moe_core.expert_gather import SPARE_SLOTS, gather_experts, miss_rows, scratch_rows
from moe_core.loader import load_model
from tests.parity import ARCH_PARAMS, PROMPTS, reference_tokens

NEW = 10


def test_needed_experts_take_free_slots_then_the_least_recently_needed() -> None:
    table = SlotTable(experts=6, slots=3)
    assert table.admit([0, 1]) == [(0, 0), (1, 1)]
    assert table.admit([2]) == [(2, 2)]
    assert table.admit([1, 2]) == []  # resident: no copy
    assert table.admit([3]) == [(3, 0)]  # 0 was needed least recently
    assert table.slot_of[0] == -1 and table.holds == [3, 1, 2]
    assert table.admit([4, 1]) == [(4, 2)]  # 2 and 1 were needed together; 1 is needed now
    with pytest.raises(ValueError):
        table.admit([0, 1, 2, 5])  # more than the slots: the caller runs them in turns


def test_among_experts_needed_as_recently_the_least_loaded_goes() -> None:
    table = SlotTable(experts=4, slots=2)
    table.admit([0, 1], tokens=[9, 2])  # 0 took 9 tokens, 1 took 2
    assert table.admit([2]) == [(2, 1)]  # 1 goes, not 0
    table.admit([0, 2], tokens=[1, 9])
    assert table.admit([3]) == [(3, 0)]  # now 0 is the lighter one (8.1 decayed + 1 against 0.9 + 9)


def test_settle_admits_a_busier_expert_and_stops_experts_of_equal_load_trading_places() -> None:
    """vLLM's in-place layers: the experts a forward lacked ran where they are; settle copies in
    those busier than a resident expert by ADMIT_MARGIN, the busiest first."""
    table = SlotTable(experts=8, slots=2)
    assert table.settle([0, 1, 2], [1, 5, 3]) == [(1, 0), (2, 1)]  # free slots, busiest first
    assert table.settle([0], [1]) == []  # 0.9 + 1 against 2.7: not enough
    assert table.settle([0], [6]) == [(0, 1)]  # 1.71 + 6 against 2.43: 2, the lighter, goes
    assert table.slot_of[2] == -1 and table.holds == [1, 0]
    uniform = SlotTable(experts=8, slots=4)  # a large batch: every step needs every expert
    copies = [uniform.settle(list(range(8)), [16 + (e + step) % 3 for e in range(8)]) for step in range(50)]
    assert len(copies[0]) == 4 and not any(copies[1:])  # filled once, then no trades
    assert ADMIT_MARGIN > 1


def test_settle_copies_no_more_than_its_limit_the_busiest_first() -> None:
    """The gathering cache's bound (moe_core/expert_gather.py): slots between two experts are held
    to what its rows leave room for; the ones left out stay outside, to be settled later."""
    table = SlotTable(experts=8, slots=4)
    assert table.settle([0, 1, 2, 3, 4], [1, 9, 3, 7, 5], limit=2) == [(1, 0), (3, 1)]
    assert table.settle([4, 2], [5, 3], limit=0) == []
    assert table.slot_of[4] == table.slot_of[2] == -1
    assert table.settle([4, 2], [5, 3], limit=None) == [(4, 2), (2, 3)]


def test_the_policy_replay_counts_hits_and_the_lag_of_settled_copies() -> None:
    """bench/expert_cache.py --policies: one layer of 4 experts, 2 slots holding 0 and 1, routing
    that needs 2 and 3 at every step. Admitted, or settled before the next step, they miss once
    (8 of 10 hit, 2 copies in 5 steps); settled 2 steps late they miss three times. Admitted, a
    miss's copy is its one transfer; settled, a miss is read in place and copied in after: two."""
    from bench.expert_cache import policy_hit_rates

    trace = RoutingTrace(chosen=[[[2, 3]] * 5])
    assert policy_hit_rates(trace, 4, 2, "admit") == (0.8, 0.4, 0.4)
    assert policy_hit_rates(trace, 4, 2, "settle", lag=0) == (0.8, 0.4, 0.8)
    assert policy_hit_rates(trace, 4, 2, "settle", lag=2) == (0.4, 0.4, 1.6)
    assert policy_hit_rates(trace, 4, 2, "device") == (0.8, 0.4, 0.4)
    assert policy_hit_rates(trace, 4, 2, "optimal") == (0.8, 0.4, 0.4)


def test_the_optimal_bound_keeps_what_comes_back_first_and_the_device_policy_what_is_busiest() -> None:
    """One slot holding expert 0, then 1, 0, 0, 1, 0 (one expert a token). Knowing the future, the
    slot keeps 0 throughout (each 1 is needed later than the next 0): 3 of 5 hit, 2 transfers. The
    device policy lets a miss in when its decayed load tops the resident's, which here is every
    time: 1 of 5. And the bound is below every policy's misses on a real pattern (mixed rows)."""
    from bench.expert_cache import device_admit, optimal_misses, policy_hit_rates

    rows = [[1], [0], [0], [1], [0]]
    assert optimal_misses(rows, 3, 1) == (5, 3, 0)
    assert device_admit(rows, 3, 1) == (5, 1, 4)
    mixed = [[(i * 7) % 5, (i * 3 + 1) % 5] for i in range(40)]
    trace = RoutingTrace(chosen=[mixed])
    bound = policy_hit_rates(trace, 5, 2, "optimal")[2]
    for policy, lag in (("admit", 0), ("settle", 0), ("settle", 2), ("device", 0)):
        assert policy_hit_rates(trace, 5, 2, policy, lag)[2] >= bound, policy


def test_the_device_admits_a_busier_miss_into_the_slot_of_a_less_busy_expert_it_does_not_need() -> None:
    """admit_on_device (the vLLM cache's admission "device"): 6 experts, slots 0-2 holding 0, 1, 2.
    A forward needs 1, 3, 4 (3 and 4 outside): 4 is the busiest miss and takes the slot of the
    least busy resident expert not needed (2), 3 the next (0's); 1, needed, keeps its slot. A miss
    no busier than the spare resident stays out, and at most `pairs` are admitted."""
    from moe_core.vllm_expert_cache import DEVICE_LOAD_DECAY, admit_on_device

    slot_row = torch.tensor([0, 1, 2, -1, -1, -1], dtype=torch.int32)
    load = torch.tensor([3.0, 9.0, 1.0, 0.0, 0.0, 0.0])
    routed = torch.tensor([0.0, 1.0, 0.0, 4.0, 6.0, 0.0])
    decayed = load * DEVICE_LOAD_DECAY + routed  # decayed, then this forward's
    rows = admit_on_device(load, routed, slot_row, pairs=3)
    assert torch.allclose(load, decayed)
    assert rows.tolist() == [-1, -1, -1, 0, 2, -1]  # 4 → 2's slot (2), 3 → 0's slot (0)
    assert slot_row.tolist() == [-1, 1, -1, 0, 2, -1]

    # 5 is needed with a load below every spare resident's: read without a slot; 0 and 2 stay out
    rows = admit_on_device(load, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]), slot_row, pairs=3)
    assert rows.tolist() == [-1] * 6 and slot_row.tolist() == [-1, 1, -1, 0, 2, -1]

    # three busy misses, two pairs: the two busiest are admitted
    slot_row = torch.tensor([0, 1, -1, -1, -1], dtype=torch.int32)
    rows = admit_on_device(torch.zeros(5), torch.tensor([0.0, 0.0, 2.0, 5.0, 3.0]), slot_row, pairs=2)
    assert rows.tolist() == [-1, -1, -1, 0, 1] and slot_row.tolist() == [-1, -1, -1, 0, 1]


def test_each_missing_expert_gets_a_scratch_row_and_only_those_are_gathered() -> None:
    """The gather path's parts on the CPU (vLLM's CPU build uses them; on CUDA the same rows go to
    a Triton kernel, tested under its interpreter in tests/test_vllm_engine.py): the needed
    experts outside the slots, in expert order, rows 0, 1, ...; a row count that leaves every
    expert outside the slots a row and SPARE_SLOTS slots between two experts."""
    needed = torch.tensor([True, True, False, True, True, False])
    slot_row = torch.tensor([-1, 0, -1, -1, 1, -1], dtype=torch.int32)  # 1 and 4 resident
    rows = miss_rows(needed, slot_row)
    assert rows.dtype == torch.int32 and rows.tolist() == [0, -1, -1, 1, -1, -1]
    src = torch.arange(6 * 2 * 3, dtype=torch.float32).view(6, 2, 3)
    dst = torch.full((scratch_rows(6, 2), 2, 3), -7.0)
    gather_experts(src, dst, rows)
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], src[3])
    assert bool((dst[2:] == -7).all())  # rows no miss took: untouched
    assert scratch_rows(6, 2) == 6 and scratch_rows(8, 4) == 4 + SPARE_SLOTS and scratch_rows(8, 7) == 3


def test_prefetch_fills_free_and_cold_slots_and_keeps_what_it_predicts() -> None:
    table = SlotTable(experts=6, slots=3)
    table.admit([0, 1, 2])
    assert table.prefetch([2, 4, 5]) == [(4, 0), (5, 1)]  # 2 resident; 0 and 1 were colder
    assert table.ahead == {4, 5}
    assert table.prefetch([4, 5, 0, 1]) == [(0, 2)]  # as many as there are slots: not 1
    assert table.admit([4]) == []  # a prefetch hit: no longer ahead
    assert table.ahead == {5, 0}
    assert table.prefetch([3]) == [(3, 1)]  # 5, fetched ahead and never needed, goes first
    assert table.ahead == {0, 3}


def test_prefetch_waits_while_its_predictions_fail() -> None:
    """A wrong prediction evicts an expert the layer still uses: prefetch copies nothing while the
    predicted experts it would fetch (those not resident) are needed by the next forward less than
    half of the time, and resumes once they are again (scored whether or not they were fetched)."""
    table = SlotTable(experts=8, slots=2)
    for _ in range(10):
        table.prefetch([6, 7])
        table.admit([0, 1])  # never what was predicted
    assert table.accuracy < PREFETCH_MIN_ACCURACY
    assert table.prefetch([6, 7]) == []  # not fetched
    table.admit([0, 1])
    for i in range(10):
        pair = [2, 3] if i % 2 else [4, 5]
        table.prefetch(pair)
        table.admit(pair)  # what was predicted, fetched on demand meanwhile
    assert table.accuracy >= PREFETCH_MIN_ACCURACY
    assert table.prefetch([6, 7]) == [(6, 0), (7, 1)]
    table.admit([0, 6])
    table.prefetch([6, 1])  # 6 resident: only 1 is scored, and only once it is needed or not
    assert table.predicted == {1}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("ckpt")


@pytest.fixture
def uninitialized_is_nan() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]  # type: ignore[attr-defined]


@pytest.mark.parametrize("arch", ARCH_PARAMS)
@pytest.mark.usefixtures("uninitialized_is_nan")
def test_greedy_tokens_with_the_cache_are_the_models(arch: str, checkpoints: Path) -> None:
    model_dir = build_checkpoint(checkpoints / arch, arch=arch, progress=False)
    model, tokenizer = load_model(model_dir, "cpu", "float32")
    prompts = PROMPTS[:4]
    expected = [reference_tokens(model, tokenizer, p, NEW) for p in prompts]
    layers = len(moe_layers(model))
    experts = int(moe_layers(model)[0][0].weight.shape[0])  # type: ignore[index, union-attr]
    for fraction, slots in ((1 / experts, 1), (0.5, experts // 2)):
        cached, _ = load_model(model_dir, "cpu", "float32")
        cache = ExpertCache(cached, "cpu", fraction)
        assert cache.slots == [slots] * layers
        assert [reference_tokens(cached, tokenizer, p, NEW) for p in prompts] == expected
        stats = cache.stats
        assert 0 < stats.hits < stats.needed  # some experts were resident, some were not
        assert 0 <= stats.prefetch_hits <= stats.prefetched
        expert_bytes = cache.layers[0].expert_bytes
        assert stats.bytes_fetched % expert_bytes == 0 and stats.bytes_fetched >= expert_bytes * (
            stats.needed - stats.hits
        )


def test_every_expert_resident_fetches_each_once(checkpoints: Path) -> None:
    model_dir = build_checkpoint(checkpoints / "full", arch="mixtral", progress=False)
    model, tokenizer = load_model(model_dir, "cpu", "float32")
    cache = ExpertCache(model, "cpu", 1.0)
    for prompt in PROMPTS:
        reference_tokens(model, tokenizer, prompt, NEW)
    copies = cache.stats.bytes_fetched // cache.layers[0].expert_bytes
    experts = cache.layers[0].num_experts
    assert copies <= experts * len(cache.layers)  # each expert of each layer fetched at most once
    assert cache.stats.needed - cache.stats.hits <= copies


def test_a_model_without_moe_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="no MoE layer"):
        ExpertCache(torch.nn.Sequential(torch.nn.Linear(4, 4)), "cpu", 0.5)


@pytest.mark.usefixtures("uninitialized_is_nan")
def test_the_torch_engine_batches_through_the_cache(checkpoints: Path) -> None:
    """The engine's continuous batching (left-padded prefills, a KV cache, rows joining mid-way)
    through a cache of 2 of 8 experts per layer: the tokens of the engine with every expert in
    place, each prompt in a batch with the others."""
    from moe_core.engine import EngineStats, GenerationRequest, SamplingParams
    from moe_core.torch_engine import TorchEngine

    model_dir = build_checkpoint(checkpoints / "engine", arch="mixtral", progress=False)

    def run(engine: TorchEngine) -> tuple[dict[str, list[int]], EngineStats]:
        engine.load()
        try:
            tokens: dict[str, list[int]] = {}
            for i, prompt in enumerate(PROMPTS):
                engine.add_request(GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=NEW)))
                if i % 3 == 2:  # some join a running batch
                    for delta in engine.step():
                        tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            while engine.has_unfinished():
                for delta in engine.step():
                    tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            return tokens, engine.stats()
        finally:
            engine.close()

    plain, none = run(TorchEngine(model_dir, device="cpu", dtype="float32", max_batch_size=4))
    cached, stats = run(
        TorchEngine(model_dir, device="cpu", dtype="float32", max_batch_size=4, expert_cache=0.25)
    )
    assert cached == plain
    assert stats.expert_cache_needed > stats.expert_cache_hits > 0 and stats.expert_cache_fetched_bytes > 0
    assert (none.expert_cache_needed, none.expert_cache_fetched_bytes) == (0, 0)


def test_a_recorded_routing_replays_to_the_same_fetches(checkpoints: Path) -> None:
    """RoutingTrace (bench/offload_gpu.py replays a trained model's routing on the reference
    model): recorded while a model generates, replayed in a fresh cache of the same model through
    forwards of the same sizes, it makes exactly the recorded run's needs, hits, prefetches and
    copies (though that model's tokens differ: its weights meet other ids); each layer's rows
    are [k] ids per token, its predictions the next layer's. The routers' own choices again
    after, other counts."""
    model_dir = build_checkpoint(checkpoints / "trace", arch="mixtral", progress=False)
    model, tokenizer = load_model(model_dir, "cpu", "float32")

    def generate(m: torch.nn.Module, prompt: str) -> None:  # NEW tokens whatever comes: same forwards
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,  # type: ignore[operator]
                       do_sample=False)  # fmt: skip

    cache = ExpertCache(model, "cpu", 0.25)
    trace = RoutingTrace()
    cache.follow(trace)
    for prompt in PROMPTS[:3]:
        generate(model, prompt)
    recorded = cache.stats
    layers = len(cache.layers)
    tokens = len(trace.chosen[0])
    assert [len(rows) for rows in trace.chosen[:layers]] == [tokens] * layers
    assert [len(rows) for rows in trace.predicted[:layers]] == [0] + [tokens] * (layers - 1)
    assert all(len(row) == 2 for row in trace.chosen[0])  # top-2
    other, _ = load_model(model_dir, "cpu", "float32")
    replay = ExpertCache(other, "cpu", 0.25)
    replay.follow(RoutingTrace(trace.chosen, trace.predicted, replaying=True))
    torch.nn.init.normal_(other.model.layers[0].mlp.gate.weight)  # its own router: not what decides
    for prompt in PROMPTS[:3]:
        generate(other, prompt)
    assert replay.stats == recorded
    replay.follow(None)
    for prompt in PROMPTS[:3]:
        generate(other, prompt)
    assert replay.stats.needed - recorded.needed != recorded.needed


def test_a_replayed_routing_wraps_layers_and_experts() -> None:
    """Replayed on a model with more layers than the trace: layer n takes recorded layer n mod L,
    each forward the next rows (cycling), ids mod the model's experts; a layer whose recorded
    predictions are missing (the first) gives no guess."""
    trace = RoutingTrace([[[0, 1], [2, 3]], [[9, 4]]], [[], [[5, 6], [7, 0]]], replaying=True)
    cache = object.__new__(ExpertCache)
    layers = [object.__new__(_CachedLayer) for _ in range(3)]
    for number, layer in enumerate(layers):
        layer.number, layer.cursor, layer.num_experts = number, 0, 8
        layer.next = layers[number + 1] if number + 1 < len(layers) else None
    cache.layers = layers
    like = torch.zeros(3, 2, dtype=torch.int32)
    chosen, guess = trace.replay(layers[0], like)
    assert chosen.tolist() == [[0, 1], [2, 3], [0, 1]] and chosen.dtype == torch.int32
    assert guess is not None and guess.tolist() == [[5, 6], [7, 0], [5, 6]]
    chosen, guess = trace.replay(layers[1], like[:1])
    assert chosen.tolist() == [[1, 4]] and guess is None  # 9 mod 8; layer 2 is recorded layer 0
    chosen, _ = trace.replay(layers[0], like[:1])  # the cursor went on: the 4th token, row 1
    assert chosen.tolist() == [[2, 3]]
    chosen, guess = trace.replay(layers[2], like[:1])
    assert chosen.tolist() == [[0, 1]] and guess is None  # the last layer predicts nothing
    rows = trace.rows(layers[0], 2)  # the ids alone, as vLLM's cache stages them: tokens 5 and 6
    assert rows.tolist() == [[0, 1], [2, 3]] and rows.dtype == np.int32 and layers[0].cursor == 6
    trace.chosen[0].append([7, 15])  # recorded on: the layer's rows are taken afresh
    assert trace.rows(layers[0], 1).tolist() == [[0, 1]]  # token 7 of 3 rows: row 0
    assert trace.rows(layers[0], 2).tolist() == [[2, 3], [7, 7]]  # 15 mod 8


def test_pinned_turns_hand_out_buffers_in_turn_and_grow() -> None:
    """moe_core/pinned.py on the CPU (one plain buffer: copies from it are done when they return):
    a take is a view of the buffer's first rows, the capacity grows to the largest take (at least
    doubling), what a grown buffer hands out is writable at its new size, and send copies rows
    through it into a tensor."""
    from moe_core.pinned import PinnedTurns

    turns = PinnedTurns((4,), torch.int32, cuda=False)
    first = turns.take(3)
    assert first.shape == (3, 4) and turns.capacity == 3 and turns.turns == 1
    first.fill_(7)
    again = turns.take(2)
    assert again.data_ptr() == first.data_ptr() and again.tolist() == [[7] * 4] * 2  # the same memory
    grown = turns.take(5)
    assert turns.capacity == 6 and grown.shape == (5, 4)
    grown.numpy()[:] = np.arange(20).reshape(5, 4)
    assert turns.take(5)[4].tolist() == [16, 17, 18, 19]
    assert PinnedTurns((), torch.int32, cuda=False).take(4).shape == (4,)
    assert PinnedTurns((3,), torch.int32, cuda=False).take(0).shape == (0, 3)  # nothing, yet a view
    out = torch.zeros((2, 4), dtype=torch.int32)
    assert turns.send(np.full((2, 4), 3), out) is out and out.tolist() == [[3] * 4] * 2  # by way of a buffer
