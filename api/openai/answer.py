"""An answer's text → what a chat choice carries: its reasoning, its content and its tool calls.

Which split applies is the model's (read off its chat template) and the request's:
* harmony (gpt-oss): channels (api/openai/harmony.py), with tools or without;
* otherwise think tags where the template writes them (api/openai/reasoning.py), then, when the
  request offers tools, the calls in what follows the thinking (api/openai/tools.py), in the
  format the template defines.
An answer with none of these is all content. `AnswerFormat.parse` splits a whole answer,
`AnswerStream` a streamed one as it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from api.openai.harmony import HarmonyStream
from api.openai.harmony import parse as harmony_parse
from api.openai.reasoning import Call, Piece, ThinkSplit
from api.openai.tools import ToolFormat, ToolStream


@dataclass(frozen=True)
class AnswerFormat:
    calls: ToolFormat  # the format the model writes calls in
    tools: bool = False  # the request offers tools: calls are read out of the answer
    think: bool = False  # the template writes think tags
    inside: bool = False  # the prompt opened a think block: the answer starts as reasoning
    parallel: bool = True  # several calls (false: the first only)

    @property
    def harmony(self) -> bool:
        return self.calls.body == "harmony"

    @property
    def splits(self) -> bool:
        """Is the answer anything but content as written?"""
        return self.tools or self.think or self.harmony

    @property
    def limit(self) -> int | None:
        """Calls given out at most (0: the request offered no tools, a call is not content either)."""
        return (None if self.parallel else 1) if self.tools else 0

    def parse(self, text: str) -> Piece:
        """A whole answer → its reasoning, content and calls."""
        if self.harmony:
            return harmony_parse(text, self.limit)
        reasoning, content = ThinkSplit(self.inside).split(text) if self.think else ("", text)
        if not self.tools:
            return Piece(reasoning, content)
        content, calls = self.calls.parse(content)
        return Piece(reasoning, content, calls[: self.limit])

    def stream(self) -> AnswerStream:
        return AnswerStream(self)


@dataclass
class AnswerStream:
    """A streamed answer split as it arrives: `feed` → what is certain so far, `flush` at the end →
    the rest; `calls`: every call given out."""

    format: AnswerFormat
    _harmony: HarmonyStream | None = field(init=False, default=None)
    _think: ThinkSplit | None = field(init=False, default=None)
    _tools: ToolStream | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        fmt = self.format
        if fmt.harmony:
            self._harmony = HarmonyStream(fmt.limit)
            return
        self._think = ThinkSplit(fmt.inside) if fmt.think else None
        self._tools = fmt.calls.stream(fmt.limit) if fmt.tools else None

    @property
    def calls(self) -> list[Call]:
        split = self._harmony or self._tools
        return split.calls if split is not None else []

    def feed(self, text: str) -> Piece:
        if self._harmony is not None:
            return self._harmony.feed(text)
        reasoning, content = self._think.feed(text) if self._think is not None else ("", text)
        return self._called(reasoning, content)

    def flush(self) -> Piece:
        if self._harmony is not None:
            return self._harmony.flush()
        reasoning, content = self._think.flush() if self._think is not None else ("", "")
        piece = self._called(reasoning, content)
        if self._tools is not None:
            rest, calls = self._tools.flush()
            piece.content, piece.calls = piece.content + rest, piece.calls + calls
        return piece

    def _called(self, reasoning: str, content: str) -> Piece:
        if self._tools is None:
            return Piece(reasoning, content)
        content, calls = self._tools.feed(content)
        return Piece(reasoning, content, calls)
