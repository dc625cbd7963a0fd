"""The instruction stage tried with several settings on one pre-trained model (issue 25): for each
variant, `moe_build.train.instruct_from` with its `InstructSettings`, then what the issue asks of
the result: the held-out write requests' parse rate and markers (bench.chat_quality) and the
header parse rate and perplexity (bench.model_quality). One table, one row per variant; the
pre-trained model's own row first.

    python -m bench.instruct_sweep --pre PRE --out DIR --device cuda \\
        --variant recipe: --variant long:patience=20 --variant slack4:code_slack=0.04,patience=20

A variant is NAME:FIELD=VALUE,... over InstructSettings' fields (none: the recipe's). Choosing a
variant by these figures and reporting the same figures flatters it a little: confirm the chosen
one with `bench.chat_quality --requests 200` and `bench.model_quality --headers 300`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bench import chat_quality, model_quality
from moe_build import train


def parse_variant(text: str) -> tuple[str, train.InstructSettings]:
    """ "NAME:FIELD=VALUE,..." → (NAME, those settings over the recipe's)."""
    name, _, spec = text.partition(":")
    kinds = {f.name: type(getattr(train.InstructSettings(), f.name)) for f in fields(train.InstructSettings)}
    values: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise ValueError(f"{key!r} is not an InstructSettings field ({', '.join(kinds)})")
        values[key] = kinds[key](value)
    if not name:
        raise ValueError(f"variant {text!r} has no name (NAME:FIELD=VALUE,...)")
    return name, train.InstructSettings(**values)


def measure(model: Path, device: str, requests: int, others: int, headers: int) -> dict[str, Any]:
    chat = chat_quality.measure(model, requests=requests, others=others, device=device)
    quality = model_quality.measure(model, device=device, headers=headers)
    return {
        "parses": chat.parses,
        "leaked": chat.leaked,
        "stopped": chat.stopped,
        "headers_lenient": quality.lenient,
        "perplexity_code": quality.perplexity["model"]["code"],
    }


def sweep(
    pre: Path,
    out: Path,
    variants: list[tuple[str, train.InstructSettings]],
    *,
    device: str = "cpu",
    minutes: float | None = None,
    steps: int | None = None,
    requests: int = 100,
    others: int = 100,
    headers: int = 100,
) -> list[dict[str, Any]]:
    """Rows: the pre-trained model's, then each variant's (its stage's report beside its figures)."""
    rows = [{"variant": "pre-trained", **measure(pre, device, requests, others, headers)}]
    for i, (name, settings) in enumerate(variants, 1):
        print(f"[{i}/{len(variants)}] {name}: {asdict(settings)}", flush=True)
        stage = train.instruct_from(
            pre, out / name, device=device, minutes=minutes, instruct_steps=steps,
            overwrite=True, progress=False, settings=settings,
        )  # fmt: skip
        figures = measure(out / name, device, requests, others, headers)
        rows.append(
            {
                "variant": name,
                "settings": asdict(settings),
                "steps": stage.steps,
                "kept_step": stage.kept_step,
                "answers_after": round(stage.answers_after, 4),
                "code_after": round(stage.code_after, 4),
                **figures,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | steps (kept) | held-out code | write requests parse | markers | ended "
        "| headers parse | ppl code |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = f"{r['steps']} ({r['kept_step']})" if "steps" in r else "–"
        code = f"{r['code_after']:.3f}" if "code_after" in r else "–"
        lines.append(
            f"| {r['variant']} | {kept} | {code} | {r['parses']:.0%} | {r['leaked']} | {r['stopped']:.0%} "
            f"| {r['headers_lenient']:.0%} | {r['perplexity_code']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pre", type=Path, required=True, help="a model pre-trained with --instruct-minutes 0")
    p.add_argument("--out", type=Path, required=True, help="each variant's model goes to OUT/NAME")
    p.add_argument("--variant", action="append", default=[], help="NAME:FIELD=VALUE,... (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--minutes", type=float, help="each stage's budget (the preset's if unset)")
    p.add_argument("--steps", type=int, help="each stage's steps instead of minutes")
    p.add_argument("--requests", type=int, default=100, help="held-out write requests")
    p.add_argument("--others", type=int, default=100, help="held-out explain / prose requests")
    p.add_argument("--headers", type=int, default=100, help="held-out function headers")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant or ["recipe:"]]
    rows = sweep(
        args.pre, args.out, variants, device=args.device, minutes=args.minutes, steps=args.steps,
        requests=args.requests, others=args.others, headers=args.headers,
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
