"""gpt-oss's harmony answers (api/openai/harmony.py): the final channel as content, the analysis
channel as reasoning, calls from messages to functions; whole and streamed in pieces of any size."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from api.openai import harmony
from api.openai.reasoning import Piece

WEATHER_CALL = (
    "<|channel|>analysis<|message|>The user wants the weather; call the tool.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"city": "Oslo", "unit": "C"}<|call|>'
)
CASES: list[tuple[str, str, str, list[tuple[str, dict[str, Any]]]]] = [
    (  # reasoning, then the answer
        "<|channel|>analysis<|message|>2 + 2 is 4.<|end|><|start|>assistant<|channel|>final<|message|>"
        "It is 4.<|return|>",
        "2 + 2 is 4.",
        "It is 4.",
        [],
    ),
    (
        WEATHER_CALL,
        "The user wants the weather; call the tool.",
        "",
        [("get_weather", {"city": "Oslo", "unit": "C"})],
    ),
    (  # the recipient before the channel, as some answers put it
        " to=functions.now<|channel|>commentary json<|message|>{}<|call|>",
        "",
        "",
        [("now", {})],
    ),
    ("Plain words, no harmony at all.", "", "Plain words, no harmony at all.", []),
    ("<|channel|>final<|message|>Cut short by max_toke", "", "Cut short by max_toke", []),  # the length
    ("<|channel|>commentary to=functions.now<|message|>{not json<|call|>", "", "", []),  # no valid call
    ("<|channel|>commentary<|message|>A preamble to the user.<|end|>", "", "", []),  # neither
    (
        "<|channel|>analysis<|message|>Only thinking, then the length.",
        "Only thinking, then the length.",
        "",
        [],
    ),
]


@pytest.mark.parametrize(("text", "reasoning", "content", "calls"), CASES, ids=lambda v: str(v)[:40])
def test_answers_parse_whole_and_streamed(
    text: str, reasoning: str, content: str, calls: list[tuple[str, Any]]
) -> None:
    whole = harmony.parse(text)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    assert [(n, json.loads(a)) for n, a in whole.calls] == calls
    rng = random.Random(0)
    for _ in range(30):
        stream = harmony.HarmonyStream()
        streamed, at = Piece(), 0
        while at < len(text):
            step = rng.randint(1, 9)
            piece = stream.feed(text[at : at + step])
            streamed = Piece(
                streamed.reasoning + piece.reasoning,
                streamed.content + piece.content,
                streamed.calls + piece.calls,
            )
            at += step
        rest = stream.flush()
        reasoned, answered = streamed.reasoning + rest.reasoning, streamed.content + rest.content
        assert (reasoned.strip(), answered.strip(), streamed.calls + rest.calls) == (
            reasoning,
            content,
            whole.calls,
        )
        assert all(marker not in reasoned + answered for marker in ("<|", "|>", "analysis", "final"))


def test_the_channels_stream_as_they_arrive() -> None:
    stream = harmony.HarmonyStream()
    assert stream.feed("<|channel|>analysis<|message|>hmm") == Piece(reasoning="hmm")
    assert stream.feed(" ok<|e") == Piece(reasoning=" ok")  # a terminator's start is held back
    assert stream.feed("nd|><|start|>assistant<|channel|>final<|message|>Hel") == Piece(content="Hel")
    assert stream.feed("lo <|ret") == Piece(content="lo ")
    assert stream.feed("urn|>") == Piece()
    assert stream.flush() == Piece()


def test_calls_beyond_the_limit_are_not_given_out() -> None:
    two = WEATHER_CALL + "<|start|>assistant<|channel|>commentary to=functions.now<|message|>{}<|call|>"
    one = harmony.HarmonyStream(limit=1)
    assert [name for name, _ in one.feed(two).calls] == ["get_weather"]
    none = harmony.HarmonyStream(limit=0)  # a request without tools
    assert none.feed(two).calls == [] and none.calls == []
