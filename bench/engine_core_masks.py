"""The whole mask call of vLLM's engine core for one structured decode step, vLLM's fill against
LocalMoE's (moe_core/vllm_masks.py), on the host's CPU (no GPU needed, vLLM installed).

`StructuredOutputManager.grammar_bitmask` is what vLLM's scheduler calls for every step that holds
structured requests: a Python pass over the step's requests, then their mask rows. This benchmark
builds a real manager for a model directory (its tokenizer; vLLM's guidance backend), `--requests`
requests over bench.structured_output's schemas, request k advanced k % 13 allowed tokens so the batch
holds the states of a decode in progress, and times the call `--steps` times with vLLM's fill,
then on the same manager with LocalMoE's installed. The masks must be equal (it raises otherwise).

    python -m bench.engine_core_masks [--model DIR] [--requests 256] [--steps 20] [--threads N]

Without --model it builds the tiny test model with a 32,000-token vocabulary (the reference
model's size: a mask row is 1,000 words). Prints ms per step for each and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.structured_output import schemas


def manager_and_requests(model: Path, requests: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """vLLM's StructuredOutputManager for `model` (guidance, JSON without free whitespace, room for
    `requests` rows) and `requests` requests {id: vLLM Request}, their grammars compiled, request k
    advanced by up to k % 13 tokens (each the first its mask allows; fewer where its JSON ends)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    config = EngineArgs(
        model=str(model),
        max_num_seqs=requests,
        enforce_eager=True,
        structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True),
    ).create_engine_config()
    manager = StructuredOutputManager(config)
    pool = schemas(50, seed=seed)
    batch: dict[str, Any] = {}
    for k in range(requests):
        spec = StructuredOutputsParams(json=json.dumps(pool[k % len(pool)]))
        spec._backend = "guidance"  # as vLLM's input processor marks it
        request = Request(f"r{k}", [1, 2, 3], SamplingParams(max_tokens=256, structured_outputs=spec), None)
        manager.grammar_init(request)
        batch[request.request_id] = request
    deadline = time.monotonic() + 300
    while not all(r.structured_output_request.is_grammar_ready for r in batch.values()):
        if time.monotonic() > deadline:
            raise TimeoutError("grammars not compiled in 300 s")
        time.sleep(0.01)
    for k, (rid, request) in enumerate(batch.items()):
        grammar = request.structured_output_request.grammar
        for _ in range(k % 13):
            if grammar.ll_matcher.is_stopped():
                break
            row = manager.grammar_bitmask(batch, [rid], {})[0]
            allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
            if not grammar.accept_tokens(rid, [int(allowed[0])]):
                raise AssertionError(f"{rid}: the grammar refused a token its own mask allowed")
    return manager, batch


def _time(manager: Any, batch: dict[str, Any], steps: int) -> tuple[float, np.ndarray]:
    """The median ms of `steps` calls (after one untimed) and the last call's masks."""
    ids = list(batch)
    masks = manager.grammar_bitmask(batch, ids, {})
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        masks = manager.grammar_bitmask(batch, ids, {})
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3, masks.copy()


def measure(model: Path, requests: int, steps: int, threads: int | None = None) -> dict[str, float]:
    """{"vllm": ms per step, "parallel": ms per step, "rows": rows per step}; raises where the
    two fills' masks differ."""
    from moe_core import vllm_masks

    manager, batch = manager_and_requests(model, requests)
    vllm_ms, vllms = _time(manager, batch, steps)
    fill = vllm_masks.install(manager, threads)
    if fill is None:
        raise RuntimeError("this vLLM's manager has not the seam moe_core/vllm_masks.py fills through")
    manager._grammar_bitmask.zero_()
    ours_ms, ours = _time(manager, batch, steps)
    if not np.array_equal(vllms, ours):
        raise AssertionError("the two fills wrote different masks")
    return {
        "vllm": round(vllm_ms, 2),
        "parallel": round(ours_ms, 2),
        "rows": len(batch),
        "threads": fill.threads,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a HF model directory; default: the tiny model, vocabulary 32,000")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, help="the parallel fill's (default: as the engine core picks)")
    args = p.parse_args()
    if args.model:
        model = Path(args.model)
    else:
        from moe_build.checkpoint import build_checkpoint

        print("building the tiny model with a 32,000-token vocabulary…", flush=True)
        model = build_checkpoint(
            Path(tempfile.mkdtemp(prefix="localmoe-masks-")) / "model", vocab_size=32000, progress=False
        )
    print(f"compiling {args.requests} grammars and advancing them…", flush=True)
    r = measure(model, args.requests, args.steps, args.threads)
    print(f"{r['rows']} rows per step; the manager's whole call, median of {args.steps}:")
    print(f"  vLLM's fill      {r['vllm']:8.2f} ms")
    speedup = r["vllm"] / r["parallel"]
    print(f"  LocalMoE's fill  {r['parallel']:8.2f} ms   ({speedup:.2f}x, {r['threads']} threads)")


if __name__ == "__main__":
    main()
