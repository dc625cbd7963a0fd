"""The instruction stage's data: chat turns made from this machine's own code and docs (no hub).

Three kinds of pair, each one user turn and the assistant's answer:
  write    "Write a Python function that <its docstring's first line>." → the function, fenced
  explain  "What does this function do?" + the function without its docstring → the docstring's
           first paragraph
  prose    "Tell me about <a documentation heading>." → the section's first paragraph

Pairs come from the corpus's split (moe_build.train): training pairs from train documents, the
held-out ones (bench/chat_quality.py asks them) from held-out packages only.

`encode` renders each pair through the tokenizer's chat template and packs the pairs into rows of
`seq_len` tokens: input ids [N, seq_len] and labels [N, seq_len], the labels -100 (no loss) on the
prompt and the padding, the answer's tokens and its closing <|im_end|> learned.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_build.checkpoint import IM_END

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

WRITE, EXPLAIN, PROSE = "write", "explain", "prose"
WRITE_PREFIX = "Write a Python function that "
EXPLAIN_PROMPT = "What does this function do?"
MAX_FUNCTION_LINES = 30
MAX_FUNCTION_CHARS = 1_500
MAX_ANSWER_CHARS = 600  # an explanation or a section's first paragraph
IGNORE = -100  # labels without loss (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Pair:
    kind: str  # WRITE, EXPLAIN or PROSE
    prompt: str  # the user's turn
    answer: str  # the assistant's


def _third_person(verb: str) -> str:
    """A docstring's imperative first word as after "a function that": Return → returns."""
    word = verb.lower()
    if word.endswith("s") and not word.endswith("ss"):
        return word  # "Returns ..." already
    if word.endswith(("ss", "sh", "ch", "x", "z", "o")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _summary(doc: str) -> str | None:
    """A docstring's first line as the rest of "a function that …", or None when it does not read
    as one (too short or long, a signature, a reference, not starting with a verb-like word)."""
    line = doc.strip().splitlines()[0].strip().rstrip(".").strip() if doc.strip() else ""
    words = line.split()
    if not 3 <= len(words) <= 20 or not re.fullmatch(r"[A-Z][a-z]+", words[0]):
        return None
    if any(c in line for c in "()[]{}=:`>") or line.endswith("-"):
        return None
    return " ".join([_third_person(words[0]), *words[1:]])


def _first_paragraph(doc: str) -> str | None:
    text = inspect.cleandoc(doc).split("\n\n")[0]
    flat = " ".join(text.split())
    return flat if 20 <= len(flat) <= MAX_ANSWER_CHARS else None


def function_pairs(source: str) -> list[Pair]:
    """WRITE and EXPLAIN pairs for each top-level function of `source` that has a docstring and at
    most MAX_FUNCTION_LINES lines ([] for a file that does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    pairs: list[Pair] = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.end_lineno is None:
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            continue
        code = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        if len(code) > MAX_FUNCTION_CHARS or node.col_offset:
            continue
        if (summary := _summary(doc)) is not None:
            pairs.append(Pair(WRITE, f"{WRITE_PREFIX}{summary}.", f"```python\n{code}\n```"))
        first = node.body[0]  # the docstring's statement
        assert first.end_lineno is not None
        bare = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        if len(node.body) > 1 and (explained := _first_paragraph(doc)) is not None:
            shown = "\n".join(bare)
            pairs.append(Pair(EXPLAIN, f"{EXPLAIN_PROMPT}\n```python\n{shown}\n```", explained))
    return pairs


_MD_HEADING = re.compile(r"^#{1,3} +(.+?) *#*$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'*+#])\1{2,}$")


def prose_pairs(text: str) -> list[Pair]:
    """PROSE pairs for each Markdown (#, ##, ###) or reStructuredText (underlined) heading of `text`
    followed by a paragraph of plain prose."""
    lines = text.splitlines()
    pairs: list[Pair] = []
    for i, line in enumerate(lines):
        heading = None
        if m := _MD_HEADING.match(line):
            heading, start = m.group(1), i + 1
        elif (
            i + 1 < len(lines)
            and _RST_UNDERLINE.match(lines[i + 1])
            and 3 <= len(line.strip()) <= len(lines[i + 1])
        ):
            heading, start = line.strip(), i + 2
        if heading is None or not 2 <= len(heading.split()) <= 8 or not heading[0].isalpha():
            continue
        while start < len(lines) and not lines[start].strip():
            start += 1
        paragraph: list[str] = []
        while start < len(lines) and lines[start].strip():
            paragraph.append(lines[start].strip())
            start += 1
        answer = " ".join(paragraph)
        plain = answer[:1].isalpha() and not re.search(r"[`|*<>{}\\]|\.\. |::|https?:", answer)
        if plain and 40 <= len(answer) <= MAX_ANSWER_CHARS and answer.endswith((".", "!", "?")):
            pairs.append(Pair(PROSE, f"Tell me about {heading.rstrip(':.')}.", answer))
    return pairs


def make_pairs(code: list[str], prose: list[str]) -> list[Pair]:
    """Every pair of these documents, in document order."""
    return [p for text in code for p in function_pairs(text)] + [
        p for text in prose for p in prose_pairs(text)
    ]


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The user turn rendered by the tokenizer's chat template, the assistant's turn opened."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return str(rendered)


def encode(
    tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (input ids, labels), each [N, seq_len] int64: the pairs rendered (prompt, answer, <|im_end|>)
    and packed whole into rows in order, a pair that does not fit starting the next row; a pair
    longer than a row is left out. Padding: the pad id, label IGNORE."""
    import torch

    pad = tokenizer.pad_token_id
    assert isinstance(pad, int)
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for pair in pairs:
        prompt = tokenizer(prompt_text(tokenizer, pair.prompt), add_special_tokens=False)["input_ids"]
        answer = tokenizer(pair.answer + IM_END, add_special_tokens=False)["input_ids"]
        if len(prompt) + len(answer) > seq_len:
            continue
        if len(ids) + len(prompt) + len(answer) > seq_len:
            rows.append((ids, labels))
            ids, labels = [], []
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    if ids:
        rows.append((ids, labels))
    x = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        x[i, : len(row_ids)] = torch.tensor(row_ids)
        y[i, : len(row_labels)] = torch.tensor(row_labels)
    return x, y
