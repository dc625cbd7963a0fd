"""How good is a trained MoE (`localmoe model train`)? Held-out perplexity, code completion, experts.

    python -m bench.model_quality --model DIR [--baseline-random] [--headers 100] [--device auto]

Everything is measured on the held-out split of moe_build.train (the rule stored in the model's
training.json, re-applied to this machine's files, so the model never saw these packages):
  perplexity  — on held-out code and prose, next to a unigram baseline (token frequencies of the
                train split, add-one smoothed) and, with --baseline-random, the same architecture
                with random weights.
  headers     — `def name(args):` lines at module or class level of held-out Python files; the
                prompt is header + "\\n", the continuation 128 greedy tokens. lenient: header +
                continuation cut at its last complete line parses with `ast` (the whole continuation
                when the model stopped on </s>). strict: after every complete line, header + the lines
                so far parses (so a block may never be left open at a line end, and nothing is
                completed with `pass`). A method header is parsed inside a `class _:` so the
                continuation may end the class; the prompt carries no class.
  experts     — per layer, the share of top-k routing choices each expert gets on code and on prose,
                and the Jensen–Shannon divergence (base 2: 0 = same use, 1 = disjoint experts).
Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moe_build import train
from moe_core.loader import load_model

HELD_OUT_BYTES = 4_000_000  # read from held-out packages; evaluation uses `sequences` rows of it
UNIGRAM_BYTES = 4_000_000  # of the train split, for the unigram baseline


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def training_record(model_dir: Path) -> dict[str, Any]:
    """The model's training.json; for a model trained elsewhere, the defaults of moe_build.train."""
    path = Path(model_dir) / "training.json"
    if not path.is_file():
        return {"seq_len": 512, "split": {"held_out_share": train.HELD_OUT_SHARE}}
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def held_out_headers(texts: list[str], n: int) -> list[str]:
    """Up to `n` single-line function headers at module or class level, one file after another in
    turns so that no single file dominates."""
    per_file = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        nodes = list(tree.body) + [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body]
        headers = []
        for node in nodes:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            line = lines[node.lineno - 1].rstrip()
            if (
                line.lstrip().startswith(("def ", "async def "))
                and line.endswith(":")
                and node.body[0].lineno > node.lineno
            ):
                headers.append(line)
        if headers:
            per_file.append(headers)
    picked: list[str] = []
    for turn in range(max((len(h) for h in per_file), default=0)):
        picked += [h[turn] for h in per_file if turn < len(h)]
        if len(picked) >= n:
            break
    return picked[:n]


# --------------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------------


