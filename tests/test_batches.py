"""OpenAI's Batch API against the real service (API → Redis → worker → engine), driven by the
official `openai` client: files.create → batches.create → batches.retrieve → files.content. Each
line's answer must be what the synchronous endpoint answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from standardwebhooks.webhooks import Webhook

from api.auth import KeyLimits
from localmoe.redis_server import RedisServer
from tests.conftest import bearer, new_key, wait_done, wait_for
from tests.receiver import Receiver

CHAT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def key(redis_server: RedisServer) -> str:
    return new_key(redis_server, "tests (batches)")


@pytest.fixture
def client(api_url: str, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60) as c:
        yield c


def body(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"def f{i}(x):"}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return client.files.create(file=("in.jsonl", data), purpose="batch").id


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [] if file_id is None else [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_batch_answers_each_line_as_the_endpoint_does(
    client: openai.OpenAI, api_url: str, key: str
) -> None:
    requests = [body(0), body(1), body(2, n=17)]  # n = 17 (above 16): the endpoint refuses it (400)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": b} for i, b in enumerate(requests)]
    made = client.batches.create(
        input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h", metadata={"run": "t"}
    )
    assert made.id.startswith("batch_") and made.status in ("validating", "in_progress")
    assert made.metadata == {"run": "t"} and made.expires_at == made.created_at + 24 * 3600
    done = wait(client, made.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at and done.in_progress_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)

    output = {x["custom_id"]: x for x in lines_of(client, done.output_file_id)}
    errors = {x["custom_id"]: x for x in lines_of(client, done.error_file_id)}
    assert set(output) == {"r0", "r1"} and set(errors) == {"r2"}
    with httpx.Client(base_url=api_url, headers=bearer(key), timeout=60) as http:
        for cid, request in zip(("r0", "r1"), requests, strict=False):
            line = output[cid]
            assert line["id"].startswith("batch_req_") and line["error"] is None
            assert line["response"]["status_code"] == 200
            got = line["response"]["body"]
            want = http.post(CHAT, json=request).json()  # the synchronous endpoint, same request
            assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
            assert got["id"] == f"chatcmpl-{line['response']['request_id']}"
            job = http.get(f"/v1/jobs/{line['response']['request_id']}").json()
            assert (
                job["priority"] == "batch" and job["status"] == "succeeded"
            )  # an ordinary job, the batch tier
        refused = http.post(CHAT, json=requests[2])
        assert errors["r2"]["response"] == {"status_code": 400, "request_id": None, "body": refused.json()}

    assert made.id in [b.id for b in client.batches.list()]
    outputs = {f.id for f in client.files.list(purpose="batch_output")}
    assert {done.output_file_id, done.error_file_id} <= outputs


def test_cancel_mid_run_accounts_for_every_line(client: openai.OpenAI) -> None:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": body(i, max_tokens=64, ignore_eos=True)}
        for i in range(150)
    ]
    made = client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h")
    time.sleep(0.5)
    assert client.batches.cancel(made.id).status == "cancelling"
    done = wait(client, made.id)
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    seen = lines_of(client, done.output_file_id) + lines_of(client, done.error_file_id)
    assert sorted(x["custom_id"] for x in seen) == sorted(x["custom_id"] for x in lines)  # each once
    never = [x for x in seen if x["response"] is None]
    assert never and all(x["error"]["code"] == "batch_cancelled" for x in never)
    counts = done.request_counts
    assert counts.total == 150 and counts.completed + counts.failed == 150 and counts.failed >= len(never)


def test_a_line_for_another_endpoint_fails_the_batch(client: openai.OpenAI) -> None:
    lines = [
        {"custom_id": "a", "method": "POST", "url": CHAT, "body": body(0)},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    made = client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h")
    done = wait(client, made.id)
    assert done.status == "failed" and done.failed_at and done.errors and done.errors.data
    [error] = done.errors.data
    assert (error.line, error.param, error.code) == (2, "url", "invalid_url")


def test_refusals(client: openai.OpenAI, api_url: str, user_key: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id="file-" + "0" * 32, endpoint=CHAT, completion_window="24h")
    assert "No such File object" in str(e.value)
    lines = [{"custom_id": "a", "method": "POST", "url": CHAT, "body": body(0)}]
    made = client.batches.create(input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h")
    with httpx.Client(base_url=api_url, headers=bearer(user_key), timeout=30) as other:
        r = other.get(f"/v1/batches/{made.id}")
        assert r.status_code == 404 and r.json()["error"]["param"] == "batch_id"
        assert other.post(f"/v1/batches/{made.id}/cancel").status_code == 404
    wait(client, made.id)


def test_a_key_has_at_most_its_batches_and_lines_in_flight(api_url: str, redis_server: RedisServer) -> None:
    key = new_key(redis_server, "tests (batch limits)", KeyLimits(max_batches=1, batch_lines_in_flight=2))
    lines = [
        {"custom_id": f"l{i}", "method": "POST", "url": CHAT, "body": body(i, max_tokens=16, ignore_eos=True)}
        for i in range(8)
    ]
    with (
        openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60) as c,
        httpx.Client(base_url=api_url, headers=bearer(key), timeout=30) as http,
    ):
        file_id = upload(c, lines)
        first = c.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.RateLimitError) as refused:
            c.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        assert refused.value.response.headers["Retry-After"] == "60"
        error = refused.value.response.json()["error"]
        assert error["code"] == "batch_limit_reached"
        assert error["message"].startswith("this key has 1 batches that have not ended (limit 1")

        most = 0
        while c.batches.retrieve(first.id).status not in TERMINAL:
            jobs = http.get("/v1/jobs", params={"limit": 20}).json()["jobs"]
            most = max(most, sum(j["status"] in ("queued", "running") for j in jobs))
            time.sleep(0.02)
        assert most == 2  # the key's two lines in flight, never more
        assert wait(c, first.id).request_counts.completed == 8
        second = c.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        c.batches.cancel(second.id)
        assert wait(c, second.id).status == "cancelled"


COMPLETIONS = "/v1/completions"


def _jobs(http: httpx.Client) -> list[dict[str, Any]]:
    return http.get("/v1/jobs", params={"limit": 50}).json()["jobs"]  # type: ignore[no-any-return]


def test_a_completions_line_with_a_list_of_prompts_answers_as_the_endpoint_does(
    api_url: str, redis_server: RedisServer, model_dir: Path
) -> None:
    """A line with a list of three prompts gets a job per prompt and the endpoint's answer: prompt
    i's choices at i × n + k, the usage of all three. The key may take one submission a second
    (burst 1): the line is refused part way at each try, and each try goes on from the prompt
    refused (its earlier jobs found again by their keys), never cancelling what it accepted; a
    list whose refusal cancelled its jobs would make one job a try and never finish."""
    slow = new_key(redis_server, "tests (batches, one a second)", KeyLimits(rate_per_s=1, burst=1))
    prompts = ["def f(x):", "class A:", "import os"]
    request = {"model": model_dir.name, "prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2}
    lines = [
        {"custom_id": "list", "method": "POST", "url": COMPLETIONS, "body": request},
        {"custom_id": "one", "method": "POST", "url": COMPLETIONS, "body": {**request, "prompt": ["x = 1"]}},
    ]
    with (
        openai.OpenAI(base_url=f"{api_url}/v1", api_key=slow, max_retries=0, timeout=60) as c,
        httpx.Client(base_url=api_url, headers=bearer(slow), timeout=60) as http,
    ):
        made = c.batches.create(input_file_id=upload(c, lines), endpoint=COMPLETIONS, completion_window="24h")
        done = wait(c, made.id)
        assert done.status == "completed" and done.request_counts.completed == 2
        output = {x["custom_id"]: x["response"] for x in lines_of(c, done.output_file_id)}
        jobs = _jobs(http)
        assert len(jobs) == 4 and {j["status"] for j in jobs} == {"succeeded"}  # none made twice
        assert {j["priority"] for j in jobs} == {"batch"}
        got = output["list"]["body"]
        assert [ch["index"] for ch in got["choices"]] == list(range(6)) and got["usage"]["prompt_tokens"] > 0
        assert got["id"] == f"cmpl-{output['list']['request_id']}"
    with httpx.Client(
        base_url=api_url, headers=bearer(new_key(redis_server, "tests (batches, sync)")), timeout=60
    ) as h:
        want = h.post(COMPLETIONS, json=request).json()  # the synchronous endpoint, same request
    assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    assert len(output["one"]["body"]["choices"]) == 2


def test_a_list_line_refused_part_way_for_good_cancels_the_jobs_it_accepted(
    api_url: str, redis_server: RedisServer, model_dir: Path
) -> None:
    """A list whose second prompt is over the model's context: the line's answer is the endpoint's
    refusal, and the job its first prompt had by then is cancelled (not left running for nobody),
    as the synchronous route cancels it; only pacing refusals keep a list's jobs for the next try."""
    key = new_key(redis_server, "tests (batches, a list refused)")
    request = {
        "model": model_dir.name,
        "prompt": ["def f(x):", "word " * 3000],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    line = {"custom_id": "over", "method": "POST", "url": COMPLETIONS, "body": request}
    with (
        openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60) as c,
        httpx.Client(base_url=api_url, headers=bearer(key), timeout=60) as http,
    ):
        made = c.batches.create(
            input_file_id=upload(c, [line]), endpoint=COMPLETIONS, completion_window="24h"
        )
        done = wait(c, made.id)
        [error] = lines_of(c, done.error_file_id)
        assert error["response"]["status_code"] == 400 and "context is 2048" in json.dumps(error["response"])
        [job] = _jobs(http)
        ended = wait_done(http, job["id"], timeout=30)
    assert ended["status"] == "cancelled" and ended["usage"]["completion_tokens"] < 400


