"""The OpenAI-compatible endpoints, driven by the official `openai` client against the real
service (API → Redis → Celery worker → engine). Each request is an ordinary job: the tests
compare with /v1/jobs, and find the jobs of disconnected clients there."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api.auth import KeyLimits, Scope, create_key
from api.openai.chat_template import render_chat
from api.openai.protocol import ChatMessage
from localmoe.redis_server import RedisServer
from scheduler import keys
from scheduler.queue import make_celery
from tests.conftest import bearer, new_key, private_stack, wait_done, wait_for
from workers.reaper import Reaper

PROMPT = "def fibonacci(n):\n"
CONVERSATION: list[Any] = [
    {"role": "system", "content": "You write short Python functions."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Sort a list"}, {"type": "text", "text": " of ints."}],
    },
]


@pytest.fixture(scope="module")
def key(redis_server: RedisServer) -> str:
    """A key of this module's own: its newest job is the one the last test made."""
    return new_key(redis_server, "tests (openai)")


@pytest.fixture
def client(api_url: str, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def jobs(api_url: str, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60, headers=bearer(key)) as c:
        yield c


def job_id(response_id: str) -> str:
    return response_id.split("-", 1)[1]


def newest_job(jobs: httpx.Client) -> dict[str, Any]:
    page = jobs.get("/v1/jobs", params={"limit": 1}).json()
    return page["jobs"][0]


def test_models_lists_the_served_model(client: openai.OpenAI, model_dir: Path) -> None:
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(model_dir.name, "model", "localmoe")]
    assert models[0].created > 0
    assert client.models.retrieve(model_dir.name).id == model_dir.name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    schema = httpx.get(f"{client.base_url}".replace("/v1/", "/openapi.json")).json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(schema["paths"])


def test_greedy_completion_equals_the_job_api(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    done = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=24, temperature=0)
    r = jobs.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 24})
    direct = wait_done(jobs, r.json()["id"])
    assert done.object == "text_completion" and done.model == model_dir.name
    [choice] = done.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.text == direct["output"] and choice.text
    assert choice.finish_reason == direct["finish_reason"] in ("stop", "length")
    assert done.usage is not None
    assert done.usage.prompt_tokens == direct["usage"]["prompt_tokens"] > 0
    assert done.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    # an ordinary job: intake detected its modality and the worker ran it
    assert done.id.startswith("cmpl-")
    job = jobs.get(f"/v1/jobs/{job_id(done.id)}").json()
    assert job["status"] == "succeeded" and job["output"] == choice.text
    assert job["modality"] == "code" and job["spec"]["temperature"] == 0
    # a list holding one prompt is the same request; the model may be left out (raw HTTP)
    again = client.completions.create(model=model_dir.name, prompt=[PROMPT], max_tokens=24, temperature=0)
    assert again.choices[0].text == choice.text
    raw = jobs.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    assert raw.status_code == 200 and raw.json()["choices"][0]["text"] == choice.text


