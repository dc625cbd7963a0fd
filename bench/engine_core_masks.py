"""What structured outputs cost vLLM's engine core on the CPU, vLLM's own ways against LocalMoE's
(moe_core/vllm_masks.py: one compiled grammar per distinct schema, copied per request; every step's
masks in one parallel call). No GPU needed; vLLM installed.

A decode simulated on a real StructuredOutputManager for a model directory (its tokenizer, vLLM's
guidance backend, made first): `--requests` requests over bench.structured_output's schemas are
added at once (compile: the wall time until every grammar is ready), then at each step the
manager's whole mask call (`grammar_bitmask`, what vLLM's scheduler calls for the step) is timed,
and every request takes a token its mask allows, drawn at random (seeded per request, the same in
both ways) and accepted as vLLM accepts a sampled one, until each grammar has taken its
end-of-sequence token or `--steps` steps. The two ways run the same draws, so their masks must be
equal step by step (it raises otherwise).

    python -m bench.engine_core_masks [--model DIR] [--requests 256] [--steps 40] [--threads N]
        [--par-accepts]

Without --model it builds the tiny test model with a 32,000-token vocabulary (the reference
model's size: a mask row is 1,000 words). Prints each way's compile wall time, its masks' total and
median ms per step, the accepts' total and the ratios. LocalMoE's grammars hold each accepted token
for the next fill (moe_core/vllm_masks.py DeferredAccept), so in its way the accepts' total is the
holding and the tokens' consume is timed with the masks. With --par-accepts
LocalMoE's way accepts each step's tokens in one native call (llguidance's `consume_token_par`
on the fill's threads; an end-of-sequence token, or a grammar already stopped, still through
vLLM's `accept_tokens`): what that would save the engine core, the masks' equality checking that
the grammars went the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.structured_output import schemas


def config_for(model: Path, rows: int, **engine_args: Any) -> Any:
    """vLLM's config for `model` with `rows` sequences a step: guidance, JSON without free
    whitespace, eager; `engine_args` more of EngineArgs'."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(model),
        max_num_seqs=rows,
        enforce_eager=True,
        structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True),
        **engine_args,
    ).create_engine_config()


def manager_for(model: Path, rows: int) -> Any:
    """vLLM's StructuredOutputManager for `model` (config_for's), `rows` mask rows."""
    from vllm.v1.structured_output import StructuredOutputManager

    return StructuredOutputManager(config_for(model, rows))


