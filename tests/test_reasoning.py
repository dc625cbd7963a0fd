"""A reasoning model's thinking apart from its answer (api/openai/reasoning.py, api/openai/answer.py):
think tags split whole and streamed in pieces of any size, calls read only after the thinking, and
through the whole service the `reasoning` field, `include_reasoning`, `chat_template_kwargs`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from api.openai.answer import AnswerFormat
from api.openai.reasoning import Piece, ThinkSplit, opens_think, thinks
from api.openai.tools import HERMES, QWEN3_CODER
from tests.test_openai import job_id

# (text, the prompt opened the block, reasoning, content)
CASES: list[tuple[str, bool, str, str]] = [
    ("<think>\nAdd them.\n</think>\n\nIt is 4.", False, "\nAdd them.\n", "It is 4."),  # Qwen3
    ("Add them.\n</think>\n\nIt is 4.", True, "Add them.\n", "It is 4."),  # DeepSeek-R1: opened in the prompt
    ("It is 4.", False, "", "It is 4."),  # a thinking template, an answer without thinking
    ("  It is 4.", False, "", "  It is 4."),  # ... as written
    ("<think>Cut short by the len", False, "Cut short by the len", ""),  # max_tokens inside the block
    ("Cut short", True, "Cut short", ""),
    ("<think></think>It is 4.", False, "", "It is 4."),  # an empty block
    ("<thinking>is not the tag", False, "", "<thinking>is not the tag"),
    ("<thi", False, "", "<thi"),  # the length, in what could have been the tag
    ("<think>a < b, so </thin k>; done</think>ok", False, "a < b, so </thin k>; done", "ok"),
]


def _streamed(split: Any, text: str, rng: random.Random) -> Piece:
    out, at = Piece(), 0
    while at < len(text):
        step = rng.randint(1, 7)
        piece = split.feed(text[at : at + step])
        if isinstance(piece, tuple):
            piece = Piece(*piece)
        out = Piece(out.reasoning + piece.reasoning, out.content + piece.content, out.calls + piece.calls)
        at += step
    rest = split.flush()
    rest = Piece(*rest) if isinstance(rest, tuple) else rest
    return Piece(out.reasoning + rest.reasoning, out.content + rest.content, out.calls + rest.calls)


@pytest.mark.parametrize(("text", "inside", "reasoning", "content"), CASES, ids=lambda v: str(v)[:30])
def test_think_tags_split_whole_and_streamed(text: str, inside: bool, reasoning: str, content: str) -> None:
    assert ThinkSplit(inside).split(text) == (reasoning, content)
    rng = random.Random(1)
    for _ in range(40):
        assert _streamed(ThinkSplit(inside), text, rng) == Piece(reasoning, content)


def test_reasoning_streams_as_it_arrives() -> None:
    split = ThinkSplit()
    assert split.feed("  <thi") == ("", "")  # could still be the tag
    assert split.feed("nk>Let") == ("Let", "")
    assert split.feed(" me see</th") == (" me see", "")  # the closing tag's start is held back
    assert split.feed("ink>\n\n") == ("", "")  # the blank before the answer is dropped
    assert split.feed("Four") == ("", "Four")
    assert split.flush() == ("", "")


def test_templates_and_prompts_that_think() -> None:
    qwen3 = (
        "{%- if enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{{ '<|im_start|>assistant' }}"
    )
    assert thinks(qwen3) and not thinks("{{ messages }}") and not thinks(None)
    assert opens_think("<｜Assistant｜><think>\n") and not opens_think("assistant\n<think>\n\n</think>\n\n")


def test_calls_are_read_after_the_thinking_only() -> None:
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    text = f"<think>Maybe {call}? No: call it.</think>\n{call}"
    fmt = AnswerFormat(HERMES, tools=True, think=True)
    whole = fmt.parse(text)
    assert whole == Piece(f"Maybe {call}? No: call it.", "", [("now", "{}")])
    for seed in range(20):
        assert _streamed(fmt.stream(), text, random.Random(seed)) == whole
    # without tools the calls are content; without a thinking template the tags are content
    assert AnswerFormat(HERMES, think=True).parse(text) == Piece(whole.reasoning, call)
    assert AnswerFormat(HERMES).parse(text) == Piece("", text)
    qwen = "<think>x</think><tool_call>\n<function=now>\n</function>\n</tool_call>"
    assert AnswerFormat(QWEN3_CODER, tools=True, think=True, parallel=False).parse(qwen).calls == [
        ("now", "{}")
    ]


# A Qwen3-style thinking template: the prompt opens the block unless enable_thinking is false;
# an earlier assistant turn's reasoning is written back inside its own block.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}"
)


def test_a_thinking_model_through_the_service(
    model_dir: Path, tmp_path: Path, service_env: dict[str, str]
) -> None:
    """The model's whole answer is reasoning while the prompt leaves it inside the block (this
    test model never closes it): `reasoning`, whole and streamed; none with include_reasoning
    false; enable_thinking false (chat_template_kwargs) closes the block: the answer is content."""
    from tests.conftest import private_stack

    thinking = tmp_path / "thinking"
    thinking.mkdir()
    for f in model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (thinking / f.name).symlink_to(f)
    (thinking / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    messages = [
        {"role": "user", "content": "Sort a list."},
        {"role": "assistant", "content": "sorted(xs)", "reasoning_content": "Use the builtin."},
        {"role": "user", "content": "And reversed?"},
    ]
    body: dict[str, Any] = {"model": thinking.name, "messages": messages, "max_tokens": 12, "temperature": 0}
    with (
        private_stack(service_env, worker=True, LOCALMOE_MODEL_DIR=str(thinking)) as stack,
        stack.http() as http,
    ):
        done = http.post("/v1/chat/completions", json=body)
        assert done.status_code == 200, done.text
        job = http.get(f"/v1/jobs/{job_id(done.json()['id'])}").json()
        assert "<think>Use the builtin.</think>sorted(xs)" in job["spec"]["prompt"]
        assert job["spec"]["prompt"].endswith("<|im_start|>assistant\n<think>\n")
        message = done.json()["choices"][0]["message"]
        assert message["reasoning"] == job["output"] and job["output"].strip()
        assert message["content"] == ""

        deltas = []
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    deltas.append(json.loads(line[6:])["choices"][0]["delta"])
        assert "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
        assert "".join(d.get("content") or "" for d in deltas) == ""

        # decoding under a constraint holds from the first token: that answer is not reasoning
        choice = {**body, "structured_outputs": {"choice": ["yes", "no"]}}
        constrained = http.post("/v1/chat/completions", json=choice).json()["choices"][0]["message"]
        assert constrained["content"] in ("yes", "no") and constrained["reasoning"] is None

        hidden = http.post("/v1/chat/completions", json={**body, "include_reasoning": False}).json()
        assert hidden["choices"][0]["message"]["reasoning"] is None
        assert hidden["choices"][0]["message"]["content"] == ""

        direct = {**body, "chat_template_kwargs": {"enable_thinking": False}}
        answered = http.post("/v1/chat/completions", json=direct)
        assert answered.status_code == 200, answered.text
        job = http.get(f"/v1/jobs/{job_id(answered.json()['id'])}").json()
        assert job["spec"]["prompt"].endswith("<think>\n\n</think>\n\n")
        assert answered.json()["choices"][0]["message"]["content"] == job["output"]
        assert answered.json()["choices"][0]["message"]["reasoning"] is None
        # as vLLM: reasoning_effort none turns thinking off, unless chat_template_kwargs says otherwise
        for extra, closed in (({"reasoning_effort": "none"}, True), ({"reasoning_effort": "low"}, False)):
            done = http.post("/v1/chat/completions", json={**body, "max_tokens": 1, **extra})
            job = http.get(f"/v1/jobs/{job_id(done.json()['id'])}").json()
            assert job["spec"]["prompt"].endswith("</think>\n\n") is closed, extra
        counted = http.post(
            "/tokenize", json={"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
        )
        assert counted.json()["count"] == answered.json()["usage"]["prompt_tokens"]

        for bad, param in (
            ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
            ({"thinking": 1}, "thinking"),
        ):
            refused = http.post("/v1/chat/completions", json={**body, **bad})
            assert refused.status_code == 400, refused.text
            assert param in json.dumps(refused.json()["error"]), refused.text
