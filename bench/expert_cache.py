"""How often the expert cache finds what a router picks (moe_core/expert_cache.py), on routing that
is not random: the embedded model, trained, on held-out code and prose (issue 24).

    python -m bench.expert_cache [--model DIR] [--prompts 16] [--new-tokens 64] [--out cache.json]

unpacks the embedded model (moe_build/assets; or takes --model), reads held-out code and prose
(the training's split rule), and generates greedily at batch 1 (the case an offloaded model's
users wait on) from the first --prompt-tokens tokens of --prompts held-out documents of each kind,
through a cache of 1/8, 1/4, 1/2 and 3/4 of each layer's experts, with the next layer's experts
fetched ahead and without; then the same for the model's shape with random weights (routing
near uniform: the worst case for any cache). It prints, per run, the hit rate (needed experts
found resident), per layer, the share of prefetched experts that were then needed, and expert
copies per generated token per layer (the prompt's counted in), then what those copies cost per
token on the reference model (16 layers, experts of 3 × 2048 × 5632 bf16 = 69 MB) over the
H200's PCIe Gen5 (55.5 GB/s pinned host → device, measured) and an L40S's Gen4 (about half): the
transfer floor of a batch-1 step, against the 10 ms a step that 100 tokens/s leave. Runs on
the CPU (hit rates do not depend on the device); a few minutes on 2 cores.

    python -m bench.expert_cache --policies [--fractions 0.5]

instead replays the embedded model's recorded routing (record_routing, one token a step) through
the two policies of moe_core/expert_cache.py's SlotTable: `admit` (the torch engine's cache: a
miss is copied in before its forward) and `settle` (the cache in vLLM's layers: a miss is computed
where it is, and the counts, read `lag` steps late, copy in experts busier than a resident one),
then `device` (a cache that would decide on the GPU within the step: a miss moved into the slot
of a less busy resident expert, or read once without one) and `optimal` (the fewest misses any
cache of that size could have, knowing the routing in advance), the slots filled with the first
experts as vLLM's cache fills them. For each: the hit rate, copies per token per layer, and
transfers per token per layer (experts that crossed the link: every miss once, plus settle's
copies, which it makes on top of the misses' reads): at batch 1 the link's time per token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moe_build import packed, train
from moe_core.expert_cache import ExpertCache, RoutingTrace, SlotTable
from moe_core.loader import load_model
from moe_core.vllm_expert_cache import DEVICE_LOAD_DECAY, admit_on_device

ASSETS = Path(__file__).resolve().parent.parent / "moe_build" / "assets" / "localmoe-small"
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 3 / 4)
# --policies: (policy, lag) of policy_hit_rates, in the order printed
POLICIES = (("admit", 0), ("settle", 0), ("settle", 2), ("settle", 3), ("device", 0), ("optimal", 0))
REFERENCE_LAYERS, REFERENCE_EXPERT_BYTES = 16, 3 * 2048 * 5632 * 2
PCIE_GBPS = {"H200 (PCIe Gen5)": 55.5, "L40S (PCIe Gen4)": 27.7}


@dataclass
class Run:
    weights: str  # trained | random
    kind: str  # code | prose
    fraction: float
    prefetch: bool
    slots: int
    hit_rate: float
    layer_hit_rates: list[float]
    prefetch_accuracy: float | None  # prefetched experts that were then needed
    copies_per_token_layer: float  # experts copied in (needed or ahead) per generated token per MoE layer
    tokens: int  # generated

    def floor_ms(self, gbps: float) -> float:
        """Transfer time per token on the reference model at this many copies per layer."""
        return self.copies_per_token_layer * REFERENCE_LAYERS * REFERENCE_EXPERT_BYTES / (gbps * 1e9) * 1e3


def held_out_prompts(tokenizer: Any, n: int, prompt_tokens: int) -> dict[str, list[torch.Tensor]]:
    corpus = train.build_corpus(0, 2_000_000, train.HELD_OUT_SHARE, progress=False)
    out = {}
    for kind in (train.CODE, train.PROSE):
        rows = train.pack(tokenizer, corpus.texts["held_out"][kind], prompt_tokens)
        out[kind] = [r[None, :].long() for r in train.spread_rows(rows, n)]
    return out


def record_routing(
    model_dir: Path | None = None, n: int = 8, prompt_tokens: int = 64, new_tokens: int = 64
) -> dict[str, RoutingTrace]:
    """The embedded model's (trained) routing on `n` held-out documents of each kind, generating
    `new_tokens` greedily at batch 1 from their first `prompt_tokens`: kind → a RoutingTrace to
    replay on another model (bench/offload_gpu.py). model_dir: another trained checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir or packed.unpack(ASSETS, Path(tmp) / "model")
        model: Any
        model, tokenizer = load_model(model_dir, "cpu", "float32")
        prompts = held_out_prompts(tokenizer, n, prompt_tokens)
    cache = ExpertCache(model, "cpu", 1.0, prefetch=False)  # every expert resident: routing unchanged
    traces = {}
    with torch.inference_mode():
        for kind, rows in prompts.items():
            traces[kind] = RoutingTrace()
            cache.follow(traces[kind])
            for ids in rows:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
    cache.follow(None)
    return traces


