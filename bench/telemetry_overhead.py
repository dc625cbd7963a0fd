"""What expert telemetry costs: an engine with and without it, alternating, in one run.

    python -m bench.telemetry_overhead [--jobs 64] [--tokens 64] [--rounds 5] [--device cpu]
                                       [--size tiny|reference] [--model DIR] [--backend torch|vllm]

--backend vllm (a CUDA build of vLLM): vLLM's routed-experts capture on and off, each engine at
`gpu_memory_utilization` 0.4. Both engines load the same model; each round runs the same greedy
workload (EOS ignored) through one, then the other. Prints tokens/s per round and the median ratio
(goal: ≥ 0.98).

--processes N (vLLM on a GPU: two vLLM engines in one process disturb each other, their rounds
spread 0.4–1.6× on an H200): N processes one after the other, alternating telemetry on / off, each
loading one engine and running --rounds rounds after a warm-up. Prints each process's median
tokens/s and the ratio of the on processes' median to the off processes'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_build.checkpoint import build_checkpoint, is_checkpoint
from moe_core.engine import Engine, GenerationRequest, SamplingParams
from moe_core.torch_engine import TorchEngine


def engine(backend: str, model: Path, device: str, jobs: int, telemetry: bool) -> Engine:
    """The engine with or without expert telemetry, not loaded."""
    if backend == "vllm":
        from moe_core.vllm_engine import VllmEngine

        return VllmEngine(
            model,
            device=device,
            dtype="auto",
            max_batch_size=jobs,
            gpu_memory_utilization=0.4,
            expert_telemetry=telemetry,
        )
    return TorchEngine(model, device=device, max_batch_size=jobs, telemetry=telemetry)


def run(engine: Engine, n: int, tokens: int, tag: str) -> float:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    for i in range(n):
        engine.add_request(
            GenerationRequest(
                f"{tag}{i}-{start}",
                f"def f{i}(x):\n    return x * {i}\n",
                params,
                tag="code" if i % 2 else "text",
            )
        )
    made = 0
    while engine.has_unfinished():
        made += sum(len(d.token_ids) for d in engine.step())
    return made / (time.perf_counter() - start)


def one_engine(args: argparse.Namespace, model: Path, telemetry: bool) -> None:
    """Child of --processes: one engine, a warm-up, --rounds rounds; prints `RESULT [tok/s, ...]`."""
    one = engine(args.backend, model, args.device, args.jobs, telemetry)
    one.load()
    try:
        run(one, args.jobs, args.tokens, "w")
        rates = [run(one, args.jobs, args.tokens, f"r{r}") for r in range(args.rounds)]
    finally:
        one.close()
    print("RESULT " + json.dumps(rates), flush=True)


def by_processes(args: argparse.Namespace, model: Path) -> None:
    medians: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.processes):
        telemetry = i % 2 == 0
        cmd = [sys.executable, "-m", "bench.telemetry_overhead", "--backend", args.backend]
        cmd += ["--device", args.device, "--model", str(model), "--jobs", str(args.jobs)]
        cmd += ["--tokens", str(args.tokens), "--rounds", str(args.rounds)]
        cmd += ["--only", "on" if telemetry else "off"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rates = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        medians[telemetry].append(statistics.median(rates))
        print(
            f"process {i + 1}/{args.processes} telemetry {'on ' if telemetry else 'off'}: "
            f"median {medians[telemetry][-1]:7.0f} tok/s, rounds {[round(r) for r in rates]}",
            flush=True,
        )
    ratio = statistics.median(medians[True]) / statistics.median(medians[False])
    print(f"ratio on/off of the processes' medians: {ratio:.3f} (goal ≥ 0.98)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--size", default="tiny", choices=["tiny", "reference"], help="reference: the 4.76 B bf16 model"
    )
    ap.add_argument("--model", type=Path, help="use this checkpoint (built there if absent)")
    ap.add_argument("--backend", default="torch", choices=["torch", "vllm"])
    ap.add_argument("--processes", type=int, default=0, help="one engine per process (see above)")
    ap.add_argument("--only", choices=["on", "off"], help=argparse.SUPPRESS)  # a --processes child
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 32000 if args.size == "reference" else 4096
    model = args.model or Path(tempfile.mkdtemp()) / "m"
    if not is_checkpoint(model):
        build_checkpoint(model, progress=False, size=args.size, vocab_size=vocab)
    if args.only:
        return one_engine(args, model, args.only == "on")
    if args.processes:
        return by_processes(args, model)
    on, off = (engine(args.backend, model, args.device, args.jobs, t) for t in (True, False))
    on.load()
    off.load()
    run(on, args.jobs, args.tokens, "w")  # warm-up
    run(off, args.jobs, args.tokens, "w")
    ratios = []
    for r in range(args.rounds):
        a, b = (on, off) if r % 2 == 0 else (off, on)  # alternate who goes first
        ta = run(a, args.jobs, args.tokens, "a")
        tb = run(b, args.jobs, args.tokens, "b")
        t_on, t_off = (ta, tb) if a is on else (tb, ta)
        ratios.append(t_on / t_off)
        print(
            f"round {r + 1}: telemetry on {t_on:7.0f} tok/s, off {t_off:7.0f} tok/s, ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"median ratio on/off over {args.rounds} rounds: {statistics.median(ratios):.3f} (goal ≥ 0.98);"
        f" counted: { {k: sum(v[0]) for k, v in on.expert_tokens().items()} } tokens in layer 0"
    )


if __name__ == "__main__":
    main()
