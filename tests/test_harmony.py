"""gpt-oss's harmony answers (api/openai/harmony.py): the final channel as content, calls from
messages to functions, reasoning left out; whole and streamed in pieces of any size."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from api.openai import harmony
from api.openai.tools import HARMONY

WEATHER_CALL = (
    "<|channel|>analysis<|message|>The user wants the weather; call the tool.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"city": "Oslo", "unit": "C"}<|call|>'
)
CASES: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
    (  # reasoning, then the answer: only the answer is content
        "<|channel|>analysis<|message|>2 + 2 is 4.<|end|><|start|>assistant<|channel|>final<|message|>"
        "It is 4.<|return|>",
        "It is 4.",
        [],
    ),
    (WEATHER_CALL, "", [("get_weather", {"city": "Oslo", "unit": "C"})]),
    (  # the recipient before the channel, as some answers put it
        " to=functions.now<|channel|>commentary json<|message|>{}<|call|>",
        "",
        [("now", {})],
    ),
    ("Plain words, no harmony at all.", "Plain words, no harmony at all.", []),
    ("<|channel|>final<|message|>Cut short by max_toke", "Cut short by max_toke", []),  # the length
    ("<|channel|>commentary to=functions.now<|message|>{not json<|call|>", "", []),  # no valid call
    ("<|channel|>analysis<|message|>Only thinking, then the length.", "", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES, ids=lambda v: str(v)[:40])
def test_answers_parse_whole_and_streamed(text: str, content: str, calls: list[tuple[str, Any]]) -> None:
    got_content, got_calls = HARMONY.parse(text)
    assert got_content == content
    assert [(n, json.loads(a)) for n, a in got_calls] == calls
    rng = random.Random(0)
    for _ in range(30):
        stream = HARMONY.stream()
        streamed, streamed_calls, at = "", [], 0
        pieces = []
        while at < len(text):
            step = rng.randint(1, 9)
            piece, more = stream.feed(text[at : at + step])
            pieces.append(piece)
            streamed, streamed_calls, at = streamed + piece, streamed_calls + more, at + step
        piece, more = stream.flush()
        streamed, streamed_calls = streamed + piece, streamed_calls + more
        assert (streamed.strip(), streamed_calls) == (content, got_calls)
        assert all(marker not in streamed for marker in ("<|", "|>", "analysis"))


def test_the_final_channel_streams_as_it_arrives() -> None:
    stream = harmony.HarmonyStream()
    assert stream.feed("<|channel|>analysis<|message|>hmm") == ("", [])  # reasoning: held, never given
    assert stream.feed("<|end|><|start|>assistant<|channel|>final<|message|>Hel") == ("Hel", [])
    assert stream.feed("lo <|ret") == ("lo ", [])  # a terminator's start is held back
    assert stream.feed("urn|>") == ("", [])
    assert stream.flush() == ("", [])


def test_calls_beyond_the_limit_are_not_given_out() -> None:
    two = WEATHER_CALL + "<|start|>assistant<|channel|>commentary to=functions.now<|message|>{}<|call|>"
    one = harmony.HarmonyStream(limit=1)
    assert [name for name, _ in one.feed(two)[1]] == ["get_weather"]
    none = harmony.HarmonyStream(limit=0)  # a request without tools
    assert none.feed(two) == ("", []) and none.calls == []
