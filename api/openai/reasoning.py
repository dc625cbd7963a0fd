"""A reasoning model's thinking kept apart from its answer: the `reasoning` field of vLLM's chat
responses (`message.reasoning`, streamed as `delta.reasoning`).

Models write their thinking in one of two ways:
* think tags (Qwen3, QwQ, DeepSeek-R1 and V3.1, GLM-4.5: templates that write `<think>` and
  `</think>`): `<think>…</think>`, then the answer. Where the template opens the block in the
  prompt itself (the prompt ends with `<think>`: DeepSeek-R1, Qwen3's thinking-only models), the
  model starts inside it and writes only the closing tag.
* harmony (gpt-oss): the `analysis` channel (api/openai/harmony.py).
A model whose template has neither gives no reasoning: its whole text is the answer, as is an
answer that does not open with `<think>`. The blank between `</think>` and the answer is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

THINK_START, THINK_END = "<think>", "</think>"

Call = tuple[str, str]  # one parsed call: the function's name, its arguments as JSON text (OpenAI's)


def thinks(template: str | None) -> bool:
    """Does this chat template write think tags (its model reasons before it answers)?"""
    return template is not None and THINK_START in template and THINK_END in template


def opens_think(prompt: str) -> bool:
    """Does the prompt leave the model inside a think block (the template opened it)?"""
    return prompt.rstrip().endswith(THINK_START)


@dataclass
class Piece:
    """What a piece of an answer adds: reasoning, content (the answer's text) and calls."""

    reasoning: str = ""
    content: str = ""
    calls: list[Call] = field(default_factory=list)


class _Phase(Enum):
    START = 0  # nothing but blanks yet: a `<think>` may still open the answer
    REASONING = 1  # inside the think block
    GAP = 2  # after `</think>`, before the answer's first non-blank character
    CONTENT = 3  # the answer


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (0: none)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ThinkSplit:
    """Think-tag text split as it arrives: `feed` → (reasoning, content) certain so far, holding
    back only what could still be a tag; `flush` at the end → the rest (a block the length cut
    short is reasoning). Whole answers go through the same (`split`), so both agree."""

    inside: bool = False  # the prompt opened the block: the answer starts as reasoning
    _held: str = ""
    _phase: _Phase = field(init=False)

    def __post_init__(self) -> None:
        self._phase = _Phase.REASONING if self.inside else _Phase.START

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        reasoning = content = ""
        while self._held:
            if self._phase is _Phase.START:
                head = self._held.lstrip()
                if head.startswith(THINK_START):
                    self._held, self._phase = head[len(THINK_START) :], _Phase.REASONING
                elif THINK_START.startswith(head):  # blanks, or the tag's beginning: wait
                    break
                else:
                    self._phase = _Phase.CONTENT
            elif self._phase is _Phase.REASONING:
                at = self._held.find(THINK_END)
                if at < 0:
                    cut = len(self._held) - partial_suffix(self._held, THINK_END)
                    reasoning, self._held = reasoning + self._held[:cut], self._held[cut:]
                    break
                reasoning += self._held[:at]
                self._held, self._phase = self._held[at + len(THINK_END) :], _Phase.GAP
            elif self._phase is _Phase.GAP:
                self._held = self._held.lstrip()
                if self._held:
                    self._phase = _Phase.CONTENT
            else:
                content, self._held = content + self._held, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._phase is _Phase.REASONING:
            return held, ""
        return "", held.strip() if self._phase is _Phase.START else held

    def split(self, text: str) -> tuple[str, str]:
        """A whole answer → (reasoning, content)."""
        reasoning, content = self.feed(text)
        rest_reasoning, rest = self.flush()
        return reasoning + rest_reasoning, content + rest
