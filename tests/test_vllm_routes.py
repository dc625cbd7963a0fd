"""What clients written for vLLM servers send beyond OpenAI's API: continuous usage in streams,
/tokenize and /detokenize. Against the real service, with the official `openai` client where it
can send the request and raw HTTP where vLLM's routes have no client method."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from localmoe.redis_server import RedisServer
from tests.conftest import bearer, new_key

PROMPT = "def fibonacci(n):\n"
CHAT: list[Any] = [{"role": "user", "content": "Sort a list of ints."}]


@pytest.fixture(scope="module")
def key(redis_server: RedisServer) -> str:
    return new_key(redis_server, "tests (vllm routes)")


@pytest.fixture
def client(api_url: str, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def http(api_url: str, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60, headers=bearer(key)) as c:
        yield c


CONTINUOUS: Any = {"include_usage": True, "continuous_usage_stats": True}


def _check_running_usage(chunks: list[Any], texts: list[str]) -> None:
    """Every text chunk carries the usage so far: the same prompt count, completion tokens rising
    to the final count; the last chunk is usage alone, equal to the answer's."""
    *body, final = chunks
    assert final.choices == [] and final.usage is not None
    counted = [(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) for c in body]
    assert all(p == final.usage.prompt_tokens > 0 and t == p + n for p, n, t in counted)
    made = [n for (_, n, _), text in zip(counted, texts, strict=True) if text]
    assert len(made) > 3 and made == sorted(made) and made[0] >= 1
    assert counted[-1][1] == final.usage.completion_tokens  # the finish chunk: the whole count


def test_continuous_usage_in_completion_and_chat_streams(client: openai.OpenAI, model_dir: Path) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "max_tokens": 24, "temperature": 0}
    chunks = list(client.completions.create(prompt=PROMPT, **args, stream=True, stream_options=CONTINUOUS))
    _check_running_usage(chunks, [c.choices[0].text if c.choices else "" for c in chunks[:-1]])
    whole = client.completions.create(prompt=PROMPT, **args)
    assert chunks[-1].usage == whole.usage
    chat = list(client.chat.completions.create(messages=CHAT, **args, stream=True, stream_options=CONTINUOUS))
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].usage is not None
    assert chat[0].usage.completion_tokens == 0  # the role chunk, before any token
    _check_running_usage(chat[1:], [c.choices[0].delta.content or "" for c in chat[1:-1]])
    # continuous_usage_stats alone changes nothing (vLLM: it needs include_usage)
    alone: Any = {"continuous_usage_stats": True}
    plain = list(client.completions.create(prompt=PROMPT, **args, stream=True, stream_options=alone))
    assert all(c.usage is None for c in plain)


def test_tokenize_counts_as_the_engine_does(
    client: openai.OpenAI, http: httpx.Client, model_dir: Path
) -> None:
    done = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=2)
    r = http.post("/tokenize", json={"model": model_dir.name, "prompt": PROMPT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert done.usage is not None and body["count"] == done.usage.prompt_tokens == len(body["tokens"])
    assert body["max_model_len"] == 2048 and len(body["token_strs"]) == body["count"]
    back = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"].endswith(PROMPT)
    # a chat: rendered by the template the chat route uses, counted as the engine counted it
    chat = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=2)
    tokens = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat.usage is not None and tokens["count"] == chat.usage.prompt_tokens
    assert tokens["token_strs"] is None
    shorter = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert 0 < shorter["count"] < tokens["count"]
    # with tools: the prompt the chat route renders with them, counted as the engine counts it
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    chat = client.chat.completions.create(model=model_dir.name, messages=CHAT, tools=tools, max_tokens=2)
    tooled = http.post("/tokenize", json={"messages": CHAT, "tools": tools}).json()
    assert chat.usage is not None and tooled["count"] == chat.usage.prompt_tokens > tokens["count"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/tokenize", {"prompt": "x", "messages": CHAT}, 400, "exactly one of"),
        ("/tokenize", {}, 400, "exactly one of"),
        ("/tokenize", {"prompt": "x", "model": "gpt-4o"}, 404, "does not exist"),
        ("/tokenize", {"prompt": "x", "truncate": 3}, 400, "Extra inputs"),
        (
            "/tokenize",
            {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "go with",
        ),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "out of the vocabulary"),
        ("/detokenize", {"tokens": [-1]}, 400, "out of the vocabulary"),
        ("/detokenize", {"tokens": "abc"}, 400, "valid list"),
    ],
)
def test_bad_tokenize_requests_are_refused_with_a_reason(
    http: httpx.Client, path: str, body: dict[str, Any], status: int, needle: str
) -> None:
    r = http.post(path, json=body)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_tokenize_needs_a_key(api_url: str) -> None:
    for path in ("/tokenize", "/detokenize"):
        r = httpx.post(api_url + path, json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