def model_or_tiny(model: str | None, prefix: str) -> Path:
    """`model`, or (None) the tiny test model with a 32,000-token vocabulary (the reference
    model's: a mask row is 1,000 words) built in a new temporary folder named from `prefix`."""
    if model:
        return Path(model)
    from moe_build.checkpoint import build_checkpoint

    print("building the tiny model with a 32,000-token vocabulary…", flush=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    return build_checkpoint(folder / "model", vocab_size=32000, progress=False)


def add_requests(
    manager: Any, requests: int, distinct: int = 50, seed: int = 0, pool: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`requests` requests {id: vLLM Request} over `distinct` schemas in turn (or `pool`'s), their
    grammars made by `manager` (as its engine core makes them when a request arrives), compiled
    when this returns."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.v1.request import Request

    pool = pool or schemas(distinct, seed=seed)
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
        time.sleep(0.001)
    return batch


def decode(
    manager: Any, batch: dict[str, Any], steps: int, seed: int = 0, executor: Any = None
) -> tuple[list[float], str, float, int]:
    """Up to `steps` steps of the batch's decode (see the module's docstring): ms of each step's
    mask call, a digest of every step's masks, the ms all the accepts took (vLLM's
    `accept_tokens`, which its scheduler calls per structured request as each step's tokens come
    back; with `executor`, an llguidance LLExecutor, one `consume_token_par` a step instead) and
    how many tokens that native call took."""
    eos = manager.tokenizer.eos_token_id
    draws = {rid: random.Random(f"{seed}-{rid}") for rid in batch}
    grammars = {rid: r.structured_output_request.grammar for rid, r in batch.items()}
    digest = hashlib.sha256()
    times: list[float] = []
    accepting, together_count = 0.0, 0
    for _ in range(steps):
        ids = [rid for rid in batch if not grammars[rid].is_terminated()]
        if not ids:
            break
        t = time.perf_counter()
        masks = manager.grammar_bitmask(batch, ids, {})  # [len(ids), ceil(V / 32)] int32
        times.append((time.perf_counter() - t) * 1e3)
        digest.update(masks.tobytes())
        tokens = []
        for row, rid in enumerate(ids):
            allowed = np.flatnonzero(np.unpackbits(masks[row].view(np.uint8), bitorder="little"))
            tokens.append(int(draws[rid].choice(allowed)) if len(allowed) else eos)
        t = time.perf_counter()
        if executor is None:
            for rid, token in zip(ids, tokens, strict=True):
                grammars[rid].accept_tokens(rid, [token])  # the end-of-sequence token ends it
        else:  # an end of sequence, or a stopped grammar, takes vLLM's own path (it ends the grammar)
            together: list[tuple[str, int]] = []
            alone: list[tuple[str, int]] = []
            for rid, token in zip(ids, tokens, strict=True):
                stops = token == eos or grammars[rid].ll_matcher.is_stopped()
                (alone if stops else together).append((rid, token))
            executor.consume_token_par([(grammars[rid].ll_matcher, token) for rid, token in together])
            for rid, _ in together:
                grammars[rid].check_error()
            for rid, token in alone:
                grammars[rid].accept_tokens(rid, [token])
            together_count += len(together)
        accepting += time.perf_counter() - t
    return times, digest.hexdigest(), accepting * 1e3, together_count


def measure(
    model: Path, requests: int, steps: int, threads: int | None = None, par_accepts: bool = False
) -> dict[str, Any]:
    """Each way's {"compile_ms", "masks_ms" (total), "step_ms" (median), "steps", "accept_ms",
    "accepted_together"} and the rows; raises where the two ways' masks differ. par_accepts:
    LocalMoE's way accepts with one native call a step."""
    from moe_core import vllm_masks

    out: dict[str, Any] = {"requests": requests}
    digests = []
    for way in ("vllm", "localmoe"):
        manager = manager_for(model, requests)
        installed = vllm_masks.install(manager, threads) if way == "localmoe" else None
        if way == "localmoe" and installed is None:
            raise RuntimeError("this vLLM's manager has not the seam moe_core/vllm_masks.py works through")
        add_requests(manager, 1, pool=[{"type": "string"}])  # the backend made first (its tokenizer read)
        before = installed.grammars.compiles if installed is not None else 0
        t = time.perf_counter()
        batch = add_requests(manager, requests)
        compile_ms = (time.perf_counter() - t) * 1e3
        executor = installed.fill.executor if installed is not None and par_accepts else None
        times, digest, accept_ms, together = decode(manager, batch, steps, executor=executor)
        digests.append(digest)
        out[way] = {
            "compile_ms": round(compile_ms, 1),
            "masks_ms": round(sum(times), 1),
            "step_ms": round(statistics.median(times), 2),
            "steps": len(times),
            "accept_ms": round(accept_ms, 1),
            "accepted_together": together,  # tokens accepted in the native call (--par-accepts)
        }
        if installed is not None:
            out[way] |= {"compiles": installed.grammars.compiles - before, "threads": installed.fill.threads}
    if digests[0] != digests[1]:
        raise AssertionError("the two ways wrote different masks")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a HF model directory; default: the tiny model, vocabulary 32,000")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, help="LocalMoE's fill threads (default: as the engine core picks)")
    p.add_argument("--par-accepts", action="store_true", help="LocalMoE's way accepts in one native call")
    args = p.parse_args()
    model = model_or_tiny(args.model, "localmoe-masks-")
    print(f"{args.requests} requests, up to {args.steps} steps, each way in turn…", flush=True)
    r = measure(model, args.requests, args.steps, args.threads, args.par_accepts)
    v, o = r["vllm"], r["localmoe"]
    print(f"{'':10s} {'compile':>10s} {'masks':>10s} {'per step':>10s}  steps  (accepts)")
    for name, w in (("vLLM", r["vllm"]), ("LocalMoE", r["localmoe"])):
        row = f"{w['compile_ms']:7.0f} ms {w['masks_ms']:7.0f} ms {w['step_ms']:7.2f} ms  {w['steps']}"
        row += f"  ({w['accept_ms']:.0f} ms)"
        print(f"{name:10s} {row}")
    v, o = r["vllm"], r["localmoe"]
    masks, compile_ = v["masks_ms"] / o["masks_ms"], v["compile_ms"] / o["compile_ms"]
    print(f"masks {masks:.2f}x faster, compile {compile_:.2f}x", end=" ")
    print(f"({o['compiles']} compiles, {o['threads']} threads)")
    if args.par_accepts:
        print(f"accepts {v['accept_ms'] / max(o['accept_ms'], 1e-9):.2f}x faster in one native call a step")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
