"""Webhooks: the URL policy, Standard Webhooks signatures checked by the independent
`standardwebhooks` package, endpoints in a real Redis, and a real webhook worker process
(`python -m workers.webhooks`) POSTing to a scripted receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from celery import Celery
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from host.settings import WebhookSettings
from localmoe.redis_server import RedisServer
from scheduler import webhooks
from scheduler.jobs import Job, JobSpec, JobStatus, SequenceOutput
from scheduler.notify import event_data
from scheduler.queue import make_celery
from scheduler.webhooks import (
    Delivery,
    Endpoint,
    WebhookAttempt,
    WebhookEventType,
    WebhookSpec,
    check_url,
    delete_endpoint,
    disable_endpoint,
    endpoint_for,
    endpoint_key,
    enqueue_delivery,
    get_endpoint,
    list_endpoints,
    new_secret,
    parse_allowlist,
    read_attempts,
    read_attempts_async,
    register_endpoint,
    sign,
)
from tests.conftest import wait_for
from tests.receiver import Receiver, Reply
from workers.webhooks import backoff_s, parse_retry_after

DB = 11  # a Redis database of its own: its webhook queue has no other consumer
MAX_AGE_S = 2.5
TIMEOUT_S = 0.5
MAX_BACKOFF_S = 1.5

# --- The URL policy -----------------------------------------------------------------------------

CORP = ["*.corp.example", "10.0.0.0/8"]


@pytest.mark.parametrize(
    ("url", "allow", "refused"),
    [
        ("https://hooks.corp.example/x", [], "webhooks are off"),
        # host-name entries: exact, case-insensitive, trailing dot; wildcards for subdomains only
        ("https://hooks.corp.example/x", ["hooks.corp.example"], None),
        ("https://HOOKS.Corp.Example./x", ["hooks.corp.example"], None),
        ("https://other.corp.example/x", ["hooks.corp.example"], "not in the webhook allowlist"),
        ("https://hooks.corp.example/x", CORP, None),
        ("https://a.b.corp.example:8443/x", CORP, None),
        ("https://corp.example/x", ["*.corp.example"], "not in the webhook allowlist"),
        ("https://evilcorp.example/x", ["*.corp.example"], "not in the webhook allowlist"),
        ("https://hooks.corp.example.evil.test/", ["*.corp.example"], "not in the webhook allowlist"),
        # IP and CIDR entries
        ("http://10.20.3.4:8080/h", ["10.20.0.0/16"], None),
        ("http://10.21.0.1/h", ["10.20.0.0/16"], "not in the webhook allowlist"),
        ("http://[fd12::5]/h", ["fd12::/16"], None),
        ("http://127.0.0.1:9/h", CORP, "not in the webhook allowlist"),
        ("http://[::1]:9/h", ["127.0.0.1"], "not in the webhook allowlist"),
        ("http://169.254.169.254/latest/meta-data/", CORP, "not in the webhook allowlist"),
        # URLs no allowlist admits
        ("https://user:pw@hooks.corp.example/x", CORP, "credentials"),
        ("https://user@hooks.corp.example/x", CORP, "credentials"),
        ("ftp://hooks.corp.example/x", CORP, "http or https"),
        ("file:///etc/passwd", CORP, "http or https"),
        ("javascript:alert(1)", CORP, "http or https"),
        ("https:///x", CORP, "no host"),
        ("https://hooks.corp.example:99999/", CORP, "invalid webhook URL"),
        ("https://hooks.corp.example/a b", CORP, "whitespace"),
        ("https://hooks.corp.example/" + "a" * 2048, CORP, "2048"),
    ],
)
def test_url_policy(url: str, allow: list[str], refused: str | None) -> None:
    reason = check_url(url, allow, resolve=False)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def _dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    """getaddrinfo answers `answers[host]` for the names given; IP literals resolve as usual."""
    real = socket.getaddrinfo

    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        if not answers[host]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)


@pytest.mark.parametrize(
    ("url", "allow", "answers", "refused"),
    [
        # special addresses need an IP/CIDR entry containing them; a host-name entry is not enough
        ("http://localhost:8000/h", ["localhost"], ["127.0.0.1"], "loopback"),
        ("http://localhost:8000/h", ["127.0.0.1"], ["127.0.0.1"], None),
        ("http://localhost:8000/h", ["127.0.0.0/8"], ["127.0.0.1", "::1"], "::1, a loopback"),
        ("http://127.0.0.1:8000/h", ["127.0.0.1"], [], None),
        ("http://[::ffff:127.0.0.1]:8000/h", ["127.0.0.1"], [], None),
        ("http://[::ffff:127.0.0.1]:8000/h", CORP, [], "not in the webhook allowlist"),
        ("http://2130706433/h", CORP, [], "127.0.0.1, a loopback"),  # 127.0.0.1 spelled as a number
        ("http://meta.corp.example/h", CORP, ["169.254.169.254"], "cloud-metadata"),
        ("http://meta.corp.example/h", CORP, ["fd00:ec2::254"], "cloud-metadata"),
        ("http://ll.corp.example/h", CORP, ["fe80::1"], "link-local"),
        ("http://any.corp.example/h", CORP, ["0.0.0.0"], "unspecified"),
        ("http://mc.corp.example/h", CORP, ["224.0.0.1"], "multicast"),
        ("http://169.254.169.254/h", ["169.254.169.254"], [], None),  # explicitly allowed by IP
        # a host admitted only by IP/CIDR entries: every address must be inside one
        ("http://hooks.internal/h", ["10.20.0.0/16"], ["10.20.1.5"], None),
        ("http://hooks.internal/h", ["10.20.0.0/16"], ["10.20.1.5", "10.99.0.1"], "10.99.0.1, outside"),
        ("http://hooks.corp.example/h", CORP, ["192.0.2.7"], None),  # admitted by name
        ("http://hooks.corp.example/h", CORP, [], "cannot resolve"),
    ],
)
def test_url_policy_resolved(
    monkeypatch: pytest.MonkeyPatch, url: str, allow: list[str], answers: list[str], refused: str | None
) -> None:
    host = url.split("/")[2].split(":")[0]
    if answers:
        _dns(monkeypatch, {host: answers})
    elif "corp.example" in host:
        _dns(monkeypatch, {host: []})
    reason = check_url(url, allow, resolve=True)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_cidr_only_allowlist_defers_host_names_to_resolution() -> None:
    assert check_url("http://hooks.internal/h", ["10.20.0.0/16"], resolve=False) is None
    assert check_url("http://hooks.internal/h", ["*.corp.example"], resolve=False) is not None


def test_malformed_allowlist_entries_fail() -> None:
    for entry in ["http://hooks.corp.example", "hooks.corp.example/path", "*", "a*.corp.example", ""]:
        with pytest.raises(ValueError):
            parse_allowlist([entry])


def test_webhook_spec() -> None:
    spec = WebhookSpec(url="https://hooks.corp.example/x")
    assert spec.events == ["completed", "failed", "cancelled"]
    assert WebhookSpec.model_validate({"url": "http://h/", "events": ["output"]}).events == ["output"]
    for bad in [
        {"url": "https://hooks.corp.example/x", "events": []},
        {"url": "https://hooks.corp.example/x", "events": ["completed", "completed"]},
        {"url": "https://hooks.corp.example/x", "events": ["finished"]},
        {"url": "https://u:p@hooks.corp.example/x"},
        {"url": "gopher://hooks.corp.example/x"},
        {"url": "https://hooks.corp.example/" + "a" * 2100},
        {"url": "https://hooks.corp.example/x", "secret": "mine"},
    ]:
        with pytest.raises(ValueError):
            WebhookSpec.model_validate(bad)
    assert WebhookEventType.COMPLETED.payload_type == "job.completed"


# --- Signing and retry timing -------------------------------------------------------------------


def test_a_terminal_event_carries_the_logprobs_a_job_asked_for() -> None:
    """The generated tokens' logprobs, and the prompt's, where the job asked for them."""
    spec = JobSpec(prompt="x", logprobs=1)
    lps = [[5, -0.25, [[5, -0.25]]], [7, -1.5, [[9, -0.5]]]]
    asked = Job(spec=spec, status=JobStatus.SUCCEEDED, output="ab", logprobs=lps)
    assert event_data(asked)["logprobs"] == lps and "prompt_logprobs" not in event_data(asked)
    plain = event_data(Job(spec=JobSpec(prompt="x"), status=JobStatus.SUCCEEDED, output="ab"))
    assert "logprobs" not in plain and "prompt_logprobs" not in plain
    scored = [[3, None, [], None], [9, -1.5, [], 4]]
    prompted = Job(
        spec=JobSpec(prompt="x", prompt_logprobs=0), status=JobStatus.SUCCEEDED, prompt_logprobs=scored
    )
    assert event_data(prompted)["prompt_logprobs"] == scored


def test_events_of_a_job_of_n_sequences_carry_every_output() -> None:
    outputs = [SequenceOutput(index=k, text=t, finish_reason="stop") for k, t in enumerate(["ab", "cd"])]
    job = Job(spec=JobSpec(prompt="x", n=2), status=JobStatus.SUCCEEDED, output="ab", outputs=outputs)
    data = event_data(job)
    assert data["output"] == "ab" and [o["text"] for o in data["outputs"]] == ["ab", "cd"]
    so_far = [SequenceOutput(index=k, text=t, finish_reason=None) for k, t in enumerate(["a", ""])]
    assert event_data(job, "a", so_far)["outputs"][1] == {
        "index": 1,
        "text": "",
        "finish_reason": None,
        "logprobs": None,
    }


def test_signature_matches_standard_webhooks() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert new_secret() != secret
    body = b'{"type":"job.completed","data":{"x":"\\u00e9"}}'
    stamp = 1_700_000_000
    theirs = Webhook(secret).sign("msg_1", datetime.fromtimestamp(stamp, UTC), body.decode())
    assert sign(secret, "msg_1", stamp, body) == theirs
    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "msg_1", now, body),
    }
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # the signature covers the id
        Webhook(secret).verify(body, {**headers, "webhook-id": "msg_2"})


def test_retry_after_and_backoff() -> None:
    now = time.time()
    assert parse_retry_after("3", now) == 3.0
    in_5s = format_datetime(datetime.fromtimestamp(now + 5, UTC), usegmt=True)
    assert 3.5 <= (parse_retry_after(in_5s, now) or 0) <= 5.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    s = WebhookSettings(base_backoff_s=1.0, max_backoff_s=10.0)
    waits = [backoff_s(s, 3, None) for _ in range(200)]
    assert all(0 <= w <= 4.0 for w in waits) and max(waits) > 2.0  # full jitter over 1 · 2²
    assert all(backoff_s(s, 40, None) <= 10.0 for _ in range(50))  # capped
    assert backoff_s(s, 1, 7.0) == 7.0  # Retry-After is the least wait...
    assert backoff_s(s, 1, 3600.0) == 10.0  # ...but never past max_backoff_s


# --- Endpoints in Redis -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{DB}"


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def owner() -> str:
    return f"owner-{uuid.uuid4().hex[:8]}"


def test_endpoints(client: redis.Redis, owner: str) -> None:
    a = register_endpoint(client, owner, "https://hooks.corp.example/a")
    assert a.id.startswith("ep_") and a.secret.startswith("whsec_") and not a.disabled
    assert register_endpoint(client, owner, "https://hooks.corp.example/a") == a  # same owner and URL
    b = register_endpoint(client, owner, "https://hooks.corp.example/b")
    other = register_endpoint(client, f"{owner}-other", "https://hooks.corp.example/a")
    assert len({a.id, b.id, other.id}) == 3 and other.secret != a.secret
    assert endpoint_for(client, owner, "https://hooks.corp.example/a") == a
    assert endpoint_for(client, owner, "https://hooks.corp.example/c") is None
    assert get_endpoint(client, b.id) == b
    assert list_endpoints(client, owner) == [a, b]

    assert disable_endpoint(client, a.id, "the receiver answered 410 Gone")
    gone = get_endpoint(client, a.id)
    assert gone is not None and gone.disabled and gone.disabled_reason == "the receiver answered 410 Gone"
    again = register_endpoint(client, owner, "https://hooks.corp.example/a")  # re-enabled, same id and secret
    assert again == a and get_endpoint(client, a.id) == a

    assert not delete_endpoint(client, f"{owner}-other", a.id)  # not theirs
    assert delete_endpoint(client, owner, a.id)
    assert not delete_endpoint(client, owner, a.id)
    assert get_endpoint(client, a.id) is None and endpoint_for(client, owner, a.url) is None
    assert list_endpoints(client, owner) == [b]
    assert not disable_endpoint(client, a.id, "gone")  # a deleted endpoint is not recreated
    assert not client.exists(endpoint_key(a.id))
    fresh = register_endpoint(client, owner, "https://hooks.corp.example/a")
    assert fresh.id != a.id and fresh.secret != a.secret


# --- The webhook worker against a scripted receiver --------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def app(redis_url: str) -> Iterator[Celery]:
    celery = make_celery(redis_url)
    yield celery
    celery.close()


@pytest.fixture(scope="module")
def webhook_worker(redis_url: str, app: Celery, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`python -m workers.webhooks` on its own Redis database, allowed to call 127.0.0.1 only;
    yields its log file."""
    home = tmp_path_factory.mktemp("webhooks-home")
    env = {
        **os.environ,
        "LOCALMOE_REDIS_URL": redis_url,
        "LOCALMOE_HOME": str(home),
        "LOCALMOE_WEBHOOKS__ALLOW": '["127.0.0.1"]',
        "LOCALMOE_WEBHOOKS__BASE_BACKOFF_S": "0.1",
        "LOCALMOE_WEBHOOKS__MAX_BACKOFF_S": str(MAX_BACKOFF_S),
        "LOCALMOE_WEBHOOKS__MAX_AGE_S": str(MAX_AGE_S),
        "LOCALMOE_WEBHOOKS__TIMEOUT_S": str(TIMEOUT_S),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = home / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers.webhooks"], env=env, stdout=log, stderr=log)

    def ready() -> bool:
        assert proc.poll() is None, f"webhook worker exited with {proc.returncode}: {log_path.read_text()}"
        return bool(app.control.ping(timeout=0.3))

    try:
        wait_for(ready, 30, "the webhook worker")
        yield log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_attempts(
    client: redis.Redis, job_id: str, done: Callable[[list[WebhookAttempt]], bool], timeout: float = 10
) -> list[WebhookAttempt]:
    wait_for(lambda: done(read_attempts(client, job_id)), timeout, f"webhook attempts of job {job_id}")
    return read_attempts(client, job_id)


def settled(attempts: list[WebhookAttempt]) -> bool:
    return bool(attempts) and attempts[-1].outcome != "retrying"


@dataclass
class Setup:
    client: redis.Redis
    app: Celery
    receiver: Receiver
    owner: str
    redis_url: str

    def endpoint(self, path: str, *replies: Reply) -> Endpoint:
        return register_endpoint(self.client, self.owner, self.receiver.expect(path, *replies))

    def send(
        self, endpoint: Endpoint, event: WebhookEventType = WebhookEventType.COMPLETED
    ) -> tuple[str, Delivery]:
        job_id = uuid.uuid4().hex
        data = {"id": job_id, "status": "succeeded", "output": "def f():\n    return 'é'"}
        return job_id, enqueue_delivery(self.app, endpoint, job_id, event, data)


@pytest.fixture
def hooks(
    client: redis.Redis, app: Celery, receiver: Receiver, owner: str, redis_url: str, webhook_worker: Path
) -> Setup:
    return Setup(client, app, receiver, owner, redis_url)


def test_retried_with_the_same_id_and_signed_each_time(hooks: Setup) -> None:
    endpoint = hooks.endpoint("/hook", Reply(500), Reply(200))
    job_id, delivery = hooks.send(endpoint)
    attempts = wait_attempts(hooks.client, job_id, settled)

    assert [(a.attempt, a.outcome, a.status_code) for a in attempts] == [
        (1, "retrying", 500),
        (2, "delivered", 200),
    ]
    assert {a.webhook_id for a in attempts} == {delivery.webhook_id}
    assert all(a.url == endpoint.url and a.type == "completed" for a in attempts)
    assert attempts[0].next_attempt_at is not None and attempts[0].next_attempt_at >= attempts[0].at

    hits = hooks.receiver.to("/hook")
    assert len(hits) == 2
    for hit, attempt in zip(hits, attempts, strict=True):
        assert hit.method == "POST" and hit.headers["webhook-id"] == delivery.webhook_id
        assert hit.headers["content-type"] == "application/json"
        assert hit.headers["user-agent"] == "LocalMoE-Webhooks/0.1"
        assert int(hit.headers["webhook-timestamp"]) == int(attempt.at)  # this attempt's time
        assert hit.body == hits[0].body == delivery.body.encode()  # identical bytes every time
        payload = Webhook(endpoint.secret).verify(hit.body, hit.headers)
        assert payload["type"] == "job.completed"
        assert payload["data"] == {"id": job_id, "status": "succeeded", "output": "def f():\n    return 'é'"}
        assert datetime.fromisoformat(payload["timestamp"]).tzinfo is not None
        with pytest.raises(WebhookVerificationError):
            Webhook(endpoint.secret).verify(hit.body.replace(b"succeeded", b"failed"), hit.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(hit.body, hit.headers)


def test_retry_after_is_honoured(hooks: Setup) -> None:
    endpoint = hooks.endpoint("/busy", Reply(429, {"Retry-After": "1"}), Reply(200))
    job_id, _ = hooks.send(endpoint)
    attempts = wait_attempts(hooks.client, job_id, settled)
    assert [a.outcome for a in attempts] == ["retrying", "delivered"]
    first, second = hooks.receiver.to("/busy")
    assert second.at - first.at >= 1.0
    assert (attempts[0].next_attempt_at or 0) - attempts[0].at >= 1.0


def test_410_disables_the_endpoint(hooks: Setup) -> None:
    endpoint = hooks.endpoint("/gone", Reply(410), Reply(200))
    job_id, _ = hooks.send(endpoint)
    attempts = wait_attempts(hooks.client, job_id, settled)
    assert [(a.outcome, a.status_code) for a in attempts] == [("disabled", 410)]
    now = get_endpoint(hooks.client, endpoint.id)
    assert now is not None and now.disabled and "410" in (now.disabled_reason or "")

    later, _ = hooks.send(endpoint, WebhookEventType.FAILED)
    attempts = wait_attempts(hooks.client, later, settled)
    assert [(a.outcome, a.status_code) for a in attempts] == [("disabled", None)]
    assert "disabled" in (attempts[0].error or "")
    assert len(hooks.receiver.to("/gone")) == 1  # not sent

    assert register_endpoint(hooks.client, hooks.owner, endpoint.url) == endpoint  # re-enabled
    again, _ = hooks.send(endpoint)
    assert [a.outcome for a in wait_attempts(hooks.client, again, settled)] == ["delivered"]
    assert len(hooks.receiver.to("/gone")) == 2


def test_redirects_are_not_followed(hooks: Setup) -> None:
    target = hooks.receiver.expect("/target", Reply(200))
    endpoint = hooks.endpoint("/moved", Reply(302, {"Location": target}))
    job_id, _ = hooks.send(endpoint)
    attempts = wait_attempts(hooks.client, job_id, settled)
    assert [(a.outcome, a.status_code) for a in attempts] == [("gave_up", 302)]
    assert "redirects are not followed" in (attempts[0].error or "")
    assert len(hooks.receiver.to("/moved")) == 1
    assert hooks.receiver.to("/target") == []  # a followed redirect lands here before the outcome


def test_a_receiver_that_times_out_is_retried(hooks: Setup) -> None:
    endpoint = hooks.endpoint("/slow", Reply(200, delay_s=TIMEOUT_S + 1.0), Reply(200))
    job_id, delivery = hooks.send(endpoint)
    attempts = wait_attempts(hooks.client, job_id, settled)
    assert [(a.outcome, a.status_code) for a in attempts] == [("retrying", None), ("delivered", 200)]
    assert "timed out" in (attempts[0].error or "")
    assert [h.headers["webhook-id"] for h in hooks.receiver.to("/slow")] == [delivery.webhook_id] * 2


def test_gives_up_after_max_age(hooks: Setup) -> None:
    endpoint = hooks.endpoint("/down", Reply(503))
    job_id, _ = hooks.send(endpoint)
    attempts = wait_attempts(hooks.client, job_id, settled, timeout=MAX_AGE_S + 10)
    assert len(attempts) >= 3
    assert [a.outcome for a in attempts] == ["retrying"] * (len(attempts) - 1) + ["gave_up"]
    assert [a.attempt for a in attempts] == list(range(1, len(attempts) + 1))
    assert all(a.status_code == 503 for a in attempts)
    # no retry planned past the max age from the first attempt (when a planned retry runs is the
    # queue's: on a loaded box it may start a little after)
    first = attempts[0].at
    assert all(
        a.next_attempt_at is not None and a.next_attempt_at - first <= MAX_AGE_S for a in attempts[:-1]
    )
    assert attempts[-1].next_attempt_at is None
    assert "no retry after" in (attempts[-1].error or "")
    assert len(hooks.receiver.to("/down")) == len(attempts)


def test_refused_and_deleted_endpoints_are_not_called(hooks: Setup) -> None:
    # registered behind the API's back: 127.0.0.2 is loopback, and only 127.0.0.1 is allowed
    elsewhere = register_endpoint(hooks.client, hooks.owner, "http://127.0.0.2:9/hook")
    job_id, _ = hooks.send(elsewhere)
    attempts = wait_attempts(hooks.client, job_id, settled)
    assert [(a.outcome, a.status_code) for a in attempts] == [("refused", None)]
    assert "not in the webhook allowlist" in (attempts[0].error or "")

    endpoint = hooks.endpoint("/deleted", Reply(200))
    assert delete_endpoint(hooks.client, hooks.owner, endpoint.id)
    job_id, _ = hooks.send(endpoint)
    attempts = wait_attempts(hooks.client, job_id, settled)
    assert [(a.outcome, a.url) for a in attempts] == [("refused", "")]
    assert "deleted" in (attempts[0].error or "")
    assert hooks.receiver.to("/deleted") == []


def test_attempt_log_expires_with_the_job(hooks: Setup) -> None:
    endpoint = hooks.endpoint("/ok", Reply(204))
    job_id, _ = hooks.send(endpoint, WebhookEventType.STARTED)
    attempts = wait_attempts(hooks.client, job_id, settled)
    assert [(a.outcome, a.status_code, a.type) for a in attempts] == [("delivered", 204, "started")]
    assert 0 < hooks.client.ttl(webhooks.attempts_key(job_id)) <= 86_400
    assert json.loads(hooks.receiver.to("/ok")[0].body)["type"] == "job.started"

    async def read_async() -> list[WebhookAttempt]:
        aclient = redis.asyncio.Redis.from_url(hooks.redis_url, decode_responses=True)
        try:
            return await read_attempts_async(aclient, job_id)
        finally:
            await aclient.aclose()

    assert asyncio.run(read_async()) == attempts