def run(model_dir: Path, weights: str, kind: str, prompts: list[torch.Tensor], fraction: float,
        prefetch: bool, new_tokens: int) -> Run:  # fmt: skip
    model: Any = load_model(model_dir, "cpu", "float32")[0]
    if (
        weights == "random"
    ):  # the same shape as transformers initializes it (bench/model_quality.py's baseline)
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config).eval()
    cache = ExpertCache(model, "cpu", fraction, prefetch=prefetch)
    tokens = 0
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
            tokens += out.shape[1] - ids.shape[1]  # the prefill's copies are counted against these too
    s = cache.stats
    copies = s.bytes_fetched / cache.layers[0].expert_bytes
    return Run(
        weights, kind, fraction, prefetch, cache.slots[0], s.hit_rate,
        [layer.hits / max(layer.needed, 1) for layer in cache.layers],
        s.prefetch_hits / s.prefetched if s.prefetched else None,
        copies / tokens / len(cache.layers), tokens,
    )  # fmt: skip


def policy_hit_rates(
    trace: RoutingTrace, experts: int, slots: int, policy: str, lag: int = 0, decay: float = DEVICE_LOAD_DECAY
) -> tuple[float, float, float]:
    """`trace`'s rows one token a step through a cache of `slots` per recorded layer, its slots
    filled with experts 0..slots-1 (as vLLM's cache starts). policy "admit" (SlotTable.admit: each
    step's misses copied in before it runs); "settle" (SlotTable.settle: each step's counts
    settled `lag` steps later, 0: before the next; a miss is read where it is); "device"
    (device_admit: each miss moved into a slot or a scratch row as the step runs); "optimal"
    (optimal_misses: knowing the future). → (hit rate, copies into slots per token per layer,
    transfers per token per layer: the experts that crossed the link, every miss once, read in
    place or moved in, plus settle's copies, which come on top of the reads)."""
    needed_all = hits_all = copies = transfers = rows_all = 0
    for rows in (r for r in trace.chosen if r):
        rows_all += len(rows)
        if policy in ("device", "optimal"):
            if policy == "device":
                counted, found, moved = device_admit(rows, experts, slots, decay)
            else:
                counted, found, moved = optimal_misses(rows, experts, slots)
            needed_all, hits_all = needed_all + counted, hits_all + found
            copies, transfers = copies + moved, transfers + counted - found
            continue
        table = SlotTable(experts, slots)
        table.fill()
        pending: list[tuple[int, list[int], list[int]]] = []  # (due step, needed, tokens each)
        for step, row in enumerate(rows):
            while pending and pending[0][0] <= step:
                _, needed_then, tokens = pending.pop(0)
                settled = len(table.settle(needed_then, tokens))
                copies, transfers = copies + settled, transfers + settled
            needed = sorted(set(row))
            hits = sum(table.slot_of[e] >= 0 for e in needed)
            needed_all, hits_all = needed_all + len(needed), hits_all + hits
            transfers += len(needed) - hits
            if policy == "admit":
                copies += len(table.admit(needed))  # the misses' copies: their transfers, counted
            else:
                pending.append((step + 1 + lag, needed, [row.count(e) for e in needed]))
    per = max(rows_all, 1)
    return hits_all / max(needed_all, 1), copies / per, transfers / per


def device_admit(
    rows: list[list[int]], experts: int, slots: int, decay: float = DEVICE_LOAD_DECAY
) -> tuple[int, int, int]:
    """The vLLM cache's admission "device" (moe_core/vllm_expert_cache.py admit_on_device, the
    same function) on these rows, one forward each, the slots filled with experts 0..slots-1:
    each miss, the busiest first, takes the slot of a resident expert the forward does not need
    if its decayed load is above that one's, its one read over the link also its admission; the
    other misses are read without a slot. → (needed, hits, misses given a slot)."""
    slot_row = torch.full((experts,), -1, dtype=torch.int32)
    slot_row[:slots] = torch.arange(slots, dtype=torch.int32)
    load = torch.zeros(experts)
    pairs = min(slots, experts - slots)
    needed_all = hits_all = admitted = 0
    for row in rows:
        routed = torch.bincount(torch.tensor(row), minlength=experts).float()
        needed = routed > 0
        needed_all += int(needed.sum())
        hits_all += int((needed & (slot_row >= 0)).sum())
        if pairs:
            admitted += int((admit_on_device(load, routed, slot_row, pairs, decay) >= 0).sum())
    return needed_all, hits_all, admitted


