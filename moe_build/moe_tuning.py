"""Fused-MoE kernel tuning for vLLM: search Triton tile configurations for the served model's
expert shape on this GPU, and write them where vLLM reads them.

vLLM runs a model's routed experts as two grouped GEMMs of one Triton kernel (`fused_moe_kernel`):
hidden [M, K] x w1 [E, 2N, K] (gate and up), the activation, then x w2 [E, K, N], where M is the
number of tokens in the step, K the hidden size, E the experts held by this GPU and N the expert
intermediate size held by this GPU (intermediate / tensor_parallel_size; the whole of it with
expert parallelism). Its tile sizes come from a JSON file named after the shape and the GPU,
`E=<E>,N=<N>,device_name=<GPU>[,dtype=...].json`, that maps batch sizes M to configurations; for
a step of M tokens vLLM takes the entry whose M is nearest. It looks in the folder named by
VLLM_TUNED_CONFIG_FOLDER first, then in the files it ships; for most shapes there is none, and it
falls back to `get_default_config(M)` ("Using default MoE config").

The search, per batch size M: coordinate descent over SPACE (one key at a time, every value of
that key measured, the best kept; rounds until nothing improves by MIN_GAIN) from two starts:
vLLM's default config for M and the best config of the previous M. Candidates that cannot help
are pruned (tiles taller than the tokens one expert can receive, grouping with one tile per
expert). A candidate is timed by replaying a CUDA graph of GRAPH_CALLS calls of vLLM's own
`fused_experts` with the configuration forced, on random weights of the model's shape and a
fixed random top-k routing. The default config is always measured, so what is written is never
slower than vLLM's default by more than the timer's noise. Batch sizes not searched are written
with vLLM's default config, so the file changes nothing there.

The search itself (`descend`, `tune`) is plain Python over a `measure(config) -> seconds`
callable; only `KernelTimer` needs CUDA and vLLM.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_core.moe_configs import MoeShape, config_file_name, vllm_dtype_selector

Config = dict[str, int]

# Tile parameters of vLLM's fused_moe_kernel and the values searched.
SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_SIZE_M": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_N": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_K": (32, 64, 128, 256),
    "GROUP_SIZE_M": (1, 16, 32, 64),
    "num_warps": (2, 4, 8),
    "num_stages": (2, 3, 4, 5),
}
# vLLM's tuner's grid of batch sizes (tokens per step); a file covers all of them.
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
MIN_GAIN = 0.01  # a candidate replaces the best only when at least 1 % faster (timer noise)
GRAPH_CALLS = 10  # fused_experts calls per CUDA graph


# --------------------------------------------------------------------------------------------------
# The search: plain Python over measure(config) -> seconds (math.inf: the config does not run)
# --------------------------------------------------------------------------------------------------


def _key(config: Config) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(config.items()))


class Memo:
    """measure() with every configuration timed once; counts what was timed."""

    def __init__(self, measure: Callable[[Config], float]) -> None:
        self._measure = measure
        self.times: dict[tuple[tuple[str, int], ...], float] = {}

    def __call__(self, config: Config) -> float:
        key = _key(config)
        if key not in self.times:
            self.times[key] = self._measure(config)
        return self.times[key]


def candidates(
    m: int, shape: MoeShape, space: dict[str, tuple[int, ...]] = SPACE
) -> dict[str, tuple[int, ...]]:
    """The values worth timing for M tokens: no tile taller than the most rows one expert can get
    (M * top_k, at least 16), no grouping when no expert gets more than one tile of rows."""
    rows = max(16, 1 << math.ceil(math.log2(max(1, m * shape.top_k))))
    pruned = dict(space)
    pruned["BLOCK_SIZE_M"] = tuple(v for v in space["BLOCK_SIZE_M"] if v <= rows) or (
        min(space["BLOCK_SIZE_M"]),
    )
    per_expert = m * shape.top_k / shape.experts
    if per_expert <= min(space["BLOCK_SIZE_M"]):
        pruned["GROUP_SIZE_M"] = (1,)
    return pruned


def descend(
    measure: Callable[[Config], float],
    start: Config,
    space: dict[str, tuple[int, ...]],
    max_rounds: int = 3,
) -> tuple[Config, float]:
    """Coordinate descent from `start`: per key, time every value with the others fixed and keep
    the fastest when it beats the best so far by MIN_GAIN; stop after a round without a change."""
    best = dict(start)
    best_t = measure(best)
    for _ in range(max_rounds):
        changed = False
        for key, values in space.items():
            for value in values:
                if value == best.get(key):
                    continue
                candidate = {**best, key: value}
                t = measure(candidate)
                if t < best_t * (1 - MIN_GAIN):
                    best, best_t, changed = candidate, t, True
        if not changed:
            break
    return best, best_t


@dataclass
class Tuned:
    """One batch size's result: vLLM's default and the chosen config, with their kernel times."""

    m: int
    default: Config
    default_s: float
    best: Config
    best_s: float
    timed: int  # configurations timed for this M (new ones; earlier Ms' are reused)

    @property
    def speedup(self) -> float:
        return self.default_s / self.best_s if self.best_s > 0 else 1.0


@dataclass
class TuneResult:
    shape: MoeShape
    configs: dict[int, Config]  # every M of the file: searched, or vLLM's default
    tuned: list[Tuned] = field(default_factory=list)
    seconds: float = 0.0


def tune(
    shape: MoeShape,
    batch_sizes: Iterable[int],
    *,
    default_config: Callable[[int], Config],
    measure_for: Callable[[int], Callable[[Config], float]],
    file_batch_sizes: Iterable[int] = BATCH_SIZES,
    space: dict[str, tuple[int, ...]] = SPACE,
    max_rounds: int = 3,
    time_budget_s: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search `batch_sizes` in increasing order; every M of `file_batch_sizes` not searched (or
    not reached within time_budget_s) keeps vLLM's default. default_config(M): vLLM's config for
    M without a file; measure_for(M): a timer for M tokens."""
    started = time.monotonic()
    searched = sorted(set(batch_sizes))
    result = TuneResult(
        shape, {m: _searchable(default_config(m)) for m in sorted(set(file_batch_sizes) | set(searched))}
    )
    previous: Config | None = None
    for i, m in enumerate(searched):
        if time_budget_s is not None and time.monotonic() - started >= time_budget_s:
            if progress:
                progress(f"time budget of {time_budget_s:.0f}s spent: M >= {m} keep vLLM's default")
            break
        memo = Memo(measure_for(m))
        space_m = candidates(m, shape, space)
        default = _searchable(default_config(m))
        default_s = memo(default)
        if not math.isfinite(default_s):
            raise RuntimeError(f"vLLM's default config does not run for M={m}: {default}")
        best, best_s = descend(memo, default, space_m, max_rounds)
        if previous is not None and _fits(previous, space_m):
            other, other_s = descend(memo, previous, space_m, max_rounds)
            if other_s < best_s:
                best, best_s = other, other_s
        result.configs[m] = best
        result.tuned.append(Tuned(m, default, default_s, best, best_s, len(memo.times)))
        previous = best
        if progress:
            progress(
                f"[{i + 1}/{len(searched)}] M={m}: default {default_s * 1e6:.1f} us -> {best_s * 1e6:.1f} us "
                f"({default_s / best_s:.2f}x, {len(memo.times)} configs timed, "
                f"{time.monotonic() - started:.0f}s) {best}"
            )
    result.seconds = time.monotonic() - started
    return result