def test_completion_defaults_and_extensions(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    done = client.completions.create(model=model_dir.name, prompt=PROMPT, seed=3, user="alice")
    job = jobs.get(f"/v1/jobs/{job_id(done.id)}").json()
    spec = job["spec"]
    assert spec["max_tokens"] == 16 and spec["temperature"] == 1.0 and spec["top_p"] == 1.0  # OpenAI's
    assert spec["seed"] == 3 and spec["top_k"] == 0 and spec["stop"] == []
    assert job["modality"] == "code" and job["priority"] == "normal"  # detected; the default
    assert done.usage is not None and done.usage.completion_tokens <= 16
    extended = client.completions.create(
        model=model_dir.name,
        prompt=PROMPT,
        max_tokens=2,
        extra_body={"top_k": 5, "priority": "low", "modality": "text", "ignore_eos": True},
    )
    job = jobs.get(f"/v1/jobs/{job_id(extended.id)}").json()
    assert job["spec"]["top_k"] == 5 and job["priority"] == "low" and job["modality"] == "text"
    assert extended.usage is not None and extended.usage.completion_tokens == 2


def test_logits_options_reach_the_engine(client: openai.OpenAI, jobs: httpx.Client, model_dir: Path) -> None:
    """OpenAI's logit_bias and penalties, vLLM's min_tokens and stop_token_ids: carried by the job
    to the engine, which honours them."""
    token = jobs.post("/tokenize", json={"prompt": " the", "add_special_tokens": False}).json()["tokens"][-1]
    piece = jobs.post("/detokenize", json={"tokens": [token]}).json()["prompt"]
    forced = client.completions.create(
        model=model_dir.name, prompt=PROMPT, max_tokens=3, logit_bias={str(token): 100}, presence_penalty=1.5
    )
    assert forced.choices[0].text == piece * 3  # +100 outweighs the presence penalty's -1.5
    job = jobs.get(f"/v1/jobs/{job_id(forced.id)}").json()
    assert job["spec"]["logit_bias"] == {str(token): 100} and job["spec"]["presence_penalty"] == 1.5
    # The token also stops generation, but not before 2 others: 3 tokens, the stop token's text left out.
    stopped = client.completions.create(
        model=model_dir.name,
        prompt=PROMPT,
        max_tokens=8,
        logit_bias={str(token): 100},
        extra_body={"stop_token_ids": [token], "min_tokens": 2, "repetition_penalty": 1.1},
    )
    assert stopped.usage is not None and stopped.usage.completion_tokens == 3
    assert stopped.choices[0].finish_reason == "stop" and piece not in stopped.choices[0].text
    # The job API takes the same fields.
    r = jobs.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 3, "logit_bias": {str(token): 100}})
    assert wait_done(jobs, r.json()["id"])["output"] == piece * 3
    # vLLM's min_p: 1 keeps only the likeliest token, so sampling at temperature 1 is greedy
    greedy = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=6, temperature=0)
    narrowed = client.completions.create(
        model=model_dir.name, prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"min_p": 1.0}
    )
    assert narrowed.choices[0].text == greedy.choices[0].text
    assert jobs.get(f"/v1/jobs/{job_id(narrowed.id)}").json()["spec"]["min_p"] == 1.0


