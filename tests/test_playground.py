"""The playground page in headless Chromium against the real service (API, Redis, Celery worker,
small model): a user's key and prompt, tokens streaming into the page, cancel, and the API's
refusals (401, 422, 429) shown with their reason; the chat mode's conversation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, expect, sync_playwright

from api.auth import KeyLimits, Scope, create_key
from api.playground import STATIC
from localmoe.redis_server import RedisServer

pytestmark = pytest.mark.service  # a browser against the API

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package", allow_module_level=True)

# Without the background-networking flags Chromium keeps dialling out of this offline box.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "def fibonacci(n):\n"

# Records (time, output length, status) at every change of the output or the status, so a test
# can tell afterwards whether the output grew before the final state, however fast the job ran.
TRACE = """() => {
  window.__trace = [];
  const output = document.getElementById("output"), status = document.getElementById("status");
  const record = () => window.__trace.push(
    {t: Date.now(), len: output.textContent.length, status: status.textContent});
  const observer = new MutationObserver(record);
  for (const node of [output, status]) {
    observer.observe(node, {childList: true, characterData: true, subtree: true});
  }
}"""

# The chat's last reply's length at each change of it (the turn being streamed).
CHAT_TRACE = """() => {
  window.__chatTrace = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('[data-role="assistant"] .content');
    if (replies.length) window.__chatTrace.push(replies[replies.length - 1].textContent.length);
  }).observe(document.getElementById("conversation"), {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, api_url: str) -> Iterator[Page]:
    """A fresh profile (empty localStorage) on the API's origin; fails on a script error or a
    Content-Security-Policy violation."""
    context = browser.new_context(base_url=api_url)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    yield page
    context.close()
    assert not problems


def open_playground(page: Page, key: str) -> None:
    page.goto("/playground")
    page.get_by_test_id("api-key").fill(key)


def fill_job(page: Page, max_tokens: int, modality: str = "text", ignore_eos: bool = False) -> None:
    page.get_by_test_id("prompt").fill(PROMPT)
    page.get_by_test_id("modality").select_option(modality)
    page.get_by_test_id("max-tokens").fill(str(max_tokens))
    if ignore_eos:
        page.get_by_test_id("advanced").click()
        page.get_by_test_id("ignore-eos").check()


def test_page_and_assets_load_without_a_key(api_url: str) -> None:
    page = httpx.get(f"{api_url}/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'data-testid="output"' in page.text
    for name, media_type in [("playground.js", "text/javascript"), ("playground.css", "text/css")]:
        r = httpx.get(f"{api_url}/playground/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media_type)
    assert httpx.get(f"{api_url}/v1/jobs").status_code == 401  # the data still needs a key
    assert "innerHTML" not in (STATIC / "playground.js").read_text()  # job data goes in as text only


def test_a_code_job_streams_into_the_page(page: Page, http: httpx.Client, user_key: str) -> None:
    open_playground(page, user_key)
    page.evaluate(TRACE)
    # long enough that the page sees text before the job ends on a loaded box (200 were not, once)
    fill_job(page, max_tokens=400, modality="code", ignore_eos=True)
    page.get_by_test_id("submit").click()

    expect(page.get_by_test_id("status")).to_have_text("succeeded", timeout=60_000)
    job_id = page.get_by_test_id("job-id").inner_text()
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["modality"] == "code"
    assert job["usage"]["completion_tokens"] == 400
    assert page.get_by_test_id("output").text_content() == job["output"]
    expect(page.get_by_test_id("finish-reason")).to_have_text("length")
    expect(page.get_by_test_id("usage")).to_have_text(
        f"{job['usage']['prompt_tokens']} prompt + 400 completion tokens"
    )
    expect(page.get_by_test_id("cancel")).to_be_disabled()

    trace: list[dict[str, Any]] = page.evaluate("window.__trace")
    statuses = [t["status"] for t in trace]
    assert statuses.index("running") < statuses.index("succeeded")
    growing = [t for t in trace if t["status"] == "running" and t["len"] > 0]
    assert growing, "no text appeared while the job was running"
    assert growing[0]["len"] < trace[-1]["len"]  # the output grew in steps...
    assert growing[0]["t"] / 1000 < job["timings"]["finished_at"]  # ...and before the job ended

    row = page.locator(f'[data-testid="job-row"][data-job-id="{job_id}"]')
    expect(row.locator('[data-col="status"]')).to_have_text("succeeded")
    expect(row.locator('[data-col="modality"]')).to_have_text("code")
    expect(row.locator('[data-col="id"]')).to_have_text(job_id[:8])

    page.reload()  # the key is kept in localStorage
    expect(page.get_by_test_id("api-key")).to_have_value(user_key)


def test_cancel_stops_a_streaming_job(page: Page, http: httpx.Client, user_key: str) -> None:
    open_playground(page, user_key)
    fill_job(page, max_tokens=1000, ignore_eos=True)
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("output")).not_to_be_empty(timeout=30_000)
    expect(page.get_by_test_id("status")).to_have_text("running")

    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("status")).to_have_text("cancelled", timeout=30_000)
    expect(page.get_by_test_id("finish-reason")).to_have_text("abort")
    expect(page.get_by_test_id("cancel")).to_be_disabled()
    expect(page.get_by_test_id("submit")).to_be_enabled()
    job = http.get(f"/v1/jobs/{page.get_by_test_id('job-id').inner_text()}").json()
    assert job["status"] == "cancelled" and job["usage"]["completion_tokens"] < 1000


def test_a_wrong_key_shows_the_401_reason(page: Page) -> None:
    open_playground(page, "lm-" + "x" * 43)
    fill_job(page, max_tokens=8)
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("error")).to_have_text("401 Unauthorized: unknown API key")
    expect(page.get_by_test_id("status")).to_have_text("idle")
    expect(page.get_by_test_id("submit")).to_be_enabled()


