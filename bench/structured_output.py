"""Structured outputs at scale: do N schema-constrained requests all give valid JSON, and what does
the constraint cost the engine?

N requests (default 1,000), each with one of `--schemas` distinct JSON schemas of the shapes
extraction pipelines send (nested objects, arrays of objects, enums, required and optional fields,
bounded strings and integers, patterns), sampled (temperature 0.8, seeded; `--sampling greedy`:
temperature 0), all added at once to one engine built as a worker builds it (torch on CPU, vLLM on
a GPU). Every output is parsed and validated against its schema (`jsonschema`); one that fails, or
that max_tokens cut short, counts as invalid.

The cost: the same requests without a constraint, each asked for exactly the tokens its
constrained twin made (ignore_eos), so both runs do the same steps over the same batch; rounds
alternate constrained / plain, after an untimed warm-up of both (`--warm-up`: the kernels a step
size meets first compiled, the grammars cached, before round 1). Prints tokens/s of each, their
ratio, each phase's engine steps (how many, tokens each: about the rows a step ran, ms each) and
the grammar compiles.

    python -m bench.structured_output [--model DIR] [--backend torch|vllm] [--requests 1000]
        [--schemas 50] [--rounds 2] [--masks parallel|in-turn|vllm] [--sampling seeded|greedy] [--step-times]
        [--out result.json]

With --step-times (vLLM) the engine core times its scheduler's calls per step
(bench/engine_core_steps.py): each phase's steps' mean period, schedule, update, masks and the
rest (the model runner), so a GPU run says which of them the constraint makes longer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema

from bench import engine_core_steps
from moe_core.engine import Engine, FinishReason, GenerationRequest, SamplingParams


def _string(max_length: int, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **extra}


def _integer(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


# The shapes: strings, arrays and integers bounded, so that even a random model's answer is
# complete well within max_tokens (an unbounded string is the model's to end).
BASES: list[dict[str, Any]] = [
    _object(  # a person, nested address
        {
            "name": _string(12),
            "age": _integer(0, 120),
            "role": {"enum": ["admin", "editor", "viewer"]},
            "address": _object(
                {
                    "city": _string(10),
                    "zip": _string(5, pattern="^[0-9]{5}$"),
                    "country": {"enum": ["DE", "FR", "US"]},
                },
                ["city", "country"],
            ),
            "email": _string(20),
        },
        ["name", "role", "address"],
    ),
    _object(  # an order: an array of line items
        {
            "order_id": _string(8, pattern="^[A-Z]{2}[0-9]{4}$"),
            "status": {"enum": ["open", "paid", "shipped", "cancelled"]},
            "items": {
                "type": "array",
                "items": _object(
                    {"sku": _string(6), "qty": _integer(1, 99), "cents": _integer(0, 99999)}, ["sku", "qty"]
                ),
                "minItems": 1,
                "maxItems": 3,
            },
            "gift": {"type": "boolean"},
        },
        ["order_id", "status", "items"],
    ),
    _object(  # a code review comment
        {
            "file": _string(16),
            "line": _integer(1, 5000),
            "severity": {"enum": ["info", "warning", "error"]},
            "message": _string(24),
            "suggestion": {"anyOf": [_string(24), {"type": "null"}]},
        },
        ["file", "line", "severity", "message"],
    ),
    _object(  # an event with tags
        {
            "title": _string(16),
            "date": _string(10, pattern="^2026-[01][0-9]-[0-3][0-9]$"),
            "tags": {"type": "array", "items": _string(6), "maxItems": 4},
            "attendees": _integer(0, 500),
            "online": {"type": "boolean"},
        },
        ["title", "date", "online"],
    ),
    _object(  # a classification
        {
            "label": {"enum": ["bug", "feature", "question", "docs"]},
            "confidence": _integer(0, 100),
            "reasons": {
                "type": "array",
                "items": {"enum": ["stack trace", "request", "how to", "typo"]},
                "maxItems": 2,
            },
        },
        ["label", "confidence"],
    ),
]

WARM_UP = 256  # requests of the warm-up (each way)
WARM_UP_TOKENS = 24
PROMPTS = [
    "Extract the record as JSON:\n",
    "def parse(record):\n    # returns the fields as JSON\n",
    "Ticket: the build fails with a stack trace in parser.py. Answer in JSON:",
    "Summarize the meeting on 2026-03-14 as JSON:",
    "Order 42: two widgets and one gadget, paid. JSON:",
]


def _without_patterns(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_patterns(v) for k, v in schema.items() if k != "pattern"}
    return [_without_patterns(v) for v in schema] if isinstance(schema, list) else schema


def schemas(count: int, seed: int = 0, patterns: bool = True) -> list[dict[str, Any]]:
    """`count` distinct schemas: the bases, then variants (another required set, a field left out).
    patterns=False: no string patterns (xgrammar refuses a pattern beside a length bound)."""
    rng = random.Random(seed)
    bases = BASES if patterns else [_without_patterns(b) for b in BASES]
    out = [copy.deepcopy(b) for b in bases[:count]]
    while len(out) < count:
        variant = copy.deepcopy(rng.choice(bases))
        names = list(variant["properties"])
        dropped = rng.choice(names)
        del variant["properties"][dropped]
        kept = [n for n in names if n != dropped]
        variant["required"] = sorted(rng.sample(kept, rng.randint(1, len(kept))))
        variant["title"] = f"variant-{len(out)}"  # distinct even where the sample repeats
        out.append(variant)
    return out


def run(
    engine: Engine, requests: list[GenerationRequest]
) -> tuple[float, dict[str, tuple[str, int, FinishReason | None]], int]:
    """Add every request, step until done. → (seconds, id → (text, tokens, finish reason), the
    engine's steps meanwhile)."""
    texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
    done: dict[str, tuple[str, int, FinishReason | None]] = {}
    steps = engine.stats().steps
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for d in engine.step():
            texts[d.request_id].append(d.text)
            if d.finish_reason is not None:
                done[d.request_id] = ("".join(texts[d.request_id]), d.completion_tokens, d.finish_reason)
    return time.perf_counter() - start, done, engine.stats().steps - steps


def _sampling(how: str, i: int) -> dict[str, Any]:
    """Request i's sampling, the same for its constrained and plain twins."""
    return {"temperature": 0.8, "seed": i} if how == "seeded" else {"temperature": 0.0}


def _core(
    step_file: Path | None, before: dict[str, Any] | None, kind: str
) -> tuple[dict[str, float] | None, dict[str, Any] | None]:
    """A phase's engine-core times per step of `kind` since `before`, and the totals now."""
    if step_file is None or before is None:
        return None, None
    now = engine_core_steps.read(step_file)
    return engine_core_steps.per_step(before, now, kind), now


def _steps(steps: int, tokens: int, seconds: float) -> str:
    """A phase's engine steps: how many, tokens (about the rows) each, ms each."""
    if not steps:
        return "not counted"
    return f"{steps} ({tokens / steps:.1f} tokens, {1000 * seconds / steps:.2f} ms each)"


def warm_up(requests: list[GenerationRequest], structured: bool) -> list[GenerationRequest]:
    """`requests` as WARM_UP_TOKENS-token requests (ids "w…"), constrained as they are or plain."""
    out = []
    for r in requests:
        params = dataclasses.replace(r.params, max_tokens=WARM_UP_TOKENS)
        if not structured:
            params = dataclasses.replace(params, structured=None, ignore_eos=True)
        rid = f"w{'c' if structured else 'p'}{r.request_id}"
        out.append(dataclasses.replace(r, request_id=rid, params=params))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a HF model directory; default: build the tiny test model")
    ap.add_argument("--backend", default="torch", choices=["torch", "vllm"])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--schemas", type=int, default=50, help="distinct schemas among the requests")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256, help="the engine's max batch size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--warm-up",
        type=int,
        default=WARM_UP,
        help="requests run constrained, then plain, before the timed rounds (24 tokens each; untimed): "
        "kernels a step size meets first are compiled then, not in round 1's constrained phase, and the "
        "schemas' grammars are compiled (as a server that has seen them holds them); 0: none",
    )
    ap.add_argument("--gpu-share", type=float, default=0.4, help="vLLM gpu_memory_utilization")
    ap.add_argument("--no-patterns", action="store_true", help="schemas without string patterns")
    ap.add_argument(
        "--so-backend",
        default="guidance",
        choices=["guidance", "xgrammar"],
        help="vLLM's structured-output backend",
    )
    ap.add_argument(
        "--masks",
        default="parallel",
        choices=["parallel", "in-turn", "vllm"],
        help="how vLLM's engine core fills a step's masks (engine.vllm.structured_masks)",
    )
    ap.add_argument(
        "--sampling",
        default="seeded",
        choices=["seeded", "greedy"],
        help="seeded: temperature 0.8, a seed per request (vLLM draws each seeded row's noise apart); "
        "greedy: temperature 0, as extraction pipelines mostly ask",
    )
    ap.add_argument(
        "--step-times",
        action="store_true",
        help="vLLM: time the engine core's scheduler calls per step (bench/engine_core_steps.py)",
    )
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()

    from host.settings import Settings
    from workers.engine_setup import construct

    if args.model:
        model = Path(args.model)
    else:
        from moe_build.checkpoint import build_checkpoint

        model = build_checkpoint(
            Path(tempfile.mkdtemp(prefix="localmoe-structured-")) / "model", progress=False
        )
    settings = Settings()
    settings.engine.max_batch_size = args.batch
    settings.engine.vllm.gpu_memory_utilization = args.gpu_share
    settings.engine.vllm.structured_outputs_backend = args.so_backend
    settings.engine.vllm.structured_masks = args.masks
    step_file: Path | None = None
    if args.step_times:
        if args.backend != "vllm":
            ap.error("--step-times times vLLM's engine core: --backend vllm")
        from moe_core import vllm_masks

        step_file = Path(tempfile.mkdtemp(prefix="localmoe-steps-")) / "steps.json"
        os.environ[engine_core_steps.STEP_TIMES] = str(step_file)
        os.environ[engine_core_steps.STEP_MASKS] = args.masks  # which ways its scheduler takes
        vllm_masks.SCHEDULER = engine_core_steps.SCHEDULER  # the engine hands vLLM the timed one
        settings.engine.vllm.structured_masks = "parallel"  # (so that it hands vLLM a scheduler_cls)
    device = "cpu"
    if args.backend == "vllm":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        settings.engine.vllm.enforce_eager = device == "cpu"
    engine = construct(args.backend, model, device, settings.engine)
    print(f"[engine] loading {args.backend} on {device}", flush=True)
    engine.load()
    pool = schemas(args.schemas, patterns=not args.no_patterns)
    specs = [pool[i % len(pool)] for i in range(args.requests)]
    constrained = [
        GenerationRequest(
            f"c{i}",
            PROMPTS[i % len(PROMPTS)],
            SamplingParams(
                max_tokens=args.max_tokens,
                **_sampling(args.sampling, i),
                structured=("json", json.dumps(spec)),
            ),
        )
        for i, spec in enumerate(specs)
    ]
    rounds: list[dict[str, Any]] = []
    invalid: list[str] = []
    cut = 0
    warmed = [0, 0]  # tokens the warm-up made, constrained and plain
    try:
        if args.warm_up:
            n = min(args.warm_up, len(constrained))
            print(f"[warm-up] {n} requests constrained, then plain", flush=True)
            for i, structured in enumerate((True, False)):
                _, done, _ = run(engine, warm_up(constrained[: args.warm_up], structured))
                warmed[i] = sum(tokens for _, tokens, _ in done.values())
        for r in range(args.rounds):
            core = engine_core_steps.read(step_file) if step_file else None
            t_c, got, steps_c = run(engine, constrained)
            core_c, core = _core(step_file, core, "structured")
            for i, spec in enumerate(specs):
                text, _, reason = got[f"c{i}"]
                if reason != FinishReason.STOP:
                    cut += 1
                    invalid.append(f"c{i} {reason}: {text[:80]!r}")
                    continue
                try:
                    jsonschema.validate(json.loads(text), spec)
                except (ValueError, jsonschema.ValidationError) as e:
                    invalid.append(f"c{i}: {str(e)[:120]} in {text[:80]!r}")
            plain = [
                GenerationRequest(
                    f"p{i}",
                    PROMPTS[i % len(PROMPTS)],
                    SamplingParams(
                        max_tokens=got[f"c{i}"][1], **_sampling(args.sampling, i), ignore_eos=True
                    ),
                )
                for i in range(len(specs))
            ]
            t_p, plain_got, steps_p = run(engine, [p for p in plain if p.params.max_tokens > 0])
            core_p, _ = _core(step_file, core, "plain")
            tokens = sum(n for _, n, _ in got.values())
            assert sum(n for _, n, _ in plain_got.values()) == tokens
            rounds.append(
                {
                    "constrained_tok_s": tokens / t_c,
                    "plain_tok_s": tokens / t_p,
                    "tokens": tokens,
                    "constrained_steps": steps_c,
                    "plain_steps": steps_p,
                    **({"constrained_core": core_c, "plain_core": core_p} if step_file else {}),
                }
            )
            print(
                f"  round {r + 1}: {len(specs)} requests, {tokens} tokens; constrained "
                f"{tokens / t_c:8.0f} tok/s, plain {tokens / t_p:8.0f} tok/s, ratio {t_p / t_c:.3f}; "
                f"invalid so far {len(invalid)}\n"
                f"    engine steps: constrained {_steps(steps_c, tokens, t_c)}, "
                f"plain {_steps(steps_p, tokens, t_p)}",
                flush=True,
            )
            if step_file:
                print(f"    engine core, ms a step: constrained {core_c}\n      plain {core_p}", flush=True)
    finally:
        engine.close()
    ratio = statistics.median(
        r["constrained_tok_s"] / r["plain_tok_s"] if r["plain_tok_s"] else 0.0 for r in rounds
    )
    summary = {
        "backend": "torch" if args.backend == "torch" else f"vllm ({args.so_backend}, {args.masks} masks)",
        "sampling": args.sampling,
        "device": device,
        "requests": args.requests,
        "distinct_schemas": len(pool),
        "rounds": rounds,
        "outputs_checked": args.requests * args.rounds,
        "invalid": len(invalid),
        "cut_by_max_tokens": cut,
        "constrained_over_plain": round(ratio, 4),
        "compiles": getattr(getattr(engine, "_grammars", None), "compiles", None),
        "warm_up": min(args.warm_up, len(constrained)),
        "warm_up_tokens": warmed,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))
    for line in invalid[:10]:
        print("  invalid:", line)
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "invalid_examples": invalid[:20]}, indent=1))
    sys.exit(1 if invalid else 0)


if __name__ == "__main__":
    main()