def test_a_cancelled_batch_cancels_every_job_of_a_list_line(
    api_url: str, redis_server: RedisServer, model_dir: Path
) -> None:
    """Cancelled mid-run, a batch's lines with lists of prompts end as never run and every job
    they made is cancelled (each prompt's, found by its own key), not left running."""
    key = new_key(redis_server, "tests (batches, cancelled lists)")
    request = {"model": model_dir.name, "max_tokens": 1000, "ignore_eos": True, "temperature": 1.0}
    lines = [
        {"custom_id": f"l{i}", "method": "POST", "url": COMPLETIONS,
         "body": {**request, "prompt": [f"def f{i}(x):", f"class A{i}:", f"import m{i}"]}}
        for i in range(4)
    ]  # fmt: skip
    with (
        openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=0, timeout=60) as c,
        httpx.Client(base_url=api_url, headers=bearer(key), timeout=60) as http,
    ):
        made = c.batches.create(input_file_id=upload(c, lines), endpoint=COMPLETIONS, completion_window="24h")
        wait_for(lambda: any(j["status"] == "running" for j in _jobs(http)), 60, "a line's job to run")
        assert c.batches.cancel(made.id).status == "cancelling"
        done = wait(c, made.id)
        assert done.status == "cancelled"
        seen = lines_of(c, done.output_file_id) + lines_of(c, done.error_file_id)
        assert sorted(x["custom_id"] for x in seen) == [f"l{i}" for i in range(4)]
        wait_for(
            lambda: all(j["status"] in ("succeeded", "cancelled", "failed") for j in _jobs(http)),
            20,
            "every job of the batch to end",
        )
        jobs = _jobs(http)
    cancelled = [j for j in jobs if j["status"] == "cancelled"]
    assert cancelled and all(j["usage"]["completion_tokens"] < 1000 for j in cancelled)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_a_batch_calls_its_webhook_when_it_ends(
    client: openai.OpenAI, api_url: str, key: str, receiver: Receiver, webhook_worker: None
) -> None:
    url = receiver.expect("/batches")
    with httpx.Client(base_url=api_url, headers=bearer(key), timeout=30) as http:
        secret = http.post("/v1/webhooks", json={"url": url}).json()["secret"]
    lines = [{"custom_id": "a", "method": "POST", "url": CHAT, "body": body(0)}]
    file_id = upload(client, lines)
    done = client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", extra_body={"webhook": {"url": url}}
    )
    only_cancel = {"webhook": {"url": url, "events": ["batch.cancelled"]}}
    quiet = client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", extra_body=only_cancel
    )
    cancelled = client.batches.create(
        input_file_id=upload(
            client, [{"custom_id": "x", "method": "POST", "url": CHAT, "body": body(0, max_tokens=512)}]
        ),
        endpoint=CHAT,
        completion_window="24h",
        extra_body=only_cancel,
    )
    client.batches.cancel(cancelled.id)
    ended = [wait(client, b.id) for b in (done, quiet, cancelled)]
    assert [b.status for b in ended] == ["completed", "completed", "cancelled"]
    wait_for(lambda: len(receiver.to("/batches")) >= 2, 20, "the two events")
    time.sleep(0.5)  # nothing else comes: the quiet batch asked only for batch.cancelled
    payloads = [Webhook(secret).verify(h.body, h.headers) for h in receiver.to("/batches")]
    by_type = {p["type"]: p["data"] for p in payloads}
    assert len(payloads) == 2 and set(by_type) == {"batch.completed", "batch.cancelled"}
    with httpx.Client(base_url=api_url, headers=bearer(key), timeout=30) as http:
        as_ended = http.get(f"/v1/batches/{done.id}").json()
    assert by_type["batch.completed"] == as_ended  # the Batch object, as it ended
    assert (
        by_type["batch.cancelled"]["id"] == cancelled.id
        and by_type["batch.cancelled"]["status"] == "cancelled"
    )

    with pytest.raises(openai.BadRequestError) as refused:  # not registered
        client.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            extra_body={"webhook": {"url": url + "-other"}},
        )
    assert "register this URL first" in str(refused.value)


