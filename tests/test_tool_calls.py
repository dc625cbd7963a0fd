"""Tool calls through the whole service, driven by the official `openai` client: forced calls
(`tool_choice` required or a named function; their arguments always validate), streamed as tool
call deltas, a conversation carrying calls and tool results back, and the 400s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.test_openai import job_id

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 20},
        "limit": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["query"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather by city.", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "search", "description": "Search the docs.", "parameters": SEARCH},
    },
]
PARAMETERS = {"get_weather": WEATHER, "search": SEARCH}
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _assert_valid(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_calls_validate(
    openai_client: openai.OpenAI, http: httpx.Client, model_dir: Path, temperature: float
) -> None:
    done = openai_client.chat.completions.create(
        model=model_dir.name,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_completion_tokens=600,
        temperature=temperature,
        seed=5,
    )
    [choice] = done.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.tool_calls
    _assert_valid(choice.message.tool_calls)
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
    prompt = http.get(f"/v1/jobs/{job_id(done.id)}").json()["spec"]["prompt"]
    assert "# Tools" in prompt and '"name": "search"' in prompt  # shown to the model (ChatML fallback)


def test_a_named_function_streamed_as_tool_call_deltas(openai_client: openai.OpenAI, model_dir: Path) -> None:
    stream = openai_client.chat.completions.create(
        model=model_dir.name,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "search"}},
        parallel_tool_calls=False,
        max_completion_tokens=600,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += d.id or ""
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0] and calls[0]["name"] == "search" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SEARCH)


def test_parallel_calls_off_means_one(openai_client: openai.OpenAI, model_dir: Path) -> None:
    done = openai_client.chat.completions.create(
        model=model_dir.name,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=600,
        temperature=1.0,
        seed=11,
    )
    calls = done.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    _assert_valid(calls)


def test_results_go_back_into_the_conversation(
    openai_client: openai.OpenAI, http: httpx.Client, model_dir: Path
) -> None:
    first = openai_client.chat.completions.create(
        model=model_dir.name,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_completion_tokens=600,
    )
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    follow_up: list[Any] = [
        *MESSAGES,
        message.model_dump(exclude_none=True),  # the assistant's calls, as the client got them
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 3}'},
    ]
    second = openai_client.chat.completions.create(
        model=model_dir.name, messages=follow_up, tools=TOOLS, max_completion_tokens=8, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = http.get(f"/v1/jobs/{job_id(second.id)}").json()["spec"]["prompt"]
    assert f'"name": "{call.function.name}", "arguments": {call.function.arguments}' in prompt
    assert '<tool_response>\n{"temperature": 3}\n</tool_response>' in prompt


def test_auto_and_none(openai_client: openai.OpenAI, http: httpx.Client, model_dir: Path) -> None:
    """auto leaves the choice to the model (this random one writes text: content, no calls); none
    does not show the tools at all."""
    auto = openai_client.chat.completions.create(
        model=model_dir.name, messages=MESSAGES, tools=TOOLS, max_completion_tokens=8, temperature=0
    )
    assert auto.choices[0].message.tool_calls in (None, []) and auto.choices[0].message.content
    assert auto.choices[0].finish_reason in ("stop", "length")
    none = openai_client.chat.completions.create(
        model=model_dir.name, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_completion_tokens=4
    )
    assert "# Tools" not in http.get(f"/v1/jobs/{job_id(none.id)}").json()["spec"]["prompt"]


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        "not in tools",
    ),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "same function name twice"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "obj"}}}]},
        "tools.0",
        "parameters schema cannot be used",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        "tools.0.function.name",
        "pattern",
    ),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "tool_choice",
        "no response_format too",
    ),
]


@pytest.mark.parametrize(("extra", "param", "needle"), BAD, ids=lambda v: str(v)[:40])
def test_bad_tool_requests_are_a_400(
    openai_client: openai.OpenAI, model_dir: Path, extra: dict[str, Any], param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(
            model=model_dir.name, messages=MESSAGES, max_completion_tokens=4, **extra
        )
    error = e.value.body
    assert isinstance(error, dict) and needle in error["message"], error
    assert (error["param"] or "").startswith(param), error


def test_a_harmony_model_keeps_its_markers_for_the_parser(
    model_dir: Path, tmp_path: Path, service_env: dict[str, str]
) -> None:
    """A model whose template is gpt-oss's harmony: its chat jobs keep special tokens' text (the
    channel markers are special tokens there), with tools or without; an answer without harmony
    markers (this test model's) is content as written."""
    from tests.conftest import private_stack

    harmony = tmp_path / "harmony"
    harmony.mkdir()
    for f in model_dir.iterdir():
        (harmony / f.name).symlink_to(f)
    (harmony / "chat_template.jinja").write_text(
        "{% if tools %}<|start|>developer<|message|>namespace functions {}<|end|>{% endif %}"
        "{% for m in messages %}<|start|>{{ m.role }}{% if m.role == 'assistant' %}<|channel|>final"
        "{% endif %}<|message|>{{ m.content }}<|end|>{% endfor %}<|start|>assistant"
    )
    with (
        private_stack(service_env, worker=True, LOCALMOE_MODEL_DIR=str(harmony)) as stack,
        stack.http() as http,
    ):
        body = {"model": harmony.name, "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 8}
        for extra in ({}, {"tools": TOOLS}):
            done = http.post("/v1/chat/completions", json={**body, **extra})
            assert done.status_code == 200, done.text
            job = http.get(f"/v1/jobs/{job_id(done.json()['id'])}").json()
            assert job["spec"]["skip_special_tokens"] is False
            assert job["spec"]["prompt"].endswith("<|start|>assistant")
            assert done.json()["choices"][0]["message"]["content"] == job["output"].strip()
