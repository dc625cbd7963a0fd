"""The gain of `localmoe tune-moe` on the GPU: LocalMoE's vLLM engine with vLLM's default fused-MoE
kernel configs against the same engine with tuned ones, on the reference model, in one run.

On the GPU machine (vLLM installed):

    python -m bench.moe_tuning_gpu --model ref-model --work /tmp/moe-tune [--batch-sizes 1,2,4,...]

builds the reference bf16 Mixtral (`localmoe model init --size reference`) unless present, then
1. `tune`: runs `localmoe tune-moe` into <work>/tuned (a copy of the file lands in
   <work>/tuned-configs.json: the file's own name holds "=" and ",");
2. `compare`: in one child process, two vLLM engines built as a worker builds them, each with
   `gpu_memory_utilization` 0.4: one whose VLLM_TUNED_CONFIG_FOLDER is an empty folder (vLLM's
   defaults), one pointed at <work>/tuned. Each round runs batch-1 decode, 1 × (128 → 256), on
   both (alternating which goes first), and every other round 256 × (512 → 256). Prints tokens/s
   per round, the median of the per-round ratios (goal: batch-1 ≥ 1.2×), the tuner's kernel-level
   speedups, and which config each engine core said it used.
--steps runs one of them (results are kept in the work folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STEPS = ("tune", "compare")


def _engine(model: Path, folder: Path) -> Any:
    """The vLLM engine as a worker builds it; its engine core reads `folder` for MoE configs."""
    from bench.engines_gpu import make_engine
    from moe_core.moe_configs import ENV_FOLDER

    engine = make_engine("vllm", model, 256, gpu_share=0.4, tuned_config_dir=folder)
    os.environ[ENV_FOLDER] = str(folder)  # the engine only sets it when unset: one folder per process
    t = time.perf_counter()
    engine.load()
    print(f"  loaded in {time.perf_counter() - t:.1f} s; tuned config: {engine.moe_config}", flush=True)
    return engine


def compare(model: Path, work: Path, rounds: int) -> dict[str, Any]:
    from bench.engines_gpu import make_prompts, run_protocol

    empty = work / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    engines = {"default": _engine(model, empty), "tuned": _engine(model, work / "tuned")}
    assert engines["tuned"].moe_config is not None, "no tuned config for this model: run the tune step"
    one, many = make_prompts(model, 1, 128), make_prompts(model, 256, 512)
    for e in engines.values():  # compile / CUDA-graph shapes warm
        run_protocol(e, one, 256)
        run_protocol(e, many, 256)
    b1: dict[str, list[float]] = {"default": [], "tuned": []}
    b256: dict[str, list[float]] = {"default": [], "tuned": []}
    for r in range(rounds):
        order = ("default", "tuned") if r % 2 == 0 else ("tuned", "default")
        for name in order:
            b1[name].append(run_protocol(engines[name], one, 256)[0])
        if r % 2 == 0:
            for name in order:
                b256[name].append(run_protocol(engines[name], many, 256)[0])
        print(
            f"  round {r + 1}: batch 1 default {b1['default'][-1]:.1f} tuned {b1['tuned'][-1]:.1f} tok/s"
            + (
                f"; 256 x 512->256 default {b256['default'][-1]:.0f} tuned {b256['tuned'][-1]:.0f}"
                if r % 2 == 0
                else ""
            ),
            flush=True,
        )
    for e in engines.values():
        e.close()

    def ratios(d: dict[str, list[float]]) -> list[float]:
        return [t / x for t, x in zip(d["tuned"], d["default"], strict=True)]

    return {
        "b1": b1,
        "b256": b256,
        "b1_ratio_median": statistics.median(ratios(b1)),
        "b256_ratio_median": statistics.median(ratios(b256)),
    }


def child(step: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one step in a child process, its output passed through; the result by file."""
    work: Path = args.work
    out = work / f"{step}.json"
    if step == "tune":
        cmd = [sys.executable, "-m", "localmoe", "tune-moe", "--model-dir", str(args.model), "--out"]
        cmd += [str(work / "tuned"), "--batch-sizes", args.batch_sizes, "--max-rounds", str(args.max_rounds)]
        if args.time_budget_s:
            cmd += ["--time-budget-s", str(args.time_budget_s)]
    else:
        cmd = [sys.executable, "-m", "bench.moe_tuning_gpu", "--model", str(args.model), "--work", str(work)]
        cmd += ["--rounds", str(args.rounds), "--_compare", str(out)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if (
            "MoE config" in line
            or line.startswith(("  ", "[", "tuning", "{", "time budget"))
            or "Error" in line
        ):
            print(f"[{step}] {line.rstrip()}", flush=True)
        if "Using configuration from" in line or "Using default MoE config" in line:
            seen.append(line.split("] ", 1)[-1].strip()[:160])
        if step == "tune" and line.startswith("{"):
            out.write_text(line)
    if proc.wait() != 0:
        raise SystemExit(f"step {step} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    result["vllm_said"] = seen
    result["seconds"] = round(time.perf_counter() - t, 1)
    out.write_text(json.dumps(result))
    if step == "tune":
        shutil.copy(result["file"], work / "tuned-configs.json")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="tuned configs and step results go here")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--max-rounds", type=int, default=2)
    ap.add_argument("--time-budget-s", type=float)
    ap.add_argument("--rounds", type=int, default=8, help="compare: rounds of batch-1 runs on both engines")
    ap.add_argument("--_compare", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._compare:
        args._compare.write_text(json.dumps(compare(args.model, args.work, args.rounds)))
        return
    from moe_build.checkpoint import build_checkpoint, is_checkpoint

    if not is_checkpoint(args.model):
        print(f"[build] the 4.76 B reference Mixtral in {args.model}", flush=True)
        build_checkpoint(args.model, size="reference", vocab_size=32000, progress=True)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    for step in args.steps.split(","):
        print(f"== {step}", flush=True)
        print(json.dumps(child(step, args)), flush=True)
    done = args.work / "compare.json"
    if done.exists():
        c = json.loads(done.read_text())
        print(f"batch-1 decode, tuned ÷ default (median of rounds): {c['b1_ratio_median']:.3f} (goal ≥ 1.2)")
        print(f"256 x (512 -> 256), tuned ÷ default: {c['b256_ratio_median']:.3f}")


if __name__ == "__main__":
    main()