def optimal_misses(rows: list[list[int]], experts: int, slots: int) -> tuple[int, int, int]:
    """The fewest misses any cache of `slots` could have on these rows, knowing them all in advance
    and keeping a miss in a slot for free (Belady's rule with bypass: a miss takes the slot of the
    resident expert not needed now whose next use is farthest, if its own next use is sooner;
    optimal for one-expert units). A bound, not a policy. → (needed, hits, misses given a slot)."""
    never = len(rows) + 1
    following = [never] * experts  # expert → the next step that needs it, after the current one
    upcoming: list[list[int]] = []  # per step, `following` as it stands after that step
    for row in reversed(rows):
        upcoming.append(list(following))
        for e in set(row):
            following[e] = len(rows) - len(upcoming)
    upcoming.reverse()
    resident = set(range(slots))
    needed_all = hits_all = admitted = 0
    for row, after in zip(rows, upcoming, strict=True):
        needed = set(row)
        hits = needed & resident
        needed_all, hits_all = needed_all + len(needed), hits_all + len(hits)
        for e in needed - hits:
            others = resident - needed
            far = max(others, key=lambda f: after[f], default=None)
            if far is not None and after[e] < after[far]:
                resident.remove(far)
                resident.add(e)
                admitted += 1
    return needed_all, hits_all, admitted


def policies(args: argparse.Namespace, fractions: list[float]) -> None:
    """--policies: the embedded model's recorded routing through admit and settle (lag 0, 2, 3)."""
    print("[1/1] recording the embedded model's routing on held-out code and prose", flush=True)
    traces = record_routing(args.model, args.prompts, args.prompt_tokens, args.new_tokens)
    config = json.loads(((args.model or ASSETS) / "config.json").read_text())
    experts = int(config["num_local_experts"])
    out = []
    print("| text | experts resident | policy | hit rate | copies/token/layer | transfers/token/layer |")
    print("|---|---|---|---|---|---|")
    for kind, trace in traces.items():
        for fraction in fractions:
            slots = max(1, int(fraction * experts))
            for policy, lag in POLICIES:
                decay = args.device_decay
                hit, copies, transfers = policy_hit_rates(trace, experts, slots, policy, lag, decay)
                name = f"settle, {lag} steps late" if policy == "settle" else policy
                figures = f"{hit:.1%} | {copies:.3f} | {transfers:.3f}"
                print(f"| {kind} | {slots} of {experts} | {name} | {figures} |", flush=True)
                out.append({"kind": kind, "slots": slots, "policy": policy, "lag": lag, "hit_rate": hit,
                            "copies_per_token_layer": copies,
                            "transfers_per_token_layer": transfers})  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a checkpoint (default: the embedded model, unpacked)")
    ap.add_argument("--prompts", type=int, default=16, help="held-out documents of each kind")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS), help="resident shares")
    ap.add_argument("--policies", action="store_true", help="the cache policies on recorded routing")
    ap.add_argument(
        "--device-decay",
        type=float,
        default=DEVICE_LOAD_DECAY,
        help="--policies: the device admission's load decay per forward (default: the cache's own)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.policies:
        policies(args, fractions)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or packed.unpack(ASSETS, Path(tmp) / "model")
        _, tokenizer = load_model(model_dir, "cpu", "float32")
        print("[1/2] reading held-out code and prose", flush=True)
        prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_tokens)
        grid = [
            (w, k, f, p)
            for w in ("trained", "random")
            for k in prompts
            for f in fractions
            for p in (True, False)
        ]
        print(f"[2/2] {len(grid)} runs of {args.prompts} prompts × {args.new_tokens} tokens", flush=True)
        runs: list[Run] = []
        for i, (weights, kind, fraction, prefetch) in enumerate(grid, 1):
            started = time.monotonic()
            r = run(model_dir, weights, kind, prompts[kind], fraction, prefetch, args.new_tokens)
            runs.append(r)
            ahead = f"{r.prefetch_accuracy:.0%}" if r.prefetch_accuracy is not None else "-"
            print(f"  [{i}/{len(grid)}] {weights:7s} {kind:5s} {r.slots} of each layer's experts, prefetch "
                  f"{'on ' if prefetch else 'off'}: hit rate {r.hit_rate:6.1%} (layers "
                  f"{' '.join(f'{h:.0%}' for h in r.layer_hit_rates)}), ahead used {ahead:>4s}, "
                  f"{r.copies_per_token_layer:.2f} copies/token/layer ({time.monotonic() - started:.0f} s)",
                  flush=True)  # fmt: skip
    print("\nthe transfer floor of a batch-1 token on the reference model (16 layers × 69 MB experts):")
    print("| weights | text | experts resident | prefetch | hit rate | copies/token/layer | "
          + " | ".join(f"ms/token, {name}" for name in PCIE_GBPS) + " |")  # fmt: skip
    print("|---|---|---|---|---|---|" + "---|" * len(PCIE_GBPS))
    for r in runs:
        floors = " | ".join(f"{r.floor_ms(g):.1f}" for g in PCIE_GBPS.values())
        print(f"| {r.weights} | {r.kind} | {r.fraction:.0%} | {'on' if r.prefetch else 'off'} | "
              f"{r.hit_rate:.1%} | {r.copies_per_token_layer:.2f} | {floors} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
