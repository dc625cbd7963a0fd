"""The frames a py-spy profile spent its samples in: `--profile` writes py-spy's raw format (one
line per distinct stack: frames joined by ';', then its sample count).

    python -m bench.spy_top prof/localmoe-chat-engine.raw [--top 15] [--match detokenize.py] [--modules]
        [--process EngineCore]

Prints the total, then the frames with the most samples of their own (self) and, with --match,
the share of samples whose stack passes through a frame containing that text (inclusive); with
--modules, self samples by where their frame's code lives: a library by its package (fastapi,
redis, asyncio), the project's own code by file (scheduler/modality.py; run from the repository).
With --process (a profile taken with py-spy's --subprocesses), only the stacks of processes whose
"process ..." frame contains that text, and every share of their samples; --thread likewise for
threads (a profile taken with --threads), and --within only the stacks that pass through a frame
containing that text (a loop's step, say: then every share is of the step's samples).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def module(frame: str) -> str:
    """'classify (scheduler/modality.py:574)' → 'scheduler/modality.py'; a library's frame → its
    package ('fastapi/routing.py' → 'fastapi')."""
    where = frame.rpartition(" (")[2].rstrip(")").rpartition(":")[0]
    top = where.split("/", 1)[0]
    return where if "/" in where and Path(top).is_dir() else top


def read(path: Path) -> list[tuple[list[str], int]]:
    """→ [(frames outermost first, samples)]."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():  # py-spy's raw output can hold a line torn by a failed read
            stacks.append((stack.split(";"), int(n)))
    return stacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", type=Path)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--match", action="append", default=[], help="text of a frame (repeatable)")
    ap.add_argument("--modules", action="store_true", help="self samples by package / project file")
    ap.add_argument("--process", help="only the processes whose py-spy process frame contains this")
    ap.add_argument("--thread", help="only the threads whose py-spy thread frame contains this")
    ap.add_argument("--within", help="only the stacks through a frame containing this")
    args = ap.parse_args()
    stacks = read(args.raw)
    if args.process:
        stacks = [(f, n) for f, n in stacks if any(x.startswith("process ") and args.process in x for x in f)]
    if args.thread:
        stacks = [(f, n) for f, n in stacks if any(x.startswith("thread ") and args.thread in x for x in f)]
    if args.within:
        stacks = [(f, n) for f, n in stacks if any(args.within in x for x in f)]
    total = sum(n for _, n in stacks) or 1
    own = Counter[str]()
    for frames, n in stacks:
        own[frames[-1]] += n
    print(f"{total} samples")
    for frame, n in own.most_common(args.top):
        print(f"  self {n / total:6.1%}  {frame}")
    if args.modules:
        by = Counter[str]()
        for frame, n in own.items():
            by[module(frame)] += n
        for name, n in by.most_common(args.top):
            print(f"  module {n / total:6.1%}  {name}")
    for text in args.match:
        n = sum(n for frames, n in stacks if any(text in f for f in frames))
        print(f"  through {text!r}: {n / total:.1%}")


if __name__ == "__main__":
    main()