def test_logprobs_for_completions_and_chat(client: openai.OpenAI, model_dir: Path) -> None:
    """Every generated token's log-probability with its alternatives, whole and streamed (the same
    numbers), in each endpoint's shape; greedy: the chosen token is the likeliest of them."""
    args: dict[str, Any] = {"model": model_dir.name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    args |= {"logprobs": 3, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**args)
    lp = whole.choices[0].logprobs
    assert lp is not None and whole.usage is not None
    assert lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == whole.usage.completion_tokens == 12
    assert lp.text_offset is not None and lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top is not None and len(top) <= 3 and chosen is not None and chosen <= 0
        assert chosen >= max(top.values()) - 1e-4  # greedy: the likeliest
    streamed = list(client.completions.create(**args, stream=True))
    got = [
        x
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for x in c.choices[0].logprobs.token_logprobs or []
    ]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    # chat: logprobs=true, top_logprobs=2
    chat_args: dict[str, Any] = {
        "model": model_dir.name,
        "messages": CONVERSATION,
        "max_tokens": 10,
        "temperature": 0,
    }
    chat = client.chat.completions.create(**chat_args, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content if chat.choices[0].logprobs else None
    assert content is not None and chat.usage is not None and len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)
    chunks = list(client.chat.completions.create(**chat_args, logprobs=True, top_logprobs=2, stream=True))
    streamed_lps = [
        t.logprob
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or []
    ]
    assert streamed_lps == pytest.approx([t.logprob for t in content], abs=1e-4)
    # without logprobs: none reported
    assert client.chat.completions.create(**chat_args).choices[0].logprobs is None


@pytest.fixture(scope="module")
def prompt_reference(model_dir: Path) -> Any:
    """PROMPT's tokens scored by a plain forward of the model the worker serves (float32 on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.parity import reference_prompt_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return reference_prompt_logprobs(model, AutoTokenizer.from_pretrained(model_dir), PROMPT, 2)


def test_prompt_logprobs_score_the_prompt_as_evaluations_ask(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path, prompt_reference: Any
) -> None:
    """What loglikelihood evaluations send (echo, logprobs, one token): the prompt's tokens lead
    the logprobs, the first with none, each as a plain forward over the prompt scores it; vLLM's
    prompt_logprobs carry the same with ranks; streamed, the echo chunk carries them; chat and the
    job API score their prompt too; prompt_logprobs with stream is vLLM's 400."""
    from tests.parity import assert_logprobs_close

    ids = [t for t, *_ in prompt_reference]
    args: dict[str, Any] = {"model": model_dir.name, "max_tokens": 1, "temperature": 0}
    whole = client.completions.create(prompt=ids, echo=True, logprobs=2, **args)
    choice, want = whole.choices[0], prompt_reference
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert (
        len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    )
    assert lp.text_offset is not None and lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    scored = choice.model_extra["prompt_logprobs"] if choice.model_extra else None
    assert scored is not None and scored[0] is None and len(scored) == len(ids)
    got = []
    for token, position in zip(ids, scored, strict=True):
        if position is None:
            got.append((token, None, (), None))
            continue
        mine = position[str(token)]
        others = sorted(
            ((int(t), e) for t, e in position.items() if e["rank"] <= 2), key=lambda x: x[1]["rank"]
        )
        got.append((token, mine["logprob"], tuple((t, e["logprob"]) for t, e in others), mine["rank"]))
        assert mine["decoded_token"] == lp.tokens[len(got) - 1]  # type: ignore[index]
    assert_logprobs_close(got, want, tolerance=1e-3)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx([w[1] for w in want[1:]], abs=1e-3)
    # streamed: the echo chunk carries the prompt's logprobs, then the token's
    chunks = list(client.completions.create(prompt=ids, echo=True, logprobs=2, stream=True, **args))
    streamed = [
        x
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for x in c.choices[0].logprobs.token_logprobs or []
    ]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)
    # without echo, only the answer's (as before); with prompt_logprobs alone, the field only
    plain = client.completions.create(prompt=ids, logprobs=2, **args).choices[0]
    assert plain.logprobs is not None and len(plain.logprobs.token_logprobs or []) == 1
    assert not (plain.model_extra or {}).get("prompt_logprobs")
    only = client.completions.create(prompt=ids, extra_body={"prompt_logprobs": 0}, **args).choices[0]
    assert only.logprobs is None and len((only.model_extra or {})["prompt_logprobs"]) == len(ids)
    # chat scores its rendered prompt; the job API carries the scores in the job
    chat = client.chat.completions.create(messages=CONVERSATION, extra_body={"prompt_logprobs": 1}, **args)
    assert chat.usage is not None
    assert len((chat.model_extra or {})["prompt_logprobs"]) == chat.usage.prompt_tokens
    job = jobs.post(
        "/v1/jobs", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    )
    done = wait_done(jobs, job.json()["id"])
    assert [e[0] for e in done["prompt_logprobs"]] == ids
    assert [e[1] for e in done["prompt_logprobs"][1:]] == pytest.approx([w[1] for w in want[1:]], abs=1e-3)
    refused = jobs.post("/v1/completions", json={"prompt": PROMPT, "stream": True, "prompt_logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"


def test_a_list_of_prompts_is_a_job_each_answered_together(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    """OpenAI's list of prompts (texts, or lists of token ids): a job each, answered in one
    response, prompt i's choices at i * n + k (as vLLM), each what the prompt alone gives; the
    usage sums them."""
    prompts = [PROMPT, "class Stack:\n", "import os\n"]
    args: dict[str, Any] = {"model": model_dir.name, "max_tokens": 5, "temperature": 0}
    alone = [client.completions.create(prompt=p, **args) for p in prompts]
    together = client.completions.create(prompt=prompts, **args)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert together.usage is not None
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone if a.usage)
    ids = [jobs.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts[:2]]
    two = client.completions.create(prompt=ids, n=2, **args)  # n choices per prompt
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2


def test_a_list_of_prompts_streams_as_vllm_streams_it(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    """A streamed list of prompts: one stream of one id, prompt i's choices at i * n + k, each
    choice's chunks adding up to what the whole answer gives, each ended once; with include_usage
    one usage chunk for every prompt at the end; with continuous usage each chunk carries its own
    prompt's count."""
    prompts = [PROMPT, "class Stack:\n", "import os\n"]
    args: dict[str, Any] = {"model": model_dir.name, "max_tokens": 6, "temperature": 0}
    whole = client.completions.create(prompt=prompts, n=2, **args)
    chunks = list(
        client.completions.create(
            prompt=prompts, n=2, stream=True, stream_options={"include_usage": True}, **args
        )
    )
    *pieces, usage = chunks
    assert len({c.id for c in chunks}) == 1
    texts: dict[int, str] = {}
    ends: dict[int, list[str]] = {}
    for chunk in pieces:
        assert len(chunk.choices) == 1 and chunk.usage is None
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            ends.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {c.index: c.text for c in whole.choices}
    assert ends == {c.index: [c.finish_reason] for c in whole.choices}
    assert usage.choices == [] and usage.usage == whole.usage

    counts = [len(jobs.post("/tokenize", json={"prompt": p}).json()["tokens"]) for p in prompts]
    continuous = client.completions.create(
        prompt=prompts,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        **args,
    )
    *steps, total = list(continuous)
    assert {c.choices[0].index for c in steps} == {0, 1, 2}
    for chunk in steps:
        assert chunk.usage is not None and chunk.usage.prompt_tokens == counts[chunk.choices[0].index]
    assert total.usage is not None and total.usage.prompt_tokens == sum(counts)


def test_a_streamed_list_ends_with_the_error_of_a_job_that_fails(
    service_env: dict[str, str], model_dir: Path
) -> None:
    """A streamed list of prompts one of whose jobs fails after it was accepted (the fault: the
    worker that claimed it died on its last allowed attempt, so the reaper fails it): the stream
    ends with that job's error and [DONE], nothing after; the other jobs are cancelled, not left to
    run for nobody. No worker runs here: every job stays queued until then."""
    with private_stack(service_env, worker=False) as stack, stack.http() as http:
        prompts = ["def a():\n", "def b():\n", "def c():\n"]
        body = {"model": model_dir.name, "prompt": prompts, "max_tokens": 4, "stream": True}

        def fail_the_second() -> None:
            def accepted() -> list[dict[str, Any]]:
                with stack.http() as poll:
                    return list(poll.get("/v1/jobs", params={"limit": 10}).json()["jobs"])

            wait_for(lambda: len(accepted()) == 3, 30, "the list's three jobs")
            (job,) = [j for j in accepted() if j["spec"]["prompt"] == prompts[1]]
            # running, its engine had seated it: a death now is its one run
            stack.client.hset(
                keys.job(job["id"]), mapping={"status": '"running"', "attempt": "1", "seated": "1"}
            )
            stack.client.hset(keys.running("gone"), job["id"], "dead 1")  # no lease: its worker died
            app = make_celery(stack.env["LOCALMOE_REDIS_URL"])
            try:
                assert Reaper(stack.client, app, max_attempts=1, ttl_s=600).sweep() == {"failed": 1}
            finally:
                app.close()

        with ThreadPoolExecutor(1) as pool:
            fault = pool.submit(fail_the_second)
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            fault.result()
        assert data[-1] == "[DONE]" and len(data) == 2, data  # no worker: no text before the error
        error = json.loads(data[0])["error"]
        assert error["type"] == "server_error" and "died under it on 1 attempts" in error["message"]

        def states() -> dict[str, str]:
            listed = http.get("/v1/jobs", params={"limit": 10}).json()["jobs"]
            return {j["spec"]["prompt"]: j["status"] for j in listed}

        ended = dict(zip(prompts, ["cancelled", "failed", "cancelled"], strict=True))
        wait_for(lambda: states() == ended, 30, "the other jobs cancelled")


def test_echo_leads_with_the_prompt(client: openai.OpenAI, model_dir: Path) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    plain = client.completions.create(**args).choices[0].text
    echoed = client.completions.create(**args, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    assert echoed.usage is not None and echoed.usage.completion_tokens <= 8  # usage counts the answer
    chunks = list(client.completions.create(**args, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT  # the prompt comes first, in a chunk of its own
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain


def test_a_prompt_of_token_ids(client: openai.OpenAI, jobs: httpx.Client, model_dir: Path) -> None:
    """OpenAI's token-array prompt: the engine runs those ids as they are (the text prompt's own ids
    give its completion; less the first, one token fewer: nothing added); the record and echo carry their
    text; ids outside the vocabulary (in any prompt of a list), or none, are a 400."""
    ids = jobs.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    args: dict[str, Any] = {"model": model_dir.name, "max_tokens": 6, "temperature": 0}
    by_text = client.completions.create(prompt=PROMPT, **args)
    for prompt in (ids, [ids]):
        by_ids = client.completions.create(prompt=prompt, **args)
        assert by_ids.choices[0].text == by_text.choices[0].text
        assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    job = jobs.get(f"/v1/jobs/{job_id(by_ids.id)}").json()
    assert job["spec"]["prompt_token_ids"] == ids and job["spec"]["prompt"].endswith(PROMPT)
    echoed = client.completions.create(prompt=ids[1:], echo=True, **args)
    assert echoed.usage is not None and echoed.usage.prompt_tokens == len(ids) - 1  # none added
    cut = jobs.post("/detokenize", json={"tokens": ids[1:]}).json()["prompt"]
    assert cut and echoed.choices[0].text.startswith(cut)
    for bad in ([10**7], [-1], [], [ids, [10**7]]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(prompt=bad, **args)
        assert isinstance(e.value.body, dict) and (e.value.body.get("param") or "").startswith("prompt"), bad


def test_streamed_completion_concatenates_to_the_whole(client: openai.OpenAI, model_dir: Path) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "prompt": PROMPT, "max_tokens": 32, "temperature": 0}
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    *pieces, last, usage = chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" and c.model == model_dir.name for c in chunks)
    assert len(pieces) > 1 and all(c.choices[0].finish_reason is None for c in pieces)
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert last.choices[0].text == "" and last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in [*pieces, last])
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == whole.usage.completion_tokens
    # without include_usage: no usage chunk
    plain = list(client.completions.create(**args, stream=True))
    assert plain[-1].choices[0].finish_reason is not None and all(c.usage is None for c in plain)
    assert "".join(c.choices[0].text for c in plain) == whole.choices[0].text


def test_chat_uses_chatml_without_a_template(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    done = client.chat.completions.create(
        model=model_dir.name, messages=CONVERSATION, max_tokens=24, temperature=0
    )
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    [choice] = done.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens > 0
    spec = jobs.get(f"/v1/jobs/{job_id(done.id)}").json()["spec"]
    assert spec["prompt"] == (
        "<|im_start|>system\nYou write short Python functions.<|im_end|>\n"
        "<|im_start|>user\nSort a list of ints.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert spec["stop"] == ["<|im_end|>"] and spec["max_tokens"] == 24
    assert choice.message.content == jobs.get(f"/v1/jobs/{job_id(done.id)}").json()["output"]

    stream = client.chat.completions.create(
        model=model_dir.name,
        messages=CONVERSATION,
        max_completion_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first, *pieces, last, usage = list(stream)
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == choice.message.content
    assert last.choices[0].finish_reason == choice.finish_reason
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == done.usage.completion_tokens


def test_chat_without_max_tokens_may_fill_the_context(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    done = client.chat.completions.create(
        model=model_dir.name, messages=[{"role": "developer", "content": "Be brief."}], stop=["\n"], seed=1
    )
    spec = jobs.get(f"/v1/jobs/{job_id(done.id)}").json()["spec"]
    assert spec["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")  # developer → system
    assert spec["max_tokens"] == 1024  # the server's limit (LOCALMOE_LIMITS__MAX_TOKENS) < the room left
    assert spec["stop"] == ["\n", "<|im_end|>"]
    assert "\n" not in (done.choices[0].message.content or "")


def test_a_model_chat_template_is_used(model_dir: Path, tmp_path: Path) -> None:
    templated = tmp_path / "templated"
    templated.mkdir()
    for f in model_dir.iterdir():
        (templated / f.name).symlink_to(f)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    (templated / "tokenizer_config.json").unlink()
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [ChatMessage.model_validate(m) for m in CONVERSATION]
    rendered = asyncio.run(render_chat(templated, messages))
    prompt, stop = rendered.prompt, rendered.stop
    assert prompt == "[system] You write short Python functions.\n[user] Sort a list of ints.\n[assistant] "
    assert stop == []
    assert asyncio.run(render_chat(model_dir, messages)).stop == ["<|im_end|>"]  # no template: ChatML


def test_an_assistant_message_continued(client: openai.OpenAI, jobs: httpx.Client, model_dir: Path) -> None:
    """vLLM's continue_final_message: the last message left open, the answer its continuation
    (led by it with echo, whole and streamed); add_generation_prompt false alone opens no turn."""
    opened = "def add(a, b):"
    messages: list[Any] = [
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": opened},
    ]
    args: dict[str, Any] = {"model": model_dir.name, "messages": messages, "max_tokens": 8, "temperature": 0}
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    done = client.chat.completions.create(**args, extra_body={**extra, "echo": True})
    job = jobs.get(f"/v1/jobs/{job_id(done.id)}").json()
    assert job["spec"]["prompt"].endswith(f"<|im_end|>\n<|im_start|>assistant\n{opened}")
    assert done.choices[0].message.content == opened + job["output"]
    plain = client.chat.completions.create(**args, extra_body=extra)
    assert plain.choices[0].message.content == job["output"]
    streamed = client.chat.completions.create(**args, extra_body={**extra, "echo": True}, stream=True)
    pieces = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
    assert pieces[0] == opened and "".join(pieces) == done.choices[0].message.content

    closed = client.chat.completions.create(**args, extra_body={"add_generation_prompt": False})
    assert (
        jobs.get(f"/v1/jobs/{job_id(closed.id)}").json()["spec"]["prompt"].endswith(f"{opened}<|im_end|>\n")
    )
    with pytest.raises(openai.BadRequestError) as e:  # vLLM's rule: not both
        client.chat.completions.create(**args, extra_body={"continue_final_message": True})
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "continue_final_message"


def test_a_template_continues_the_final_message(model_dir: Path, tmp_path: Path) -> None:
    templated = tmp_path / "templated"
    templated.mkdir()
    for f in model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (templated / f.name).symlink_to(f)
    (templated / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    messages = [ChatMessage(role="user", content="Hi."), ChatMessage(role="assistant", content="Hello, I am")]
    rendered = asyncio.run(render_chat(templated, messages, add_generation_prompt=False, continue_final=True))
    assert rendered.prompt == "[user] Hi.\n[assistant] Hello, I am"


def test_stop_strings_end_the_text_and_are_left_out(client: openai.OpenAI, model_dir: Path) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    text = client.completions.create(**args).choices[0].text
    assert len(text) > 12, text
    stop = text[8:12]
    for given in (stop, [stop, "\x00never"]):
        cut = client.completions.create(**args, stop=given).choices[0]
        assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    # vLLM's include_stop_str_in_output: the stop string ends the text instead
    kept = client.completions.create(**args, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[: text.index(stop) + len(stop)]


BAD_COMPLETIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"best_of": 3}, "best_of", "best_of"),
    ({"suffix": "}"}, "suffix", "suffix"),
    ({"logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids (digits)"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "outside the model's vocabulary"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids", "outside the model's vocabulary"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"min_tokens": 10}, "min_tokens", "above max_tokens (4)"),
    ({"prompt": ["p"] * 65}, "prompt", "at most 64"),
    ({"prompt": ["one", ""]}, "prompt", "at least 1 character"),
    ({"prompt": [1, "two"]}, "prompt", "string"),  # neither text nor token ids
    ({"prompt": "   "}, "prompt", "empty"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"max_tokens": 0}, "max_tokens", "greater than 0"),
    ({"max_tokens": 5000}, "max_tokens", "above this server's limit of 1024"),
    ({"prompt": "word " * 3000}, "prompt", "the model's context is 2048"),
    ({"stop": [f"s{i}" for i in range(9)]}, "stop", "at most 8"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"priority": "urgent"}, "priority", "'high', 'normal', 'low' or 'batch'"),
    ({"typical_p": 0.9}, "typical_p", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("body", "param", "needle"), BAD_COMPLETIONS, ids=lambda v: str(v)[:40])
def test_bad_completion_is_a_400_with_a_reason(
    client: openai.OpenAI, model_dir: Path, body: dict[str, Any], param: str, needle: str
) -> None:
    known = {"prompt", "max_tokens", "n", "logprobs", "echo", "best_of", "suffix", "logit_bias"}
    known |= {
        "presence_penalty",
        "frequency_penalty",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream_options",
    }
    args = {
        "model": model_dir.name,
        "prompt": PROMPT,
        "max_tokens": 4,
        **{k: v for k, v in body.items() if k in known},
    }
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args, extra_body={k: v for k, v in body.items() if k not in known})
    error = e.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert needle in error["message"], error
    assert error["param"] is not None and error["param"].startswith(param), error


BAD_CHATS: list[tuple[dict[str, Any], str, str]] = [
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0", "needs tool_call_id"),
    ({"messages": [{"role": "critic", "content": "42"}]}, "messages.0.role", "'assistant' or 'tool'"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content",
        "type 'image_url' are not supported",
    ),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", "less than or equal to 20"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"max_completion_tokens": 3000}, "max_completion_tokens", "above this server's limit"),
]


@pytest.mark.parametrize(("body", "param", "needle"), BAD_CHATS, ids=lambda v: str(v)[:40])
def test_bad_chat_is_a_400_with_a_reason(
    client: openai.OpenAI, model_dir: Path, body: dict[str, Any], param: str, needle: str
) -> None:
    args: dict[str, Any] = {"model": model_dir.name, "messages": CONVERSATION, "max_tokens": 4, **body}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    error = e.value.body
    assert isinstance(error, dict) and needle in error["message"], error
    assert error["param"] is not None and error["param"].startswith(param), error


def test_another_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and "gpt-3.5-turbo-instruct" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CONVERSATION, max_tokens=2)


def test_malformed_json_is_an_openai_400(jobs: httpx.Client) -> None:
    r = jobs.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # the rest of the API keeps its own format
    r = jobs.post("/v1/jobs", json={"prompt": PROMPT, "n": 0})
    assert r.status_code == 422 and "detail" in r.json()


def test_unauthenticated_is_401(api_url: str, model_dir: Path) -> None:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key="lm-not-a-real-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=2)
        assert e.value.code == "invalid_api_key" and "unknown API key" in e.value.message
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(f"{api_url}/v1/chat/completions", json={"messages": CONVERSATION})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"


def test_rate_limited_is_429_with_retry_after(
    api_url: str, redis_server: RedisServer, model_dir: Path
) -> None:
    slow = new_key(redis_server, "tests (openai, 1 per minute)", KeyLimits(rate_per_s=1 / 60, burst=1))
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key=slow, max_retries=0) as limited:
        limited.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as e:
            limited.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=1)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert "rate limit" in e.value.message and e.value.code == "rate_limit_exceeded"


def test_a_list_of_prompts_refused_part_way_leaves_no_job_running(
    api_url: str, redis_server: RedisServer, model_dir: Path
) -> None:
    """Two prompts where the key may submit one: the second's refusal (429) cancels the first's
    job, accepted a moment before; no part of the list runs."""
    one = new_key(redis_server, "tests (openai, one at once)", KeyLimits(rate_per_s=1 / 60, burst=1))
    body = {"model": model_dir.name, "prompt": [PROMPT, PROMPT], "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=api_url, timeout=60, headers=bearer(one)) as http:
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 429
        listed = http.get("/v1/jobs").json()["jobs"]
        assert len(listed) == 1
        done = wait_done(http, listed[0]["id"], timeout=30)
    assert done["status"] == "cancelled" and done["usage"]["completion_tokens"] < 400


def test_a_list_refused_part_way_leaves_its_idempotency_key_free(
    service_env: dict[str, str], model_dir: Path
) -> None:
    """A list of three prompts with an Idempotency-Key, for a key that may have two jobs queued (no
    worker: they stay queued): the third's refusal cancels the first two, and the key's claims go
    with them, so the same request sent again is judged again (the same 429, two more jobs made and
    cancelled), not answered by the cancelled jobs of the first try."""
    with private_stack(service_env, worker=False) as stack:
        two = create_key(stack.client, "two queued", Scope.USER, KeyLimits(max_queued_jobs=2)).secret
        body = {"model": model_dir.name, "prompt": [PROMPT, "class A:\n", "import os\n"], "max_tokens": 4}
        with stack.http(two) as http:
            for attempt in (1, 2):
                refused = http.post("/v1/completions", json=body, headers={"Idempotency-Key": "list-1"})
                assert refused.status_code == 429, (attempt, refused.text)
            listed = http.get("/v1/jobs", params={"limit": 10}).json()["jobs"]
        assert [j["status"] for j in listed] == ["cancelled"] * 4


def _long(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 1000,
        "temperature": 1.0,
        "seed": 5,
        "extra_body": {"ignore_eos": True},
    }


def _cancelled_soon(jobs: httpx.Client, left_at: float) -> dict[str, Any]:
    job = newest_job(jobs)
    done = wait_done(jobs, job["id"], timeout=10)
    assert time.monotonic() - left_at < 3.0
    assert done["status"] == "cancelled" and done["finish_reason"] == "abort"
    assert done["usage"]["completion_tokens"] < 1000 and done["spec"]["ignore_eos"] is True
    return done


def test_a_client_leaving_a_sync_call_cancels_its_job(
    api_url: str, key: str, client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    # ~4 s of generation on this CPU model; the client gives up after 1.5 s
    args = _long(model_dir.name)
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=1.5) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(prompt="A long story: " + PROMPT, **args)
        left_at = time.monotonic()
        done = _cancelled_soon(jobs, left_at)
        assert done["spec"]["prompt"] == "A long story: " + PROMPT

        client.chat.completions.create(
            model=model_dir.name, messages=CONVERSATION, max_tokens=1
        )  # loads the template
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(messages=CONVERSATION, **args)
        left_at = time.monotonic()
        assert "Sort a list" in _cancelled_soon(jobs, left_at)["spec"]["prompt"]


def test_closing_a_stream_early_cancels_its_job(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    stream = client.completions.create(
        prompt="A streamed story: " + PROMPT, stream=True, **_long(model_dir.name)
    )
    seen = [next(stream) for _ in range(3)]
    assert all(c.choices[0].text for c in seen)
    stream.close()
    left_at = time.monotonic()
    done = _cancelled_soon(jobs, left_at)
    assert done["id"] == job_id(seen[0].id)

    chat = client.chat.completions.create(messages=CONVERSATION, stream=True, **_long(model_dir.name))
    first = next(chat)
    assert first.choices[0].delta.role == "assistant"
    next(chat)
    chat.close()
    left_at = time.monotonic()
    assert _cancelled_soon(jobs, left_at)["id"] == job_id(first.id)


def test_closing_a_streamed_list_early_cancels_every_job(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    prompts = ["A streamed list: " + PROMPT, "Another: " + PROMPT]
    stream = client.completions.create(prompt=prompts, stream=True, **_long(model_dir.name))
    seen = [next(stream) for _ in range(3)]
    assert all(c.choices[0].text for c in seen)
    stream.close()
    left_at = time.monotonic()
    listed = jobs.get("/v1/jobs", params={"limit": 2}).json()["jobs"]
    assert sorted(j["spec"]["prompt"] for j in listed) == sorted(prompts)
    for job in listed:
        done = wait_done(jobs, job["id"], timeout=10)
        assert done["status"] == "cancelled" and done["usage"]["completion_tokens"] < 1000
    assert time.monotonic() - left_at < 3.0


def test_a_job_of_a_streamed_list_cancelled_elsewhere_ends_its_choice_alone(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    """One prompt's job cancelled through the job API while the list streams: its choice ends
    (finish_reason "abort", as vLLM ends an aborted request) and the other prompt's answer runs to
    its end in the same stream, which closes normally."""
    prompts = ["Cancelled elsewhere: " + PROMPT, "Left alone: " + PROMPT]
    args = {**_long(model_dir.name), "max_tokens": 200}
    stream = client.completions.create(prompt=prompts, stream=True, **args)
    first = next(stream)
    listed = jobs.get("/v1/jobs", params={"limit": 2}).json()["jobs"]
    by_prompt = {j["spec"]["prompt"]: j["id"] for j in listed}
    assert jobs.delete(f"/v1/jobs/{by_prompt[prompts[0]]}").status_code in (200, 202)
    ends: dict[int, list[str]] = {}
    texts = {first.choices[0].index: first.choices[0].text}
    for chunk in stream:
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason is not None:
            ends.setdefault(choice.index, []).append(choice.finish_reason)
    assert ends == {0: ["abort"], 1: ["length"]}
    assert wait_done(jobs, by_prompt[prompts[0]], timeout=10)["status"] == "cancelled"
    left = wait_done(jobs, by_prompt[prompts[1]], timeout=10)
    assert left["status"] == "succeeded" and left["usage"]["completion_tokens"] == 200


def test_finishing_normally_does_not_cancel(
    client: openai.OpenAI, jobs: httpx.Client, model_dir: Path
) -> None:
    chunks = list(client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=8, stream=True))
    job = wait_done(jobs, job_id(chunks[0].id))
    assert job["status"] == "succeeded" and not job["cancel_requested"]
