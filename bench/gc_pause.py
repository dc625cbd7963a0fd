"""How long the garbage collector stops a process that has loaded an engine, before and after
`host.heap.freeze_heap` (which the worker's engine and runtime processes and the API call once up).

    python -m bench.gc_pause [--backend torch|vllm] [--device cpu|cuda] [--model DIR]
                             [--requests 64] [--tokens 64] [--gap-ms 1] [--rounds 3] [--repeat 3]

Loads the engine as a worker does (`workers.engine_setup.construct`, the default settings; the
tiny checkpoint is built in a temporary folder unless --model names one), then, before and after
freezing: the objects the collector tracks, a full collection's time (median of --repeat), and
--rounds runs of one workload (--requests × --tokens, greedy, EOS ignored, request i added at
i × gap) with every collection timed through `gc.callbacks`: how many of each generation, the
longest pause and their sum. A full collection stops the engine's steps for as long as it takes:
every running request's next token and every new one's first token wait. Prints one table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.service_vs_engine import prompts, run_engine
from host.heap import freeze_heap
from moe_build.checkpoint import build_checkpoint, is_checkpoint
from moe_core.engine import Engine


def full_collection_ms(repeat: int) -> float:
    """The median time of `repeat` full collections (ms)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


@contextmanager
def timed_collections() -> Iterator[list[tuple[int, float]]]:
    """Every collection made inside the block: (generation, ms), in order."""
    seen: list[tuple[int, float]] = []
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            seen.append((int(info["generation"]), (time.perf_counter() - started[0]) * 1000))

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def measure(
    engine: Engine, texts: list[str], tokens: int, gap_s: float, repeat: int, rounds: int
) -> dict[str, Any]:
    """One row: what a full collection costs now, and what the collector did during `rounds` runs
    of the workload (tok/s: their median)."""
    row: dict[str, Any] = {"tracked": len(gc.get_objects()), "full_ms": round(full_collection_ms(repeat), 1)}
    with timed_collections() as seen:
        speeds = [run_engine(engine, texts, tokens, gap_s)[0] for _ in range(rounds)]
    row["tok_s"] = round(statistics.median(speeds), 1)
    row["collections"] = [sum(1 for g, _ in seen if g == gen) for gen in (0, 1, 2)]
    row["longest_ms"] = round(max((ms for _, ms in seen), default=0.0), 1)
    row["total_ms"] = round(sum(ms for _, ms in seen), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch", choices=["torch", "vllm"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--model", type=Path, help="a checkpoint; default: the tiny one, built in a temporary folder"
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gap-ms", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="runs of the workload per row")
    ap.add_argument("--repeat", type=int, default=3, help="full collections timed per row")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from host.settings import Settings
    from workers.engine_setup import construct

    with tempfile.TemporaryDirectory() as tmp:
        model = (
            args.model
            if args.model and is_checkpoint(args.model)
            else build_checkpoint(Path(tmp) / "m", progress=False)
        )
        settings = Settings()
        if args.device == "cpu":
            torch.set_num_threads(settings.engine.resolved_cpu_threads())  # as a CPU worker does
        print(f"[gc_pause] loading {args.backend} on {args.device}", flush=True)
        engine = construct(args.backend, model, args.device, settings.engine)
        engine.load()
        try:
            texts = prompts(args.requests)
            run_engine(engine, texts[:4], 4, 0.0)  # warm-up, untimed
            rows = {
                "as loaded": measure(engine, texts, args.tokens, args.gap_ms / 1000, args.repeat, args.rounds)
            }
            print(f"[gc_pause] frozen: {freeze_heap()} objects", flush=True)
            rows["after freeze_heap"] = measure(
                engine, texts, args.tokens, args.gap_ms / 1000, args.repeat, args.rounds
            )
        finally:
            engine.close()
    workload = f"{args.rounds} runs of {args.requests} requests × {args.tokens} tokens, gap {args.gap_ms} ms"
    print(f"{args.backend} engine on {args.device}; {workload}")
    print(
        "| heap | objects a full collection walks | its time | collections in the run (gen 0/1/2) "
        "| longest pause | all pauses | tok/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        gens = "/".join(str(c) for c in r["collections"])
        pauses = f"{r['longest_ms']} ms | {r['total_ms']} ms"
        print(f"| {name} | {r['tracked']:,} | {r['full_ms']} ms | {gens} | {pauses} | {r['tok_s']} |")
    if args.out:
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
