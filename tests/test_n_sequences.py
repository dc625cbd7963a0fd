"""n > 1: one job, n sequences generated together, through the whole service. The official `openai`
client gets n choices (whole and streamed, with logprobs and tool calls per choice); the job API
gets `outputs`, and its SSE events name their sequence; a seeded request is reproducible; usage
counts every sequence; cancel ends all of them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from localmoe.redis_server import RedisServer
from tests.conftest import TERMINAL, bearer, new_key, wait_done, wait_for
from tests.test_openai import CONVERSATION, PROMPT, job_id
from tests.test_tool_calls import MESSAGES, TOOLS, _assert_valid


@pytest.fixture(scope="module")
def key(redis_server: RedisServer) -> str:
    return new_key(redis_server, "tests (n sequences)")


@pytest.fixture
def client(api_url: str, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def jobs(api_url: str, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60, headers=bearer(key)) as c:
        yield c


SAMPLED: dict[str, Any] = {"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 8}
EXACT: Any = {"ignore_eos": True}  # every sequence makes max_tokens tokens: usage is 3 × 8


def _by_choice(chunks: list[Any], text: Any) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Streamed chunks → per choice index its text and the finish reasons its chunks gave."""
    texts: dict[int, str] = defaultdict(str)
    reasons: dict[int, list[str]] = defaultdict(list)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += text(choice) or ""
            if choice.finish_reason is not None:
                reasons[choice.index].append(choice.finish_reason)
    return dict(texts), dict(reasons)


def test_n_completions_whole_and_streamed(client: openai.OpenAI, jobs: httpx.Client, model_dir: Path) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "prompt": PROMPT, **SAMPLED, "extra_body": EXACT}
    whole = client.completions.create(**args, logprobs=1)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.text for c in whole.choices]
    assert len(set(texts)) >= 2, texts  # sampled with seeds 11, 12, 13: mostly different
    assert whole.usage is not None and whole.usage.completion_tokens == 3 * 8
    for choice in whole.choices:
        assert choice.finish_reason == "length" and choice.logprobs is not None
        assert len(choice.logprobs.token_logprobs or []) == 8
    job = jobs.get(f"/v1/jobs/{job_id(whole.id)}").json()
    assert [o["text"] for o in job["outputs"]] == texts and job["output"] == texts[0]
    assert job["usage"]["completion_tokens"] == 24 and job["spec"]["n"] == 3
    # the same seed: the same three sequences, whole or streamed
    again = client.completions.create(**args)
    assert [c.text for c in again.choices] == texts
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed, reasons = _by_choice(chunks[:-1], lambda c: c.text)
    assert streamed == dict(enumerate(texts)) and reasons == {k: ["length"] for k in range(3)}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24


def test_n_chat_choices_whole_and_streamed(client: openai.OpenAI, model_dir: Path) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "messages": CONVERSATION, **SAMPLED}
    whole = client.chat.completions.create(**args, logprobs=True)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content or "" for c in whole.choices]
    assert len(set(texts)) >= 2, texts
    for choice in whole.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
    made = sum(len(c.logprobs.content) for c in whole.choices if c.logprobs and c.logprobs.content)
    assert whole.usage is not None and whole.usage.completion_tokens == made  # every sequence's tokens
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert [c.choices[0].delta.role for c in chunks[:3]] == ["assistant"] * 3  # each choice opens
    assert [c.choices[0].index for c in chunks[:3]] == [0, 1, 2]
    streamed, reasons = _by_choice(chunks, lambda c: c.delta.content)
    assert streamed == dict(enumerate(texts))
    assert reasons == {k: [c.finish_reason] for k, c in enumerate(whole.choices)}


def test_n_choices_each_make_their_tool_calls(client: openai.OpenAI, model_dir: Path) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "messages": MESSAGES, "tools": TOOLS, "n": 2}
    args |= {"tool_choice": {"type": "function", "function": {"name": "search"}}}
    args |= {"parallel_tool_calls": False, "max_completion_tokens": 200, "temperature": 1.0, "seed": 3}
    whole = client.chat.completions.create(**args)
    ids = []
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        _assert_valid(choice.message.tool_calls)
        ids += [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == len(ids)  # unique across the choices
    chunks = list(client.chat.completions.create(**args, stream=True))
    calls: dict[int, list[Any]] = defaultdict(list)
    for chunk in chunks:
        for choice in chunk.choices:
            calls[choice.index] += choice.delta.tool_calls or []

    def made(calls: list[Any]) -> list[tuple[str, str, str]]:  # ids differ by job: their ends do not
        return [(c.id.split("_", 2)[2], c.function.name, c.function.arguments) for c in calls]

    assert {k: made(v) for k, v in calls.items()} == {
        k: made(choice.message.tool_calls or []) for k, choice in enumerate(whole.choices)
    }


def test_the_job_api_takes_n_and_its_events_name_the_sequence(jobs: httpx.Client) -> None:
    body = {"prompt": PROMPT, **SAMPLED, "ignore_eos": True}
    job = wait_done(jobs, jobs.post("/v1/jobs", json=body).json()["id"])
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 24
    outputs = job["outputs"]
    assert [o["index"] for o in outputs] == [0, 1, 2] and job["output"] == outputs[0]["text"]
    assert all(o["finish_reason"] == "length" for o in outputs)
    texts: dict[int, str] = defaultdict(str)
    ended: dict[int, str] = {}
    with jobs.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind == "token":
                event = httpx.Response(200, content=line.removeprefix("data: ")).json()
                texts[event["index"]] += event["text"]
                if "finish_reason" in event:
                    ended[event["index"]] = event["finish_reason"]
    assert texts == {o["index"]: o["text"] for o in outputs} and ended == dict.fromkeys(range(3), "length")
    # greedy: n identical sequences (as vLLM)
    greedy = wait_done(
        jobs, jobs.post("/v1/jobs", json={"prompt": PROMPT, "n": 2, "max_tokens": 6}).json()["id"]
    )
    assert greedy["outputs"][0]["text"] == greedy["outputs"][1]["text"] == greedy["output"]


def test_cancelling_a_job_of_n_sequences_ends_them_all(jobs: httpx.Client) -> None:
    body = {"prompt": PROMPT, "n": 3, "max_tokens": 1000, "ignore_eos": True, "temperature": 1.0}
    job_id_ = jobs.post("/v1/jobs", json=body).json()["id"]

    def generating() -> bool:
        return bool(jobs.get(f"/v1/jobs/{job_id_}").json()["timings"]["first_token_at"])

    wait_for(generating, 60, "the job's first token")
    assert jobs.delete(f"/v1/jobs/{job_id_}").status_code == 202
    job = wait_done(jobs, job_id_, timeout=30)
    assert job["status"] == "cancelled" and job["status"] in TERMINAL and job["finish_reason"] == "abort"
    assert [o["finish_reason"] for o in job["outputs"]] == ["abort"] * 3
    assert 0 < job["usage"]["completion_tokens"] < 3000
    # the worker let go of all three: the next job runs
    after = wait_done(jobs, jobs.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 4}).json()["id"])
    assert after["status"] == "succeeded"
