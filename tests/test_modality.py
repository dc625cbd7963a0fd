"""Modality detection: the classes, languages, chat-style prompts, cost, and the eval-set figure."""

from __future__ import annotations

import time

import pytest

from scheduler.jobs import Modality
from scheduler.modality import _PLAN, HEAD_CHARS, TAIL_CHARS, _clip, _count, classify, detect

PY = "import os\n\n\ndef walk(root):\n    for d, _, files in os.walk(root):\n        yield d, files\n"
C = '#include <stdio.h>\n\nint main(void)\n{\n    printf("hi\\n");\n    return 0;\n}\n'
SH = '#!/bin/sh\nset -e\nfor f in "$@"; do\n    echo "$f" >&2\ndone\n'
SQL = "SELECT id, name\nFROM users\nWHERE age > 30\nORDER BY name;\n"
JS = (
    "const fs = require('fs');\nfunction read(p) {\n  return fs.readFileSync(p, 'utf8');\n}\n"
    "module.exports = read;\n"
)
RUST = (
    "use std::io;\n\nfn main() {\n    let mut s = String::new();\n"
    "    io::stdin().read_line(&mut s).unwrap();\n}\n"
)
GO = 'package main\n\nimport "fmt"\n\nfunc main() {\n\tx := 3\n\tfmt.Println(x)\n}\n'
PROSE = (
    "The scheduler assigns each job to a worker with free capacity. When no worker is free, the job\n"
    "waits on its queue until one reports ready again, so a burst of requests is smoothed out.\n"
)


@pytest.mark.parametrize(
    ("prompt", "language"),
    [(PY, "python"), (C, "c"), (SH, "shell"), (SQL, "sql"), (JS, "javascript"), (RUST, "rust"), (GO, "go")],
)
def test_code_and_its_language(prompt: str, language: str) -> None:
    d = classify(prompt)
    assert d.modality is Modality.CODE
    assert d.language == language


@pytest.mark.parametrize(
    "prompt",
    [
        "def f(x):",
        "def fibonacci(n):\n",
        "import os",
        "import os\n",
        "SELECT * FROM users WHERE id = 1;",
        "for i in range(10):",
        "#include <stdio.h>",
        "x = [i for i in range(3)]",
        "fn main() {",
        "console.log(x);",
    ],
)
def test_one_line_of_code_is_code(prompt: str) -> None:
    assert classify(prompt).modality is Modality.CODE  # completion prompts are often this short


def test_service_test_prompt() -> None:
    d = classify("def fibonacci(n):\n    if n < 2:\n")
    assert (d.modality, d.language) == (Modality.CODE, "python")


@pytest.mark.parametrize("prompt", ["x", "hello", "The quick brown fox"])
def test_short_phrase_is_text(prompt: str) -> None:
    assert classify(prompt).modality is Modality.TEXT


@pytest.mark.parametrize(
    "prompt",
    [
        PROSE,
        "Write a Python function that reverses a list.",
        "What is the difference between a process and a thread in Linux?",
        "hi",
        "Summarise the following meeting notes in three bullet points, please.",
    ],
)
def test_text(prompt: str) -> None:
    d = classify(prompt)
    assert d.modality is Modality.TEXT
    assert d.language is None


@pytest.mark.parametrize(
    ("prompt", "language"),
    [
        (f"Explain this code:\n```python\n{PY}```", "python"),
        (f"Why does this not compile?\n\n```\n{C}```", "c"),
        (f"{PROSE}\n{PY}", "python"),
        (f"{SH}\nWhat does this script do when one of the files is missing?", "shell"),
        (f"Is there a bug here?\n\n```rs\n{RUST}```\n\nI expected it to print the line.", "rust"),
    ],
)
def test_mixed(prompt: str, language: str) -> None:
    d = classify(prompt)
    assert d.modality is Modality.MIXED
    assert d.language == language


def test_trace_diff_and_json_are_code() -> None:
    trace = (
        "Traceback (most recent call last):\n"
        '  File "app.py", line 3, in <module>\n'
        "    main()\n"
        '  File "app.py", line 2, in main\n'
        "    int('x')\n"
        "ValueError: invalid literal for int() with base 10: 'x'\n"
    )
    diff = "diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n-a = 1\n+a = 2\n b = 3\n"
    data = '{\n  "name": "localmoe",\n  "workers": 2,\n  "tags": ["a", "b"]\n}\n'
    assert classify(trace) == classify(trace)  # deterministic
    assert (classify(trace).modality, classify(trace).language) == (Modality.CODE, "python")
    assert (classify(diff).modality, classify(diff).language) == (Modality.CODE, "diff")
    assert (classify(data).modality, classify(data).language) == (Modality.CODE, "json")


@pytest.mark.parametrize("prompt", ["", " ", "\n\n\t \n"])
def test_empty_is_text(prompt: str) -> None:
    assert classify(prompt).modality is Modality.TEXT
    assert detect(prompt) is Modality.TEXT


def test_detect_matches_classify() -> None:
    for p in (PY, PROSE, f"Explain this code:\n```\n{PY}```"):
        assert detect(p) is classify(p).modality


def test_long_prompt_is_capped() -> None:
    big = PY * 2000  # ~100 KB
    clipped = _clip(big)
    assert len(clipped) <= HEAD_CHARS + TAIL_CHARS + 1
    assert big.startswith(clipped.split("\n", 1)[0])
    t0 = time.perf_counter()
    assert classify(big).modality is Modality.CODE
    assert time.perf_counter() - t0 < 0.2  # generous: ~16 KB analysed, a few ms in practice


def test_eval_set_accuracy() -> None:
    from bench.modality_eval import build, evaluate

    try:
        samples = build(600, seed=1)
    except RuntimeError as e:  # a machine without source or prose files to cut from
        pytest.skip(str(e))
    report = evaluate(samples)
    assert report.n == 600
    # 600 samples, seeds 1-6: 97.0-98.0 % (seed 1: 97.5 %); 2000 samples, seed 7: 98.1 %.
    # The guard is the 95 % requirement, 2 points under the lowest seed: it catches regressions,
    # not seed noise or a machine with somewhat different files.
    assert report.accuracy >= 0.95, report.per_class


def test_rule_filters_skip_only_rules_without_a_match() -> None:
    """The language scoring runs a rule only where the strings each of its matches must contain are
    in the text, and a language only where its filters find one: over the eval set's samples and
    this file's prompts, every rule so skipped has no match there, and most are skipped (what the
    filters are for)."""
    from bench.modality_eval import build

    try:
        samples = build(600, seed=1)
    except RuntimeError as e:  # a machine without source or prose files to cut from
        pytest.skip(str(e))
    texts = [s.text for s in samples] + [PY, C, SH, SQL, JS, RUST, GO, PROSE]
    runs = skipped = matched = 0
    for text in texts:
        code = "\n" + text  # as the scoring sees code lines: a newline first (see _rule)
        for lang, (layers, rules) in _PLAN.items():
            language_off = any(layer.search(code) is None for layer in layers)
            for words, needs, rx, word_start, _ in rules:
                off = (
                    language_off
                    or any(w not in code for w in words)
                    or any(n.search(code) is None for n in needs)
                )
                found = _count(rx, word_start, code)
                assert not (off and found), (lang, rx.pattern, text[:200])
                runs += 1
                skipped += off
                matched += found > 0
    assert matched > 1000  # the set exercises the rules
    assert skipped > runs / 2, (skipped, runs)
