"""vLLM's engine-core loop under async scheduling, on the CPU: what a structured step costs the one
thread that runs it, with each of engine.vllm.structured_masks' ways (a benchmark tool, not the
product; the tests drive it too).

vLLM's CPU build turns async scheduling off, so its engine never takes the deferred path a
structured step takes on a GPU (moe_core/vllm_masks.py). Here vLLM's own loop
(`EngineCore.step_with_batch_queue`, batch queue of 2) and its own AsyncScheduler and structured-
output manager, built as the engine core builds them, run over a simulated model runner: the one
seam. `SimulatedRunner` keeps vLLM's runner contract (execute_model, then sample_tokens, one step
held between them; the step's masks read when its sampling is launched, as vLLM's runner copies
them out for the device; `--prep-ms` of Python work at each execute: the input preparation and
launches) and a simulated GPU, one thread that waits out each launched forward (`--forward-ms`)
and sampling (`--sample-ms`) in launch order. Each request's token is one its mask allows (random,
seeded by request and position: the same in every way) or, unconstrained, any token. Requests
are added at once, `--requests` over bench.structured_output's schemas, and run until each has
ended (its grammar's end-of-sequence token, or max tokens).

    python -m bench.engine_core_loop [--model DIR] [--requests 256] [--forward-ms 6] [--sample-ms 1]
        [--prep-ms 4] [--max-tokens 64] [--rounds 3] [--ways vllm,in-turn,parallel]

(`--ways parallel,parallel-update-accepts`: LocalMoE's way with the grammars' accepts held for the
fill, the default, against the same with vLLM's accepts in update_from_output.)

Prints each way's steps, wall time and ms per step (median of the rounds, alternating ways), the
step's parts as bench/engine_core_steps.py times them on a GPU's engine core (schedule, update,
masks, and the rest: the runner's calls and the waits for the simulated GPU), and checks that every
way decoded the same tokens. The CPU work per step is this machine's; on a GPU host the figures to
read are those of `bench.structured_output --step-times`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import random
import statistics
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import engine_core_steps
from bench.engine_core_masks import config_for, model_or_tiny
from bench.structured_output import schemas

WAYS = ("vllm", "in-turn", "parallel")  # engine.vllm.structured_masks
# and, to measure what holding the accepts for the fill saves: parallel with vLLM's accepts in the update
BENCH_WAYS = (*WAYS, "parallel-update-accepts")
PARTS = ("schedule_ms", "update_ms", "masks_ms", "runner_ms")  # of a step, engine_core_steps.per_step's


class SimulatedRunner:
    """The model executor as vLLM's engine core calls it. `calls` logs ("execute" | "sample",
    step number) in call order; `tokens` {request id: tokens sampled}."""

    def __init__(
        self, vocab: int, forward_ms: float, sample_ms: float, prep_ms: float = 0.0, seed: int = 0
    ) -> None:
        self.vocab = vocab
        self.forward_s, self.sample_s, self.prep_s = forward_ms / 1e3, sample_ms / 1e3, prep_ms / 1e3
        self.seed = seed
        self.gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulated-gpu")  # in order
        self.pending: tuple[int, Any] | None = None  # (step, scheduler output) executed, not sampled
        self.steps = 0
        self.calls: list[tuple[str, int]] = []
        self.tokens: dict[str, list[int]] = {}

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Future[Any]:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        if self.pending is not None:
            raise AssertionError("execute_model twice without sample_tokens between (vLLM's runner refuses)")
        done: Future[Any] = Future()
        if not scheduler_output.total_num_scheduled_tokens:
            done.set_result(EMPTY_MODEL_RUNNER_OUTPUT)  # nothing to run: the loop samples nothing
            return done
        self.steps += 1
        self.pending = (self.steps, scheduler_output)
        self.calls.append(("execute", self.steps))
        _busy(self.prep_s)  # the runner's input preparation and launches: Python, holding the GIL
        self.gpu.submit(time.sleep, self.forward_s)
        done.set_result(None)  # None: the sampling comes from sample_tokens
        return done

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Future[Any]:
        """The step's tokens are picked here, on the engine thread, as vLLM's runner lays each
        request's mask row out for the device here (a loop over the batch in Python); the simulated
        GPU only waits its sampling's time and hands them back, holding no GIL."""
        from vllm.v1.outputs import ModelRunnerOutput

        if self.pending is None:
            raise AssertionError("sample_tokens without an executed step")
        (step, out), self.pending = self.pending, None
        self.calls.append(("sample", step))
        rows: dict[str, Any] = {}
        if grammar_output is not None:  # the manager's tensor is refilled next step: read it now
            rows = dict(
                zip(grammar_output.structured_output_request_ids, grammar_output.grammar_bitmask, strict=True)
            )
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            made = self.tokens.setdefault(rid, [])
            draw = random.Random(f"{self.seed}-{rid}-{len(made)}")
            if rid in rows:
                token = _allowed_from(rows[rid], draw.randrange(self.vocab))
            else:
                token = draw.randrange(self.vocab)
            made.append(token)
            sampled.append([token])
        output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled
        )
        return self.gpu.submit(_after, self.sample_s, output)

    def shutdown(self) -> None:
        self.gpu.shutdown(wait=True)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _after(seconds: float, result: Any) -> Any:
    time.sleep(seconds)
    return result


