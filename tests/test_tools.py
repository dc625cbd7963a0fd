"""Tool calls without a service: each family's format parsed whole and streamed, the grammar that
forces calls, and the prompt a conversation with tools becomes (api/openai/tools.py,
api/openai/chat_template.py)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer

from api.openai.answer import AnswerFormat
from api.openai.chat_template import render_chat
from api.openai.protocol import ChatMessage, Tool
from api.openai.reasoning import Piece
from api.openai.tools import (
    DEEPSEEK_V3,
    GLM45,
    GRANITE,
    HERMES,
    MISTRAL,
    QWEN3_CODER,
    ToolFormat,
    ToolStream,
    format_for,
)
from moe_core.structured import check

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}),
    Tool.model_validate({"type": "function", "function": {"name": "now", "description": "The time."}}),
]

ANSWERS: list[tuple[ToolFormat, str, str, list[tuple[str, dict[str, Any]]]]] = [
    (HERMES, "Just text, no < call.", "Just text, no < call.", []),
    (
        HERMES,
        'Let me look.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>',
        "Let me look.",
        [("get_weather", {"city": "Oslo", "unit": "C"})],
    ),
    (
        HERMES,
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Rome", "unit": "F"}}\n</tool_call>',
        "",
        [("now", {}), ("get_weather", {"city": "Rome", "unit": "F"})],
    ),
    (HERMES, '<tool_call>\n{"name": "now", "arguments": {}}', "", [("now", {})]),  # cut before its end tag
    (HERMES, "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    (
        MISTRAL,
        '[TOOL_CALLS] [{"name": "now", "arguments": "{}"}, '
        '{"name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}}]',
        "",
        [("now", {}), ("get_weather", {"city": "Lima", "unit": "C"})],
    ),
    (MISTRAL, "[TOOL_CALLS] [{broken", "[TOOL_CALLS] [{broken", []),
    (
        GRANITE,
        'Checking.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}]',
        "Checking.",
        [("get_weather", {"city": "Oslo", "unit": "F"})],
    ),
    (
        QWEN3_CODER,
        "I will look it up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
        "<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=now>\n</function>\n</tool_call>",
        "I will look it up.",
        [("get_weather", {"city": "New York", "unit": "C"}), ("now", {})],
    ),
    (  # values take their parameters' types: a string stays text even when it reads as a number
        QWEN3_CODER,
        "<tool_call>\n<function=search>\n<parameter=query>\n42\n</parameter>\n<parameter=limit>\n5\n"
        '</parameter>\n<parameter=filters>\n{"lang": ["py"]}\n</parameter>\n<parameter=code>\n'
        "if a < b:\n    return a\n</parameter>\n</function>\n</tool_call>",
        "",
        [
            (
                "search",
                {"query": "42", "limit": 5, "filters": {"lang": ["py"]}, "code": "if a < b:\n    return a"},
            )
        ],
    ),
    (QWEN3_CODER, "<tool_call>\n<function=now>\nstray text\n</function>\n</tool_call>", None, []),
    (
        GLM45,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>unit</arg_key>\n<arg_value>C</arg_value>\n</tool_call>",
        "",
        [("get_weather", {"city": "Paris", "unit": "C"})],
    ),
    (
        GLM45,
        "Two at once.<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>7</arg_value>\n"
        "<arg_key>limit</arg_key>\n<arg_value>3</arg_value>\n</tool_call><tool_call>now\n</tool_call>",
        "Two at once.",
        [("search", {"query": "7", "limit": 3}), ("now", {})],
    ),
    (
        DEEPSEEK_V3,
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Oslo", "unit": "C"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>now<｜tool▁sep｜>{}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "Let me check.",
        [("get_weather", {"city": "Oslo", "unit": "C"}), ("now", {})],
    ),
    (
        DEEPSEEK_V3,
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{oops<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        None,
        [],
    ),
]
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer"},
        "filters": {"type": "object"},
        "code": {"type": "string"},
    },
}
FUNCTIONS = [("get_weather", WEATHER), ("now", None), ("search", SEARCH)]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), ANSWERS, ids=lambda v: str(v)[:30])
def test_answers_parse_whole_and_streamed(
    fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    """content None: the answer as written (not a valid call)."""
    fmt = fmt.bound(FUNCTIONS)
    content = text if content is None else content
    got_content, got_calls = fmt.parse(text)
    assert got_content == content
    assert [(n, json.loads(a)) for n, a in got_calls] == calls
    rng = random.Random(0)
    for _ in range(20):  # the same answer in pieces of random sizes, as a stream brings it
        stream, streamed, streamed_calls, at = ToolStream(fmt), "", [], 0
        while at < len(text):
            step = rng.randint(1, 6)
            piece, more = stream.feed(text[at : at + step])
            streamed, streamed_calls, at = streamed + piece, streamed_calls + more, at + step
        piece, more = stream.flush()
        streamed, streamed_calls = streamed + piece, streamed_calls + more
        assert streamed_calls == got_calls
        assert streamed.strip() == (content if calls else text).strip()


def test_without_parallel_calls_a_stream_gives_out_the_first_only() -> None:
    call = '<tool_call>\n{"name": "%s", "arguments": {}}\n</tool_call>'
    two = call % "now" + "\n" + call % "x"
    stream = ToolStream(HERMES, limit=1)
    content, calls = stream.feed(two)
    rest, more = stream.flush()
    assert (content, rest) == ("", "") and calls == [("now", "{}")] and more == []
    assert stream.calls == [("now", "{}")]


def test_the_format_a_template_defines() -> None:
    assert format_for(None) is HERMES
    assert format_for("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert format_for("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") is MISTRAL
    # the markers each family's template writes its calls with
    assert format_for("{{- '<tool_call>\\n<function=' + name + '>\\n' }}<parameter=") is QWEN3_CODER
    assert format_for("<tool_call>{{ name }}\n<arg_key>{{ k }}</arg_key>") is GLM45
    assert format_for("{{ '<|tool_call|>' }}{{ tool_calls | tojson }}") is GRANITE
    assert format_for("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'}}") is DEEPSEEK_V3
    harmony = format_for("{{ '<|start|>assistant<|channel|>commentary to=functions.' + name }}")
    final = AnswerFormat(harmony, tools=True).parse("<|channel|>final<|message|>Hi.<|return|>")
    assert harmony.name == "harmony" and final == Piece(content="Hi.")


def test_calls_written_as_text_are_forced_as_json() -> None:
    """tool_choice required or named: the formats whose values are text are forced as hermes JSON
    (a grammar over JSON holds the schemas); the JSON formats keep their own."""
    bound = QWEN3_CODER.bound(FUNCTIONS)
    assert bound.forced().name == "hermes" and bound.forced().params == bound.params
    assert GLM45.forced() == HERMES and DEEPSEEK_V3.forced() == HERMES
    assert MISTRAL.forced() is MISTRAL and GRANITE.forced() is GRANITE
    with pytest.raises(ValueError, match="forced"):
        QWEN3_CODER.grammar([("now", None)], parallel=False)


@pytest.fixture(scope="module")
def ll_tokenizer(model_dir: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, llguidance.hf.from_tokenizer(tokenizer)


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, GRANITE], ids=lambda f: f.name)
def test_the_forcing_grammar_takes_only_valid_calls(fmt: ToolFormat, ll_tokenizer: Any) -> None:
    tokenizer, lt = ll_tokenizer
    functions = [(t.function.name, t.function.parameters) for t in TOOLS]

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(lt, llguidance.grammar_from("grammar", grammar))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    def calls(*items: tuple[str, dict[str, Any]]) -> str:
        bodies = [{"name": n, "arguments": a} for n, a in items]
        if fmt.body == "json_list":
            return fmt.start + fmt.gap + json.dumps(bodies, separators=(",", ":"))
        return "\n".join(f"<tool_call>\n{json.dumps(b, separators=(',', ':'))}\n</tool_call>" for b in bodies)

    parallel, single = fmt.grammar(functions, parallel=True), fmt.grammar(functions, parallel=False)
    assert check("grammar", parallel) is None and check("grammar", single) is None
    good = ("get_weather", {"city": "Oslo", "unit": "C"})
    assert accepts(single, calls(good)) and accepts(parallel, calls(good, ("now", {})))
    assert not accepts(single, calls(good, ("now", {})))  # one call only
    assert not accepts(single, calls(("get_weather", {"city": "Oslo", "unit": "K"})))  # not in the enum
    assert not accepts(single, calls(("get_weather", {"city": "Oslo"})))  # a required argument missing
    assert not accepts(single, calls(("delete_all", {})))  # no such function
    assert not accepts(single, "Sure, here is the weather.")  # text instead of a call
    named = fmt.grammar(functions[1:], parallel=False)  # tool_choice naming one function
    assert accepts(named, calls(("now", {}))) and not accepts(named, calls(good))


CONVERSATION = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Weather in Oslo?"),
    ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'},
                }
            ],
        }
    ),
    ChatMessage(role="tool", tool_call_id="call_1", content='{"temp": 3}'),
]


def test_without_a_template_tools_are_written_as_hermes(model_dir: Path) -> None:
    rendered = asyncio.run(render_chat(model_dir, CONVERSATION, tools=TOOLS))
    prompt, stop, fmt = rendered.prompt, rendered.stop, rendered.calls
    assert fmt is HERMES and stop == ["<|im_end|>"]
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[0].model_dump(exclude_none=True)) in prompt  # each tool, as JSON
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    plain = asyncio.run(render_chat(model_dir, CONVERSATION[:2])).prompt
    assert "# Tools" not in plain


# Cut-down family templates: what decides is how each shows tools and calls.
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_LIKE = (
    "{% for m in messages %}{% if m.role == 'user' %}{% if tools and loop.first %}[AVAILABLE_TOOLS]"
    "{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]{% elif m.tool_calls %}"
    "[TOOL_CALLS]{{ m.tool_calls | tojson }}</s>{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}"
    "[/TOOL_RESULTS]{% else %}{{ m.content }}{% endif %}{% endfor %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}<assistant>"


@pytest.mark.parametrize(
    ("template", "want_format", "shows"),
    [
        (
            QWEN_LIKE,
            HERMES,
            ["<tools>get_weather;now;</tools>", '<tool_call>{"city": "Oslo", "unit": "C"}</tool_call>'],
        ),
        (
            MISTRAL_LIKE,
            MISTRAL,
            ["[AVAILABLE_TOOLS]", "[TOOL_CALLS]", '[TOOL_RESULTS]{"temp": 3}[/TOOL_RESULTS]'],
        ),
        (
            PLAIN_TEMPLATE,
            HERMES,
            ["# Tools", '<tool_response>\n{"temp": 3}\n</tool_response>', "<tool_call>"],
        ),
    ],
    ids=["qwen", "mistral", "no-tools-template"],
)
def test_a_family_template_gets_tools_its_way(
    template: str, want_format: ToolFormat, shows: list[str], model_dir: Path, tmp_path: Path
) -> None:
    templated = tmp_path / "templated"
    templated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (templated / name).write_bytes((model_dir / name).read_bytes())
    (templated / "chat_template.jinja").write_text(template)
    messages = CONVERSATION[1:] if template is MISTRAL_LIKE else CONVERSATION
    rendered = asyncio.run(render_chat(templated, messages, tools=TOOLS))
    prompt, stop, fmt = rendered.prompt, rendered.stop, rendered.calls
    assert fmt is want_format and stop == []
    for piece in shows:
        assert piece in prompt, (piece, prompt)


def test_call_markers_held_as_special_tokens_are_known(tmp_path: Path) -> None:
    """Some families' tokenizers hold their call markers as special tokens, which a detokenizer
    skips: the chat route keeps special tokens' text for them (PromptCounter.special_tokens)."""
    from tokenizers import Tokenizer, models

    from scheduler.routing import PromptCounter

    tokenizer = Tokenizer(models.BPE())
    tokenizer.add_special_tokens(["<s>", "<arg_key>"])
    tokenizer.add_tokens(["<tool_call>"])  # an added token, but not a special one
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text('{"vocab_size": 8}')
    special = PromptCounter(tmp_path).special_tokens
    assert special == {"<s>", "<arg_key>"}
    assert GLM45.marked_by(special)  # by its <arg_key>
    assert not HERMES.marked_by(special) and not QWEN3_CODER.marked_by(special)
    assert DEEPSEEK_V3.marked_by({"<｜tool▁sep｜>"}) and GRANITE.marked_by({"<|tool_call|>"})
