"""One decode step's grammar masks for a batch of structured requests, filled three ways (issue 19):
one by one; as vLLM 0.26's StructuredOutputManager fills them above 128 requests (chunks of 16 on
a Python thread pool, one `fill_next_token_bitmask` call per request); and by llguidance's own
parallel fill (`fill_next_token_bitmask_par`: one call, the batch spread over its native threads).

    python -m bench.grammar_masks [--requests 256] [--vocab 32000] [--threads 8] [--steps 5]

The requests use bench.structured_output's schemas, each matcher advanced a few tokens (random
allowed ones, seeded) so that the batch holds the states of a decode in progress. The tokenizer:
a byte-level BPE of --vocab tokens trained on this machine's code and prose (the reference
model's size is 32,000). Prints ms per step for each way and the speed-up over vLLM's.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llguidance
import llguidance.hf
import llguidance.torch as llt
import torch

from bench.structured_output import schemas
from moe_build.checkpoint import train_tokenizer
from moe_core.structured import grammar_for

VLLM_CHUNK = 16  # requests per thread-pool task, as vLLM 0.26 fills them


def matchers(tokenizer: llguidance.LLTokenizer, requests: int, seed: int) -> list[llguidance.LLMatcher]:
    """`requests` matchers over 50 schemas, each advanced 0-12 allowed tokens (fewer if it ends)."""
    grammars = [grammar_for("json", json.dumps(s)) for s in schemas(50, seed=seed)]
    rnd = random.Random(seed)
    out = []
    row = llt.allocate_token_bitmask(1, tokenizer.vocab_size)
    for i in range(requests):
        m = llguidance.LLMatcher(tokenizer, grammars[i % len(grammars)], log_level=0)
        for _ in range(rnd.randint(0, 12)):
            llt.fill_next_token_bitmask(m, row, 0)
            words = row[0].tolist()
            allowed = [t for t in range(tokenizer.vocab_size) if (words[t // 32] >> (t % 32)) & 1]
            if not allowed or m.is_stopped():
                break
            m.consume_token(rnd.choice(allowed))
        out.append(m)
    return out


Way = tuple[Callable[[], None], torch.Tensor]  # (fill the step's masks, the masks it fills)


def ways(live: list[tuple[llguidance.LLMatcher, int]], vocab: int, threads: int) -> dict[str, Way]:
    """Each way to fill the masks of `live` ((matcher, its row)), into a mask tensor of its own."""
    rows = max(i for _, i in live) + 1
    masks = [llt.allocate_token_bitmask(rows, vocab) for _ in range(3)]
    pool = ThreadPoolExecutor(max_workers=threads)
    executor = llguidance.LLExecutor(num_threads=threads)

    def fill(batch: list[tuple[llguidance.LLMatcher, int]], mask: torch.Tensor) -> None:
        for m, i in batch:
            llt.fill_next_token_bitmask(m, mask, i)

    def vllm_pool() -> None:
        chunks = [live[k : k + VLLM_CHUNK] for k in range(0, len(live), VLLM_CHUNK)]
        for f in [pool.submit(fill, c, masks[1]) for c in chunks]:
            f.result()

    return {
        "one by one": (lambda: fill(live, masks[0]), masks[0]),
        "vLLM's thread pool": (vllm_pool, masks[1]),
        "llguidance parallel": (lambda: llt.fill_next_token_bitmask_par(executor, live, masks[2]), masks[2]),
    }


def measure(requests: int, vocab: int, threads: int, steps: int, seed: int = 0) -> dict[str, float]:
    """ms per step for each way (the median of `steps` steps, after one untimed); "masks": the
    requests not yet ended. Raises if the ways' masks differ."""
    with tempfile.TemporaryDirectory() as tmp:
        hf = train_tokenizer(Path(tmp), vocab_size=vocab, progress=False)
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))
    batch = matchers(tokenizer, requests, seed)
    live = [(m, i) for i, m in enumerate(batch) if not m.is_stopped()]
    out: dict[str, float] = {}
    filled = ways(live, tokenizer.vocab_size, threads)
    for name, (fill, _) in filled.items():
        fill()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fill()
            times.append(time.perf_counter() - t)
        out[name] = round(sorted(times)[len(times) // 2] * 1e3, 2)
    first, *others = (mask for _, mask in filled.values())
    if not all(torch.equal(first, other) for other in others):
        raise AssertionError("the ways filled different masks")
    out["masks"] = len(live)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--threads", type=int, default=8, help="vLLM's pool (8 on hosts of 16+ cores) and llguidance's"
    )
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    print(f"training a {args.vocab}-token tokenizer, {args.requests} matchers…", flush=True)
    result = measure(args.requests, args.vocab, args.threads, args.steps)
    base = result["vLLM's thread pool"]
    print(f"{result['masks']} masks per step, {args.threads} threads")
    for name in ("one by one", "vLLM's thread pool", "llguidance parallel"):
        print(f"  {name:20s} {result[name]:8.2f} ms   ({base / result[name]:.2f}x vLLM's)")


if __name__ == "__main__":
    main()
