"""gpt-oss's harmony format: what the model writes after its prompt's `<|start|>assistant`.

An answer is a run of messages, each a header, `<|message|>`, a body and a terminator:
    <|channel|>analysis<|message|>Let me think…<|end|>
    <|start|>assistant<|channel|>final<|message|>The answer.<|return|>
and a tool call is a message to a function, ended by `<|call|>`:
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
    {"city": "Oslo"}<|call|>
(one line; `to=` may also stand before the channel). The client gets the `final` channel's bodies
as content, the `analysis` channel as reasoning (vLLM's `reasoning` field) and each function
message as a call; other commentary is none of these. The markers are special tokens of gpt-oss's
tokenizer: the chat route keeps their text for a harmony model (skip_special_tokens false). A text
with no message marker at all is content as written (a model that did not follow the format).

`parse` reads a whole answer; `HarmonyStream` the same incrementally, giving out the final and
analysis channels' text as it arrives and each call once its message has ended.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from api.openai.reasoning import Call, Piece, partial_suffix

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
TERMINATORS = ("<|end|>", "<|call|>", "<|return|>")
MAX_HEADER = 256  # characters before <|message|>: more means the model is not writing harmony
_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


def _header(header: str) -> tuple[str | None, str | None]:
    """A message's header → (its channel, the function it is addressed to)."""
    channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
    return (channel.group(1) if channel else None), (recipient.group(1) if recipient else None)


def _call(name: str, body: str) -> Call | None:
    try:
        arguments = json.loads(body)
    except ValueError:
        return None
    return (name, json.dumps(arguments, ensure_ascii=False)) if isinstance(arguments, dict) else None


def _terminator(text: str) -> tuple[int, str] | None:
    found = [(i, t) for t in TERMINATORS if (i := text.find(t)) >= 0]
    return min(found) if found else None


def _partial(text: str) -> int:
    """The length of the longest end of `text` that begins a terminator (held back while streaming)."""
    return max(partial_suffix(text, t) for t in TERMINATORS)


def parse(text: str, limit: int | None = None) -> Piece:
    """A whole answer → the analysis channel's text, the final channel's and the calls."""
    stream = HarmonyStream(limit)
    piece, rest = stream.feed(text), stream.flush()
    return Piece(
        (piece.reasoning + rest.reasoning).strip(),
        (piece.content + rest.content).strip(),
        piece.calls + rest.calls,
    )


@dataclass
class HarmonyStream:
    """A harmony answer split as it arrives: `feed` → the reasoning, content and calls certain so
    far, `flush` at the end → the rest. limit: calls given out at most (0 without tools: a call is
    not content)."""

    limit: int | None = None
    calls: list[Call] = field(default_factory=list)  # every call given out
    _held: str = ""
    _in_body: bool = False
    _channel: str | None = None
    _recipient: str | None = None
    _plain: bool = False  # no harmony here: everything is content

    def feed(self, text: str) -> Piece:
        self._held += text
        piece = Piece()
        while not self._plain:
            if not self._in_body:
                at = self._held.find(MESSAGE)
                if at < 0:
                    if len(self._held) > MAX_HEADER and not self.calls and not self._channel:
                        self._plain = True  # never a header: the model wrote plain text
                    break
                self._channel, self._recipient = _header(self._held[:at])
                self._held, self._in_body = self._held[at + len(MESSAGE) :], True
            end = _terminator(self._held)
            if end is None:
                if self._shown():  # give out what cannot be the start of a terminator
                    cut = len(self._held) - _partial(self._held)
                    self._body(piece, self._held[:cut])
                    self._held = self._held[cut:]
                break
            at, terminator = end
            body, self._held = self._held[:at], self._held[at + len(terminator) :]
            self._ended(piece, body)
            if self._held.startswith(START):
                self._held = self._held[len(START) :]
        if self._plain:
            piece.content, self._held = piece.content + self._held, ""
        piece.calls = self._give(piece.calls)
        return piece

    def flush(self) -> Piece:
        """The end of the answer: a body cut short (the length) ends there; a header alone is dropped."""
        held, self._held = self._held, ""
        if self._plain or (not self._in_body and not self._channel and not self.calls):
            return Piece(content=held)  # plain text, or nothing in harmony seen at all
        piece = Piece()
        if self._in_body:
            self._ended(piece, held)
            piece.calls = self._give(piece.calls)
        return piece

    def _shown(self) -> bool:
        """Is the message in progress text for the client (the answer, or the reasoning)?"""
        return self._recipient is None and self._channel in ("final", "analysis", None)

    def _body(self, piece: Piece, text: str) -> None:
        if self._channel == "analysis":
            piece.reasoning += text
        else:
            piece.content += text

    def _ended(self, piece: Piece, body: str) -> None:
        if self._recipient is not None:
            if (call := _call(self._recipient, body)) is not None:
                piece.calls.append(call)
        elif self._shown():
            self._body(piece, body)
        self._in_body, self._recipient = False, None

    def _give(self, calls: list[Call]) -> list[Call]:
        if self.limit is not None:
            calls = calls[: max(0, self.limit - len(self.calls))]
        self.calls += calls
        return calls