def unigram_loss(train_rows: torch.Tensor, rows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of add-one smoothed train-split token frequencies on `rows`."""
    counts = torch.bincount(train_rows.reshape(-1).long(), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[rows[:, 1:].reshape(-1).long()].mean())


def _source(header: str, lines: list[str]) -> str:
    text = "\n".join([header, *lines]) + "\n"
    return f"class _:\n{text}" if header[:1].isspace() else text


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def parse_checks(header: str, continuation: str, finished: bool) -> tuple[bool, bool]:
    """(lenient, strict) for one continuation; `finished`: the model stopped on </s>."""
    lines = continuation.split("\n")
    complete = lines if finished else lines[:-1]  # the last piece is cut mid-line unless finished
    lenient = _parses(_source(header, complete))
    strict = lenient and all(_parses(_source(header, complete[:k])) for k in range(1, len(complete)))
    return lenient, strict


def complete_headers(
    model: Any, tokenizer: Any, headers: list[str], max_new_tokens: int = 128, batch_size: int = 25
) -> list[tuple[str, bool]]:
    """Greedy continuations of header + "\\n": (text, stopped on </s>) per header."""
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    results = []
    for start in range(0, len(headers), batch_size):
        prompts = [h + "\n" for h in headers[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            finished = eos in row
            row = row[: row.index(eos)] if finished else row
            results.append((tokenizer.decode(row, skip_special_tokens=True), finished))
    return results


def expert_use(model: Any, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[layers, experts] share of top-k routing choices per expert over `rows`."""
    k = model.config.num_experts_per_tok
    total: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size].long().to(model.device)
            logits = model(input_ids=batch, output_router_logits=True).router_logits  # L × [T, E]
            chosen = torch.stack([layer.topk(k, dim=-1).indices for layer in logits])  # [L, T, k]
            counts = torch.nn.functional.one_hot(chosen, logits[0].shape[-1]).sum(dim=(1, 2)).double()
            total = counts if total is None else total + counts
    assert total is not None, "no rows"
    return (total / total.sum(dim=-1, keepdim=True)).cpu()


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Base-2 JSD along the last axis: 0 for equal distributions, 1 for disjoint ones."""
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / m).log2(), torch.zeros_like(a)).sum(dim=-1)

    return (kl(p) + kl(q)) / 2


@dataclass
class Quality:
    perplexity: dict[str, dict[str, float]]  # model → kind → perplexity
    headers: int
    lenient: float  # share of headers
    strict: float
    samples: list[dict[str, Any]]  # the first few continuations, for reading
    expert_use: dict[str, list[list[float]]]  # kind → [layer][expert]
    jsd: list[float]  # per layer


def measure(
    model_dir: Path,
    *,
    device: str = "cpu",
    headers: int = 100,
    sequences: int = 64,
    baseline_random: bool = False,
    held_out_bytes: int = HELD_OUT_BYTES,
    unigram_bytes: int = UNIGRAM_BYTES,
    progress: bool = False,
) -> Quality:
    model, tokenizer = load_model(model_dir, device=device)
    record = training_record(model_dir)
    seq_len, share = int(record["seq_len"]), float(record["split"]["held_out_share"])
    corpus = train.build_corpus(unigram_bytes, held_out_bytes, share, progress)
    rows = {
        kind: train.spread_rows(train.pack(tokenizer, corpus.texts["held_out"][kind], seq_len), sequences)
        for kind in (train.CODE, train.PROSE)
    }
    kinds = [k for k in rows if len(rows[k])]
    vocab = len(tokenizer)
    ppl: dict[str, dict[str, float]] = {"model": {}, "unigram": {}}
    for kind in kinds:
        ppl["model"][kind] = math.exp(train.held_out_loss(model, rows[kind], device, 8))
        train_rows = train.pack(tokenizer, corpus.texts["train"][kind], seq_len)
        ppl["unigram"][kind] = math.exp(unigram_loss(train_rows, rows[kind], vocab))
    if baseline_random:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        random_model = AutoModelForCausalLM.from_config(model.config).to(device)
        ppl["random"] = {k: math.exp(train.held_out_loss(random_model, rows[k], device, 8)) for k in kinds}

    prompts = held_out_headers(corpus.texts["held_out"][train.CODE], headers)
    results = complete_headers(model, tokenizer, prompts)
    checks = [parse_checks(h, text, done) for h, (text, done) in zip(prompts, results, strict=True)]
    use = {kind: expert_use(model, rows[kind][:16]) for kind in kinds}
    jsd = jensen_shannon(use[train.CODE], use[train.PROSE]).tolist() if len(kinds) == 2 else []
    return Quality(
        perplexity={m: {k: round(v, 2) for k, v in d.items()} for m, d in ppl.items()},
        headers=len(prompts),
        lenient=sum(c[0] for c in checks) / max(len(checks), 1),
        strict=sum(c[1] for c in checks) / max(len(checks), 1),
        samples=[
            {"header": h, "continuation": text, "lenient": c[0], "strict": c[1]}
            for h, (text, _), c in list(zip(prompts, results, checks, strict=True))[:5]
        ],
        expert_use={k: [[round(x, 4) for x in layer] for layer in v.tolist()] for k, v in use.items()},
        jsd=[round(x, 4) for x in jsd],
    )


def _table(q: Quality) -> str:
    lines = [f"{'perplexity':<12}" + "".join(f"{k:>10}" for k in (train.CODE, train.PROSE))]
    for name, d in q.perplexity.items():
        lines.append(
            f"{name:<12}" + "".join(f"{d.get(k, float('nan')):>10.2f}" for k in (train.CODE, train.PROSE))
        )
    lines.append(f"\nheaders: {q.headers}   parse lenient {q.lenient:.0%}   strict {q.strict:.0%}")
    lines.append("\nlayer  JSD(code, prose)  top experts code | prose")
    top = {
        k: [sorted(range(len(layer)), key=lambda e: -layer[e])[:3] for layer in v]
        for k, v in q.expert_use.items()
    }
    for i, jsd in enumerate(q.jsd):
        lines.append(f"{i:>5}  {jsd:>16.3f}  {top[train.CODE][i]} | {top[train.PROSE][i]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model directory written by `localmoe model train`")
    p.add_argument("--baseline-random", action="store_true", help="also the same model with random weights")
    p.add_argument("--headers", type=int, default=100, help="function headers to complete")
    p.add_argument("--sequences", type=int, default=64, help="held-out rows per kind for perplexity")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    q = measure(
        Path(args.model),
        device=device,
        headers=args.headers,
        sequences=args.sequences,
        baseline_random=args.baseline_random,
        progress=True,
    )
    print(_table(q), file=sys.stderr)
    print(json.dumps(asdict(q)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