def _allowed_from(row: np.ndarray, start: int) -> int:
    """The first token at or after `start` (wrapping) that the mask row [ceil(V / 32)] int32 allows
    (a few µs: about what vLLM's runner spends on a row as it lays the masks out for the device)."""
    words = np.flatnonzero(row)  # the words that allow some token
    n = len(words)
    if not n:
        raise AssertionError("a mask row that allows no token")
    first, skip = divmod(start, 32)
    i = int(np.searchsorted(words, first)) % n  # the first such word at or after start's (wrapping)
    w = int(words[i])
    bits = int(row[w]) & 0xFFFFFFFF
    if w == first:
        above = bits & ~((1 << skip) - 1)  # start's own word: its tokens from start on
        if above:
            bits = above
        elif n > 1:
            w = int(words[(i + 1) % n])
            bits = int(row[w]) & 0xFFFFFFFF
        # else: this word's tokens, all before start, are the only ones: its lowest
    return w * 32 + (bits & -bits).bit_length() - 1


class Loop:
    """vLLM's EngineCore, its loop and scheduler real, its executor a SimulatedRunner; `way` one of
    BENCH_WAYS."""

    def __init__(
        self,
        model: Path,
        rows: int,
        way: str,
        forward_ms: float,
        sample_ms: float,
        prep_ms: float = 0.0,
        batch_rank: int | None = None,
        batch_yield: tuple[int, float] | None = None,
    ) -> None:
        """batch_rank: waiting requests by priority, and LocalMoE's scheduler (way parallel or
        in-turn) seats a more urgent one by preempting a running request of this rank or higher
        (moe_core/vllm_seating.py); batch_yield: (rows, hold_s), the seating's yielding."""
        import torch
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        from moe_core import vllm_masks, vllm_seating

        seating: dict[str, Any] = {}
        if batch_rank is not None:
            seating = {"scheduling_policy": "priority"}
            seating["additional_config"] = {vllm_seating.RANK_KEY: batch_rank}
            if batch_yield is not None:
                seating["additional_config"][vllm_seating.YIELD_KEY] = list(batch_yield)
        config = config_for(
            model,
            rows,
            max_num_batched_tokens=max(2048, rows * 8),
            enable_prefix_caching=False,  # (its block hashes come with requests an engine processed)
            **seating,
        )
        config.scheduler_config.async_scheduling = True  # as on a GPU (vLLM's CPU build turns it off)
        self.config = config
        self.manager = StructuredOutputManager(config)
        block = 16
        spec = FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=16, dtype=torch.float32)
        blocks = rows * 32  # room for every request's prompt and output: nothing preempted
        config.cache_config.num_gpu_blocks = blocks  # as the engine core sets it from its KV cache
        kv = KVCacheConfig(
            num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)]
        )
        build = {"parallel": vllm_masks.scheduler, "in-turn": vllm_masks.scheduler_in_turn}
        build["parallel-update-accepts"] = vllm_masks.scheduler
        build_way = build.get(way, vllm_masks.vllms_scheduler)
        self.scheduler = build_way(
            vllm_config=config, kv_cache_config=kv, structured_output_manager=self.manager, block_size=block
        )
        if way == "parallel-update-accepts":
            self.manager._create_grammar.defer = False  # GrammarCache: plain copies, vLLM's accepts
        tokenizer_vocab = config.model_config.get_vocab_size()
        self.runner = SimulatedRunner(tokenizer_vocab, forward_ms, sample_ms, prep_ms)
        core = object.__new__(EngineCore)  # its loop's state, set as its __init__ sets it
        core.vllm_config = config
        core.scheduler = self.scheduler
        core.model_executor = self.runner
        core.structured_output_manager = self.manager
        core.batch_queue_size = 2
        core.batch_queue = deque(maxlen=2)
        core.is_pooling_model = False
        core.is_ec_consumer = True  # vLLM 0.26's name
        core.is_mm_encoder_only = False  # 0.32's
        core.check_for_draft_tokens = False
        core.async_scheduling = True
        core.log_stats = False
        core.aborts_queue = queue.Queue()
        core._weight_version = None
        self.core = core

    def add(self, requests: list[Any]) -> None:
        for request in requests:
            self.manager.grammar_init(request)  # as the engine core's add_request does
            self.scheduler.add_request(request)

    def add_ready(self, requests: list[Any]) -> None:
        """`add`, then wait until every structured request's grammar is compiled."""
        self.add(requests)
        deadline = time.monotonic() + 300
        while not all(
            r.structured_output_request.is_grammar_ready for r in requests if r.use_structured_output
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("grammars not compiled in 300 s")
            time.sleep(0.001)

    def run(
        self, abort: dict[int, list[str]] | None = None, arrive: dict[int, list[Any]] | None = None
    ) -> tuple[dict[str, list[int]], dict[str, str], int]:
        """Steps the loop until nothing is left: ({request id: the tokens vLLM output}, {request id:
        finish reason}, loop calls). abort: {loop call: request ids aborted before it}, as the
        engine core's input queue aborts between two steps; arrive: {loop call: requests added
        before it} likewise. `first_output` then holds the loop call each request's first token
        came out of."""
        outputs: dict[str, list[int]] = {}
        finished: dict[str, str] = {}
        self.first_output: dict[str, int] = {}
        calls = 0
        while self.scheduler.has_requests() or self.core.batch_queue or any(c >= calls for c in arrive or {}):
            for rid in (abort or {}).get(calls, []):
                self.core.abort_requests([rid])
            self.add((arrive or {}).get(calls, []))
            calls += 1
            step_outputs, _ = self.core.step_with_batch_queue()
            for eco in (step_outputs or {}).values():
                for out in eco.outputs:
                    if out.new_token_ids:
                        self.first_output.setdefault(out.request_id, calls)
                    outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
                    if out.finish_reason is not None:
                        finished[out.request_id] = str(out.finish_reason)
            if calls > 100_000:
                raise RuntimeError("the loop did not end")
        return outputs, finished, calls

    def close(self) -> None:
        self.runner.shutdown()
        self.manager.clear_backend()


def structured_requests(
    loop: Loop, count: int, max_tokens: int, plain_every: int = 0, prefix: str = "r", priority: int = 0
) -> list[Any]:
    """`count` vLLM Requests (ids prefix + k) over bench.structured_output's schemas (every
    `plain_every`-th one unconstrained when set; 1: all), the model's end-of-sequence token theirs,
    of this priority."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.v1.request import Request

    eos = loop.manager.tokenizer.eos_token_id
    pool = schemas(50)
    made = []
    for k in range(count):
        spec = None
        if not (plain_every and k % plain_every == plain_every - 1):
            spec = StructuredOutputsParams(json=json.dumps(pool[k % len(pool)]))
            spec._backend = "guidance"  # as vLLM's input processor marks it
        params = SamplingParams(max_tokens=max_tokens, structured_outputs=spec)
        params.update_from_generation_config({}, eos_token_id=eos)
        made.append(Request(f"{prefix}{k}", [1, 2, 3], params, None, priority=priority))
    return made


def measure(
    model: Path, requests: int, forward_ms: float, sample_ms: float, prep_ms: float, max_tokens: int, way: str
) -> dict[str, Any]:
    """One decode of `requests` structured requests with `way`: {"steps", "seconds", "ms_per_step",
    "scheduled_ahead", "digest" (of every request's tokens), "core" (the loop's mean ms per step:
    period, schedule, update, masks and the rest, as bench/engine_core_steps.py splits a GPU
    engine core's)}."""
    loop = Loop(model, requests, way, forward_ms, sample_ms, prep_ms)
    times = Path(tempfile.mkdtemp(prefix="localmoe-loop-steps-")) / "steps.json"
    engine_core_steps.Timeline(times).wrap(loop.scheduler)
    try:
        loop.add(
            structured_requests(loop, 1, 4, prefix="warm")
        )  # the backend made (its tokenizer read) before the clock starts
        loop.run()
        batch = structured_requests(loop, requests, max_tokens)
        loop.add_ready(batch)
        start, steps_before, before = time.perf_counter(), loop.runner.steps, engine_core_steps.read(times)
        outputs, _, _ = loop.run()
        seconds = time.perf_counter() - start
        steps = loop.runner.steps - steps_before
        ahead = getattr(loop.scheduler, "localmoe_ahead", None)
        tokens = {rid: outputs.get(rid, []) for rid in sorted(r.request_id for r in batch)}
        return {
            "steps": steps,
            "seconds": round(seconds, 3),
            "ms_per_step": round(seconds * 1e3 / max(steps, 1), 3),
            "scheduled_ahead": ahead.scheduled_ahead if ahead is not None else 0,
            "digest": hashlib.sha256(json.dumps(tokens).encode()).hexdigest(),
            "core": engine_core_steps.per_step(before, engine_core_steps.read(times), "structured"),
        }
    finally:
        loop.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a HF model directory; default: the tiny model, vocabulary 32,000")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--forward-ms", type=float, default=6.0, help="the simulated GPU's forward per step")
    p.add_argument("--sample-ms", type=float, default=1.0, help="and its sampling")
    p.add_argument(
        "--prep-ms", type=float, default=4.0, help="the runner's preparation of a step, on the engine thread"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ways", default=",".join(WAYS), help=f"of {', '.join(BENCH_WAYS)}")
    args = p.parse_args()
    ways = [w for w in args.ways.split(",") if w]
    if unknown := set(ways) - set(BENCH_WAYS):
        p.error(f"unknown ways {sorted(unknown)}")
    model = model_or_tiny(args.model, "localmoe-loop-")
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
    for k in range(args.rounds):
        for way in ways:
            r = measure(
                model, args.requests, args.forward_ms, args.sample_ms, args.prep_ms, args.max_tokens, way
            )
            runs[way].append(r)
            steps, ms, core = r["steps"], r["ms_per_step"], r["core"]
            parts = " ".join(f"{f.removesuffix('_ms')} {core[f]:.2f}" for f in PARTS)
            print(
                f"round {k + 1}/{args.rounds} {way:9s} {steps} steps {ms:.2f} ms/step ({parts})", flush=True
            )
    digests = {r["digest"] for rs in runs.values() for r in rs}
    if len(digests) != 1:
        raise AssertionError("the ways decoded different tokens")
    base = statistics.median(r["ms_per_step"] for r in runs[ways[0]])
    summary = {}
    for way, rs in runs.items():
        ms = statistics.median(r["ms_per_step"] for r in rs)
        summary[way] = {"ms_per_step": ms, "steps": rs[0]["steps"], "ahead": rs[0]["scheduled_ahead"]}
        summary[way] |= {f: statistics.median(r["core"][f] for r in rs) for f in PARTS}
        print(f"{way:9s} {ms:7.2f} ms/step  {base / ms:.2f}x {ways[0]}'s step rate")
    sim = {"forward_ms": args.forward_ms, "sample_ms": args.sample_ms, "prep_ms": args.prep_ms}
    print(json.dumps({"requests": args.requests, **sim, "ways": summary}))


if __name__ == "__main__":
    main()
