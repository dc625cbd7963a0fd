"""Modality detection: is a prompt prose, source code, or both? A cheap line-level heuristic."""

from __future__ import annotations

import re

from scheduler.jobs import Modality

# A line "looks like code" when it matches one of these; prose lines are the rest with words.
_CODE_LINE = re.compile(
    r"""^\s*(
        (def|class|import|from|return|if|elif|else|for|while|try|except|with|async|await|yield|
         fn|let|const|var|func|package|public|private|static|void|int|struct|enum|impl|use|
         \#include|\#define|SELECT|INSERT|UPDATE|CREATE)\b
      | [\w.\[\]]+\s*(=|\+=|-=|:=)\s*\S
      | [}\])]+;?\s*$
      | .*[;{]\s*$
      | .*\):\s*$
      | //|/\*|\#\s
    )""",
    re.VERBOSE,
)
_FENCE = re.compile(r"^\s*```")


def detect(prompt: str) -> Modality:
    code = prose = 0
    in_fence = False
    for line in prompt.splitlines() or [prompt]:
        if _FENCE.match(line):
            in_fence = not in_fence
            code += 1
            continue
        if not line.strip():
            continue
        if in_fence or _CODE_LINE.match(line):
            code += 1
        elif len(line.split()) >= 3:
            prose += 1
        else:
            code += 1 if re.search(r"[(){}\[\]=<>]", line) else 0
            prose += 0 if re.search(r"[(){}\[\]=<>]", line) else 1
    if code and prose:
        return (
            Modality.MIXED
            if min(code, prose) / (code + prose) >= 0.2
            else (Modality.CODE if code > prose else Modality.TEXT)
        )
    return Modality.CODE if code else Modality.TEXT
