"""The gain of `localmoe tune-moe` on the GPU: LocalMoE's vLLM engine with vLLM's default fused-MoE
kernel configs, then tuned ones, on the reference model, in one run.

On the GPU machine (vLLM installed):

    python -m bench.moe_tuning_gpu --model /tmp/ref --work /tmp/moe-tune [--batch-sizes 1,2,4,...]

builds the reference bf16 Mixtral (shared/gpu/README.md) unless present, then in three child
processes (so vLLM's config lookup starts clean each time): (1) the vLLM engine, as a worker
builds it, pointed at an empty config folder: batch-1 decode 1 × (128 → 256) repeated --repeats
times, and 256 × (512 → 256); (2) `localmoe tune-moe` into the work folder; (3) the engine again,
pointed at the tuned configs. Prints tokens/s of each, their ratios (goal: batch-1 ≥ 1.2×), the
tuner's kernel-level speedups, and which config vLLM's engine core said it used.
--steps runs a subset (e.g. `default`, then `tune,tuned`), results kept in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("default", "tune", "tuned")


def measure(model: Path, tuned_dir: Path, repeats: int) -> dict[str, object]:
    """In this process: the vLLM engine through the engine protocol, as a worker builds it."""
    from bench.engines_gpu import make_prompts, run_protocol
    from localmoe.settings import EngineSettings
    from workers.engine_setup import construct

    cfg = EngineSettings(backend="vllm", dtype="bfloat16", max_batch_size=256)
    cfg.vllm.gpu_memory_utilization, cfg.vllm.tuned_config_dir = 0.8, tuned_dir
    engine = construct("vllm", model, "cuda", cfg, offload=False)
    t = time.perf_counter()
    engine.load()
    print(f"  loaded in {time.perf_counter() - t:.1f} s; tuned config: {engine.moe_config}", flush=True)  # type: ignore[attr-defined]
    one = make_prompts(model, 1, 128)
    run_protocol(engine, one, 256)  # compile / graph shapes warm
    b1 = [run_protocol(engine, one, 256)[0] for _ in range(repeats)]
    print(f"  batch 1: {' '.join(f'{x:.1f}' for x in b1)} tok/s", flush=True)
    many = make_prompts(model, 256, 512)
    run_protocol(engine, many, 256)
    b256 = [run_protocol(engine, many, 256)[0] for _ in range(2)]
    print(f"  256 x (512 -> 256): {' '.join(f'{x:.0f}' for x in b256)} tok/s", flush=True)
    engine.close()
    return {
        "moe_config": str(engine.moe_config) if engine.moe_config else None,  # type: ignore[attr-defined]
        "b1_tok_s": b1,
        "b1_median": statistics.median(b1),
        "b256_tok_s": b256,
        "b256_median": statistics.median(b256),
    }


def child(step: str, args: argparse.Namespace) -> dict[str, object]:
    """Run one step in a child process; its output goes through, prefixed; results by file."""
    work: Path = args.work
    out = work / f"{step}.json"
    if step == "tune":
        cmd = [sys.executable, "-m", "localmoe", "tune-moe", "--model-dir", str(args.model), "--out"]
        cmd += [str(work / "tuned"), "--batch-sizes", args.batch_sizes, "--max-rounds", str(args.max_rounds)]
        if args.time_budget_s:
            cmd += ["--time-budget-s", str(args.time_budget_s)]
    else:
        folder = work / ("tuned" if step == "tuned" else "empty")
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.moe_tuning_gpu", "--model", str(args.model), "--work", str(work)]
        cmd += ["--repeats", str(args.repeats), "--_measure", str(folder), "--_out", str(out)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if "MoE" in line or line.startswith(("  ", "[", "tuning", "{", "time budget")) or "Error" in line:
            print(f"[{step}] {line.rstrip()}", flush=True)
        if "Using configuration from" in line or "Using default MoE config" in line:
            seen.append(line.split("] ", 1)[-1].strip()[:200])
        if step == "tune" and line.startswith("{"):
            out.write_text(line)
    if proc.wait() != 0:
        raise SystemExit(f"step {step} failed ({proc.returncode})")
    result = json.loads(out.read_text())
    result["vllm_said"] = seen[:2]
    result["seconds"] = round(time.perf_counter() - t, 1)
    out.write_text(json.dumps(result))
    return dict(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="tuned configs and step results go here")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--max-rounds", type=int, default=2)
    ap.add_argument("--time-budget-s", type=float)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--_measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        args._out.write_text(json.dumps(measure(args.model, args._measure, args.repeats)))
        return
    from moe_core.checkpoint import build_checkpoint, is_checkpoint

    if not is_checkpoint(args.model):
        print(f"[build] the 4.76 B reference Mixtral in {args.model}", flush=True)
        build_checkpoint(args.model, size="reference", vocab_size=32000, progress=True)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    for step in args.steps.split(","):
        print(f"== {step}", flush=True)
        print(json.dumps(child(step, args)), flush=True)
    results = {
        s: json.loads((args.work / f"{s}.json").read_text())
        for s in STEPS
        if (args.work / f"{s}.json").exists()
    }
    if "default" in results and "tuned" in results:
        d, t = results["default"], results["tuned"]
        print(f"batch-1 decode, tuned ÷ default: {t['b1_median'] / d['b1_median']:.3f} (goal ≥ 1.2)")
        print(f"256 x (512 -> 256), tuned ÷ default: {t['b256_median'] / d['b256_median']:.3f}")


if __name__ == "__main__":
    main()