def test_the_cli_submits_watches_lists_downloads_and_cancels(
    api_url: str, key: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**service_env, "LOCALMOE_API_URL": api_url, "LOCALMOE_API_KEY": key}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "localmoe", "batches", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

    requests = tmp_path / "in.jsonl"
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": body(i)} for i in range(3)]
    lines.append({"custom_id": "bad", "method": "POST", "url": CHAT, "body": body(9, n=17)})
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    done = cli("submit", str(requests), "--metadata", "team=qa", "--watch", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip()
    assert "4/4" in done.stderr and f"{batch_id}: completed" in done.stderr  # the bar's last state
    output = [json.loads(x) for x in (tmp_path / f"{batch_id}_output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / f"{batch_id}_error.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in output] == ["c0", "c1", "c2"] and [x["custom_id"] for x in errors] == [
        "bad"
    ]

    listed = cli("list").stdout.splitlines()
    assert listed[0].split()[:3] == [batch_id, "completed", "4/4"]
    shown = json.loads(cli("show", batch_id).stdout)
    assert shown["metadata"] == {"team": "qa"} and shown["request_counts"]["completed"] == 3
    streamed = cli("download", batch_id, "--out", "-").stdout.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in streamed) == ["bad", "c0", "c1", "c2"]

    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"custom_id": "x", "method": "POST", "url": CHAT, "body": body(0, max_tokens=512)})
    )
    made = cli("submit", str(long))
    cancelled = cli("cancel", made.stdout.strip())
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] in ("cancelling", "cancelled")
    watched = cli("watch", made.stdout.strip())
    assert watched.returncode == 1 and watched.stderr.rstrip().endswith("cancelled")
    assert cli("show", "batch_" + "0" * 32).returncode == 1