def _searchable(config: Config) -> Config:
    """A config as the search sees it: the SPACE keys only (vLLM sets SPLIT_K itself)."""
    return {k: int(config[k]) for k in SPACE if k in config}


def _fits(config: Config, space: dict[str, tuple[int, ...]]) -> bool:
    return all(config.get(k) in values for k, values in space.items())


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def write_configs(
    folder: Path, name: str, configs: dict[int, Config], triton_version: str | None = None
) -> Path:
    """Write {M: config} as vLLM reads it (keys are strings; vLLM drops "triton_version"); atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {"triton_version": triton_version} if triton_version else {}
    body.update({str(m): configs[m] for m in sorted(configs)})
    path = folder / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_configs(path: Path) -> dict[int, Config]:
    body = json.loads(path.read_text(encoding="utf-8"))
    body.pop("triton_version", None)
    return {int(m): c for m, c in body.items()}


# --------------------------------------------------------------------------------------------------
# The GPU timer (CUDA + vLLM)
# --------------------------------------------------------------------------------------------------


class KernelTimer:
    """Times vLLM's fused_experts for one shape on random weights, CUDA graphs replayed."""

    def __init__(self, shape: MoeShape, *, seed: int = 0, replays: int = 20) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("fused-MoE tuning needs a CUDA GPU")
        self.torch = torch
        self.shape = shape
        self.replays = replays
        dtype = getattr(torch, shape.dtype)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        e, n, k = shape.experts, shape.intermediate, shape.hidden
        self.w1 = torch.randn(e, 2 * n, k, device="cuda", dtype=dtype, generator=gen) / math.sqrt(k)
        self.w2 = torch.randn(e, k, n, device="cuda", dtype=dtype, generator=gen) / math.sqrt(n)
        self.seed = seed
        self.failures: list[str] = []  # configs that did not run, and why

    def default_config(self, m: int) -> Config:
        from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config

        s = self.shape
        return dict(
            get_default_config(m, s.experts, s.intermediate, s.hidden, s.top_k, vllm_dtype_selector(s))
        )

    def measure_for(self, m: int) -> Callable[[Config], float]:
        torch = self.torch
        s = self.shape
        gen = torch.Generator(device="cuda").manual_seed(self.seed + m)
        x = torch.randn(m, s.hidden, device="cuda", dtype=self.w1.dtype, generator=gen)
        logits = torch.randn(m, s.experts, device="cuda", dtype=torch.float32, generator=gen)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), s.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        ids = ids.to(torch.int32)

        def measure(config: Config) -> float:
            return self._time(config, x, weights, ids)

        return measure

    def _time(self, config: Config, x: Any, weights: Any, ids: Any) -> float:
        torch = self.torch
        from vllm.model_executor.layers.fused_moe import override_config
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

        full = {**config, "SPLIT_K": 1}

        def run() -> None:
            with override_config(full):
                fused_experts(x, self.w1, self.w2, weights, ids)

        try:
            run()  # compiles this config (Triton caches it for every later M)
            torch.cuda.synchronize()
        except Exception as e:  # OutOfResources (shared memory), a tile combination Triton refuses
            self.failures.append(f"{config}: {type(e).__name__}: {str(e)[:200]}")
            return math.inf
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                run()
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / GRAPH_CALLS)
        graph.reset()
        times.sort()
        return float(times[len(times) // 2])


def tune_on_gpu(
    shape: MoeShape,
    batch_sizes: Iterable[int],
    out_dir: Path,
    *,
    max_rounds: int = 3,
    time_budget_s: float | None = None,
    progress: Callable[[str], None] | None = print,
) -> tuple[Path, TuneResult]:
    """Search on this machine's GPU 0 and write the file vLLM will read from `out_dir`."""
    import triton

    timer = KernelTimer(shape)
    try:
        result = tune(
            shape,
            batch_sizes,
            default_config=timer.default_config,
            measure_for=timer.measure_for,
            max_rounds=max_rounds,
            time_budget_s=time_budget_s,
            progress=progress,
        )
    except RuntimeError as e:
        last = timer.failures[-1] if timer.failures else "no failure recorded"
        raise RuntimeError(f"{e} (last failure: {last})") from e
    path = write_configs(out_dir, config_file_name(shape), result.configs, triton.__version__)
    return path, result