def test_a_refused_spec_shows_the_422_detail(page: Page, user_key: str) -> None:
    open_playground(page, user_key)
    fill_job(page, max_tokens=5000)
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("error")).to_have_text(
        "422 Invalid Request: body.max_tokens: max_tokens 5000 is above this server's limit of 1024"
    )


def test_a_rate_limited_key_shows_the_429_detail(
    page: Page, http: httpx.Client, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        limits = KeyLimits(rate_per_s=0.01, burst=1)
        key = create_key(client, "tests (playground, rate limited)", Scope.USER, limits).secret
    finally:
        client.close()
    first = http.post(
        "/v1/jobs", json={"prompt": PROMPT, "max_tokens": 1}, headers={"Authorization": f"Bearer {key}"}
    )
    assert first.status_code == 202, first.text
    open_playground(page, key)
    fill_job(page, max_tokens=1)
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("error")).to_contain_text(
        "429 Too Many Requests: rate limit: 0.01 submissions"
    )
    expect(page.get_by_test_id("error")).to_contain_text("retry in")


def chat_mode(page: Page, key: str, max_tokens: int) -> None:
    open_playground(page, key)
    page.get_by_test_id("mode").select_option("chat")
    expect(page.get_by_test_id("job-form")).to_be_hidden()
    page.get_by_test_id("chat-max-tokens").fill(str(max_tokens))


def say(page: Page, text: str) -> None:
    page.get_by_test_id("message").fill(text)
    page.get_by_test_id("send").click()


def test_a_chat_keeps_the_conversation_and_streams_each_turn(
    page: Page, http: httpx.Client, user_key: str
) -> None:
    chat_mode(page, user_key, max_tokens=24)
    page.evaluate(CHAT_TRACE)
    say(page, "Write a Python function that adds two numbers.")
    expect(page.get_by_test_id("chat-finish")).to_have_text(re.compile("^(stop|length)$"), timeout=60_000)
    turns = page.get_by_test_id("turn")
    expect(turns).to_have_count(2)
    expect(turns.nth(0)).to_have_attribute("data-role", "user")
    first_reply = page.get_by_test_id("turn-content").nth(1).text_content() or ""
    first = http.get("/v1/jobs?limit=1").json()["jobs"][0]
    assert first["spec"]["prompt"] == (
        "<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"
    )  # the test model has no chat template: the service's ChatML
    assert first_reply == first["output"] and first_reply
    grew = page.evaluate("window.__chatTrace")
    assert len(set(grew)) > 2, "the reply did not arrive in pieces"  # streamed, not in one piece

    say(page, "Now make it subtract.")
    expect(turns).to_have_count(4)
    expect(page.get_by_test_id("send")).to_be_enabled(timeout=60_000)
    second = http.get("/v1/jobs?limit=1").json()["jobs"][0]
    assert second["id"] != first["id"]
    assert second["spec"]["prompt"].startswith(first["spec"]["prompt"] + first_reply + "<|im_end|>\n")
    assert second["spec"]["prompt"].endswith(
        "<|im_start|>user\nNow make it subtract.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert page.get_by_test_id("turn-content").nth(3).text_content() == second["output"]

    page.get_by_test_id("new-chat").click()
    expect(turns).to_have_count(0)


def test_a_refused_chat_message_goes_back_to_the_box(page: Page) -> None:
    chat_mode(page, "lm-" + "x" * 43, max_tokens=8)
    say(page, "Hello?")
    expect(page.get_by_test_id("error")).to_have_text(re.compile("^401 Unauthorized: .*API key"))
    expect(page.get_by_test_id("turn")).to_have_count(0)
    expect(page.get_by_test_id("message")).to_have_value("Hello?")
    expect(page.get_by_test_id("send")).to_be_enabled()
