"""Does a model answer a chat turn like a chat model? Held-out chat requests, greedy, on the torch engine.

    python -m bench.chat_quality --model DIR [--requests 100] [--others 100] [--max-tokens 192]

The requests are moe_build.instruct's pairs of held-out packages (the split rule of moe_build.train,
re-applied to this machine's files: the model never saw them): `--requests` "Write a Python function
that …" turns, and `--others` of the other kinds ("What does this function do?" with the code, and
"Tell me about <a documentation heading>."). Each is rendered as the service renders a chat: the
model's own chat template, else the ChatML it falls back on (api/openai/chat_template.py), and run
greedy on the torch engine, special tokens skipped as the service's default:
  parses   — of the write requests: the reply's first ```python block (else the whole reply) parses
             with `ast` and defines a function
  leaked   — of all replies: a template marker in the text ("<|im", "im_start", "im_end")
  stopped  — of all replies: ended by the model (end of turn / EOS), not by --max-tokens
Prints a table, then one JSON object.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from api.openai.chat_template import render_chat
from api.openai.protocol import ChatMessage
from bench.model_quality import training_record
from moe_build import instruct, train
from moe_core.engine import FinishReason, GenerationRequest, SamplingParams
from moe_core.torch_engine import TorchEngine

HELD_OUT_BYTES = 4_000_000
MARKERS = ("<|im", "im_start", "im_end")
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


@dataclass
class ChatQuality:
    write_requests: int
    other_requests: int
    parses: float  # of write requests
    leaked: int  # replies with a template marker
    stopped: float  # of all replies
    template: str  # "model" or "chatml (fallback)"
    samples: list[dict[str, str]]  # a few (prompt, reply) pairs to read


def defines_a_function(reply: str) -> bool:
    """The reply's first python block (else the reply) parses and defines a function."""
    fenced = _FENCE.search(reply)
    code = fenced.group(1) if fenced else reply
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(tree))


def leaks(reply: str) -> bool:
    return any(marker in reply for marker in MARKERS)


def held_out_requests(
    writes: int, others: int, share: float, held_out_bytes: int = HELD_OUT_BYTES
) -> tuple[list[instruct.Pair], list[instruct.Pair]]:
    """Up to `writes` write pairs and `others` explain / prose pairs of held-out documents, taken
    evenly across them."""
    corpus = train.build_corpus(0, held_out_bytes, share, progress=False)
    pairs = instruct.make_pairs(corpus.texts["held_out"][train.CODE], corpus.texts["held_out"][train.PROSE])

    def spread(kind: set[str], n: int) -> list[instruct.Pair]:
        chosen = [p for p in pairs if p.kind in kind]
        step = max(1, len(chosen) // max(n, 1))
        return chosen[::step][:n]

    return spread({instruct.WRITE}, writes), spread({instruct.EXPLAIN, instruct.PROSE}, others)


def measure(
    model_dir: Path,
    *,
    requests: int = 100,
    others: int = 100,
    max_tokens: int = 192,
    device: str = "cpu",
    held_out_bytes: int = HELD_OUT_BYTES,
) -> ChatQuality:
    share = float(training_record(model_dir)["split"]["held_out_share"])
    writes, rest = held_out_requests(requests, others, share, held_out_bytes)
    engine = TorchEngine(model_dir, device=device, max_batch_size=32, telemetry=False)
    engine.load()
    has_template = bool(getattr(engine.tokenizer, "chat_template", None))
    pairs = writes + rest
    for i, pair in enumerate(pairs):  # rendered as the chat route renders them, stop strings too
        turn = [ChatMessage(role="user", content=pair.prompt)]
        rendered = asyncio.run(render_chat(model_dir, turn))
        prompt, stop = rendered.prompt, rendered.stop
        params = SamplingParams(max_tokens=max_tokens, stop=tuple(stop))
        engine.add_request(GenerationRequest(str(i), prompt, params))
    replies = [""] * len(pairs)
    finished: list[FinishReason | None] = [None] * len(pairs)
    done = 0
    while engine.has_unfinished():
        for delta in engine.step():
            i = int(delta.request_id)
            replies[i] += delta.text
            if delta.finish_reason is not None:
                finished[i] = delta.finish_reason
                done += 1
                print(f"\r{done}/{len(pairs)} replies", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    engine.close()
    parsed = sum(defines_a_function(r) for r in replies[: len(writes)])
    return ChatQuality(
        write_requests=len(writes),
        other_requests=len(rest),
        parses=parsed / max(len(writes), 1),
        leaked=sum(leaks(r) for r in replies),
        stopped=sum(f is FinishReason.STOP for f in finished) / max(len(pairs), 1),
        template="model" if has_template else "chatml (fallback)",
        samples=[{"prompt": pairs[i].prompt, "reply": replies[i]} for i in (0, len(writes))[: len(pairs)]],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=100, help='"Write a Python function that …" requests')
    p.add_argument("--others", type=int, default=100, help="explain and prose requests")
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    q = measure(
        Path(args.model),
        requests=args.requests,
        others=args.others,
        max_tokens=args.max_tokens,
        device=args.device,
    )
    replies = q.write_requests + q.other_requests
    print(
        "| template | write requests: reply defines a function | replies with a marker | ended by the model |"
    )
    print("|---|---|---|---|")
    print(
        f"| {q.template} | {q.parses:.0%} of {q.write_requests} | {q.leaked} of {replies} | {q.stopped:.0%} |"
    )
    print(json.dumps(asdict(q)))


if __name__ == "__main__":
    main()
