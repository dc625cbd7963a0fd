"""The job API beyond submit/poll: keys and ownership, listing, idempotency, priorities,
backpressure and webhooks — against the real service (Redis, Celery worker, model, API)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from api.auth import KeyLimits, Scope, create_key
from scheduler import keys
from tests.conftest import Stack, bearer, private_stack, wait_done, wait_for
from tests.receiver import Receiver

PROMPT = "def fibonacci(n):\n"


def make_key(client: redis.Redis, name: str, **limits: object) -> str:
    return create_key(client, name, Scope.USER, KeyLimits.model_validate(limits)).secret


def post(http: httpx.Client, **body: object) -> httpx.Response:
    return http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 8, **body})


# --- keys and ownership ---------------------------------------------------------------------


def test_every_route_but_healthz_needs_a_valid_key(api_url: str, rclient: redis.Redis) -> None:
    assert httpx.get(f"{api_url}/healthz").status_code == 200
    for method, path in [
        ("GET", "/version"),
        ("GET", "/v1/workers"),
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
    ]:
        r = httpx.request(method, api_url + path, json={"prompt": "x"})
        assert r.status_code == 401 and "API key is required" in r.json()["detail"], (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{api_url}/v1/jobs", headers=bearer("lm-nope")).json()["detail"] == "unknown API key"
    assert "not a LocalMoE API key" in httpx.get(f"{api_url}/v1/jobs", headers=bearer("sk-1")).text
    # keys are kept hashed: nothing in Redis holds a key itself
    secret = make_key(rclient, "hashed")
    assert not [
        k for k in rclient.scan_iter("localmoe:apikey*") if secret in k or secret in str(rclient.dump(k))
    ]


def test_a_job_is_visible_only_to_its_key_and_admins(
    http: httpx.Client, admin_http: httpx.Client, api_url: str, rclient: redis.Redis
) -> None:
    job = post(http).json()
    other = httpx.Client(base_url=api_url, headers=bearer(make_key(rclient, "other")), timeout=30)
    for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/events")]:
        r = other.request(method, f"/v1/jobs/{job['id']}{path}")
        assert r.status_code == 404, (method, path, r.status_code)
    ws = api_url.replace("http", "ws") + f"/v1/jobs/{job['id']}/stream"
    with connect(ws, subprotocols=["localmoe", f"bearer.{other.headers['authorization'][7:]}"]) as c:  # type: ignore[list-item]
        with pytest.raises(ConnectionClosed):
            c.recv(timeout=10)
        assert c.close_code == 4404
    assert job["id"] not in [j["id"] for j in other.get("/v1/jobs").json()["jobs"]]
    assert admin_http.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert wait_done(http, job["id"])["status"] == "succeeded"


def test_browser_websocket_authenticates_by_subprotocol(
    http: httpx.Client, api_url: str, user_key: str
) -> None:
    job = post(http, max_tokens=12).json()
    ws = api_url.replace("http", "ws") + f"/v1/jobs/{job['id']}/stream"
    with connect(ws, subprotocols=["localmoe", f"bearer.{user_key}"]) as c:  # type: ignore[list-item]
        assert c.subprotocol == "localmoe"
        messages = [json.loads(m) for m in c]
    assert messages[-1]["type"] == "done"
    with connect(ws) as c:  # no key at all
        with pytest.raises(ConnectionClosed):
            c.recv(timeout=10)
        assert c.close_code == 4401


def test_revoked_key_stops_working(admin_http: httpx.Client, api_url: str) -> None:
    made = admin_http.post("/v1/keys", json={"name": "temp"}).json()
    user = httpx.Client(base_url=api_url, headers=bearer(made["secret"]), timeout=30)
    assert user.get("/v1/jobs").status_code == 200
    assert user.post("/v1/keys", json={"name": "x"}).status_code == 403  # a user key manages no keys
    assert admin_http.delete(f"/v1/keys/{made['key']['id']}").json()["revoked_at"] is not None
    wait_for(lambda: user.get("/v1/jobs").status_code == 401, 3, "the revocation")
    assert user.get("/v1/jobs").json()["detail"] == "this API key has been revoked"
    listed = {k["id"]: k for k in admin_http.get("/v1/keys").json()}
    assert listed[made["key"]["id"]]["revoked_at"] is not None
    assert made["secret"] not in json.dumps(listed)
    assert admin_http.post("/v1/keys", json={"name": ""}).status_code == 422
    assert admin_http.delete("/v1/keys/nothex").status_code == 422


# --- listing and retention -------------------------------------------------------------------


def test_list_jobs_newest_first_with_status_filter_and_pages(
    api_url: str, rclient: redis.Redis, admin_http: httpx.Client
) -> None:
    http = httpx.Client(base_url=api_url, headers=bearer(make_key(rclient, "lister")), timeout=30)
    ids = [post(http, max_tokens=4).json()["id"] for _ in range(5)]
    long = post(http, max_tokens=1000, ignore_eos=True).json()["id"]
    http.delete(f"/v1/jobs/{long}")
    for i in ids:
        wait_done(http, i)
    wait_for(lambda: http.get(f"/v1/jobs/{long}").json()["status"] == "cancelled", 10, "the cancel")

    seen: list[str] = []
    cursor = None
    while True:
        page = http.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["jobs"]]
        assert len(page["jobs"]) <= 2
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [long, *reversed(ids)]  # newest first, every job once
    cancelled = http.get("/v1/jobs", params={"status": "cancelled"}).json()["jobs"]
    assert [j["id"] for j in cancelled] == [long]
    assert all(j["status"] == "succeeded" for j in http.get("/v1/jobs?status=succeeded").json()["jobs"])
    assert http.get("/v1/jobs", params={"everyone": True}).status_code == 403
    everyone = [
        j["id"] for j in admin_http.get("/v1/jobs", params={"everyone": True, "limit": 200}).json()["jobs"]
    ]
    assert set(ids) <= set(everyone)
    assert http.get("/v1/jobs", params={"status": "nope"}).status_code == 422
    assert http.get("/v1/jobs", params={"limit": 0}).status_code == 422
    # retention: the record's time to live is the configured one, and the listing follows it
    assert 0 < rclient.ttl(keys.job(ids[0])) <= 86_400


# --- idempotency -----------------------------------------------------------------------------


def test_idempotency_key_gives_the_same_job_once(
    http: httpx.Client, rclient: redis.Redis, api_url: str
) -> None:
    before = rclient.zcard(keys.ALL_JOBS)
    headers = {"Idempotency-Key": "order-42"}
    first = http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 8}, headers=headers)
    again = http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 8}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert rclient.zcard(keys.ALL_JOBS) == before + 1  # no second job
    done = wait_done(http, first.json()["id"])
    assert done["attempt"] == 1  # generated once
    conflict = http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 9}, headers=headers)
    assert conflict.status_code == 409 and "different request body" in conflict.json()["detail"]
    # keys are per API key: another key's "order-42" is its own
    other = httpx.Client(base_url=api_url, headers=bearer(make_key(rclient, "idem-2")), timeout=30)
    mine = other.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 8}, headers=headers)
    assert mine.status_code == 202 and mine.json()["id"] != first.json()["id"]
    bad = http.post("/v1/jobs", json={"prompt": PROMPT}, headers={"Idempotency-Key": "has space"})
    assert bad.status_code == 422
    assert 0 < rclient.ttl(next(rclient.scan_iter("localmoe:idem:*"))) <= 86_400


# --- priorities --------------------------------------------------------------------------------


def test_priority_is_capped_by_the_key(
    http: httpx.Client, admin_http: httpx.Client, rclient: redis.Redis
) -> None:
    assert post(http, priority="high").json()["priority"] == "normal"  # a user key's ceiling
    assert post(admin_http, priority="high").json()["priority"] == "high"
    assert post(http, priority="low").json()["priority"] == "low"
    assert post(http, priority="urgent").status_code == 422


@pytest.fixture(scope="module")
def small_worker(service_env: dict[str, str]) -> Iterator[Stack]:
    """A worker that runs two jobs at a time, behind its own API."""
    with private_stack(service_env, worker=True, LOCALMOE_ENGINE__MAX_BATCH_SIZE="2") as stack:
        yield stack


def test_a_high_job_starts_before_100_queued_normal_ones(small_worker: Stack) -> None:
    http = small_worker.http()
    normal = [post(http, max_tokens=16, ignore_eos=True).json()["id"] for _ in range(100)]
    high = post(http, max_tokens=16, ignore_eos=True, priority="high").json()["id"]
    jobs = {i: wait_done(http, i) for i in [*normal, high]}
    arrived, began = jobs[high]["timings"]["queued_at"], jobs[high]["timings"]["started_at"]
    waiting = [i for i in normal if jobs[i]["timings"]["started_at"] > arrived]  # queued when it came
    assert len(waiting) >= 50, f"only {len(waiting)} normal jobs were still queued; the test proves little"
    overtaken = [i for i in waiting if jobs[i]["timings"]["started_at"] < began]
    # At most the two messages the worker already held (one per batch slot) start before it.
    assert len(overtaken) <= 2, f"{len(overtaken)} of {len(waiting)} queued normal jobs started first"
    order = sorted(normal, key=lambda i: jobs[i]["timings"]["started_at"])
    assert order[:10] == normal[:10]  # normal jobs among themselves: first come, first served


# --- backpressure ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_worker(service_env: dict[str, str]) -> Iterator[Stack]:
    """An API whose jobs nobody takes: they stay in the backlog."""
    settings = {"LOCALMOE_LIMITS__MAX_QUEUED_JOBS": "5", "LOCALMOE_LIMITS__MAX_QUEUED_TOKENS": "100000"}
    with private_stack(service_env, worker=False, **settings) as stack:
        yield stack


def _broker_messages(client: redis.Redis) -> int:
    return sum(
        int(client.llen(k)) for k in client.scan_iter(f"{keys.SHARED_QUEUE}*") if client.type(k) == "list"
    )


def test_backlog_limits_refuse_with_429_and_enqueue_nothing(no_worker: Stack) -> None:
    a = no_worker.http(make_key(no_worker.client, "a", max_queued_jobs=3))
    b = no_worker.http(make_key(no_worker.client, "b", max_queued_tokens=300))
    ok = [post(a) for _ in range(3)]
    assert [r.status_code for r in ok] == [202] * 3
    refused = post(a)
    assert refused.status_code == 429
    assert "this key has 3 jobs waiting (limit 3)" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 600
    assert _broker_messages(no_worker.client) == 3  # the refused job was never enqueued

    too_big = post(b, max_tokens=400)  # prompt + 400 tokens > the key's 300
    assert too_big.status_code == 429 and "tokens waiting" in too_big.json()["detail"]
    assert post(b, max_tokens=100).status_code == 202
    assert post(b, max_tokens=100).status_code == 202  # 5 jobs waiting: the server's limit
    full = post(b, max_tokens=10)
    assert full.status_code == 429 and "the server has 5 jobs waiting (limit 5)" in full.json()["detail"]

    # a queued job cancelled leaves the backlog: there is room again, for one
    assert a.delete(f"/v1/jobs/{ok[0].json()['id']}").json()["status"] == "cancelled"
    assert post(a).status_code == 202
    assert post(a).status_code == 429
    assert _broker_messages(no_worker.client) == 6
    counts = no_worker.client.hgetall(keys.QUEUED_COUNT)
    assert counts["*"] == "5"


def test_rate_limit_per_key(service_env: dict[str, str]) -> None:
    with private_stack(service_env, worker=False) as stack:
        _rate_limited(stack)
        _burst_admitted_in_batches(stack)


def _rate_limited(stack: Stack) -> None:
    http = stack.http(make_key(stack.client, "slow", rate_per_s=0.5, burst=2))
    codes = [post(http).status_code for _ in range(3)]
    assert codes[:2] == [202, 202] and codes[2] == 429
    r = post(http)
    assert r.status_code == 429 and "rate limit" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 2  # one submission per 2 s


def _burst_admitted_in_batches(stack: Stack) -> None:
    """Requests arriving together are admitted in one batch of the Enqueuer: a burst past a key's
    limit lets exactly the limit in, refuses the rest with the key's reason, records and sends
    nothing of a refused job."""
    key = create_key(stack.client, "burst", Scope.USER, KeyLimits(max_queued_jobs=4))
    http = stack.http(key.secret)
    before = _broker_messages(stack.client)
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: post(http), range(12)))
    accepted = [r.json()["id"] for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code != 202]
    assert len(accepted) == 4, [r.status_code for r in replies]
    assert all(r.status_code == 429 and "this key has 4 jobs waiting" in r.json()["detail"] for r in refused)
    assert 1 <= _broker_messages(stack.client) - before <= 4  # a message may carry several jobs
    assert all(stack.client.exists(keys.job(job_id)) for job_id in accepted)
    assert stack.client.hget(keys.QUEUED_COUNT, key.key.id) == "4"  # the refused were never counted
    waiting = set(stack.client.hkeys(keys.QUEUED_JOBS))
    assert set(accepted) <= waiting


# --- webhooks --------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_webhook_endpoints_and_their_refusals(http: httpx.Client, receiver: Receiver) -> None:
    url = receiver.expect("/unregistered")
    r = post(http, webhook={"url": url})
    assert r.status_code == 422 and "register this URL first" in r.text
    assert http.post("/v1/webhooks", json={"url": "http://10.9.8.7/hook"}).status_code == 422  # not allowed
    bad = http.post("/v1/webhooks", json={"url": "http://169.254.169.254/latest"})
    assert bad.status_code == 422
    assert http.post("/v1/webhooks", json={"url": "ftp://127.0.0.1/x"}).status_code == 422
    made = http.post("/v1/webhooks", json={"url": url}).json()
    assert made["secret"].startswith("whsec_") and made["id"] in [
        e["id"] for e in http.get("/v1/webhooks").json()
    ]
    assert post(http, webhook={"url": url, "events": ["bogus"]}).status_code == 422
    assert http.delete(f"/v1/webhooks/{made['id']}").status_code == 204
    assert http.delete(f"/v1/webhooks/{made['id']}").status_code == 404


def test_webhook_events_are_signed_throttled_and_recorded_on_the_job(
    http: httpx.Client, receiver: Receiver, webhook_worker: None
) -> None:
    url = receiver.expect("/events")
    endpoint = http.post("/v1/webhooks", json={"url": url}).json()
    events = ["started", "output", "completed", "failed", "cancelled"]
    job = post(http, max_tokens=400, ignore_eos=True, webhook={"url": url, "events": events}).json()
    done = wait_done(http, job["id"])
    wait_for(
        lambda: any(b"job.completed" in h.body for h in receiver.to("/events")), 20, "the completed event"
    )

    verifier = Webhook(endpoint["secret"])
    payloads = []
    for hit in receiver.to("/events"):
        payloads.append(verifier.verify(hit.body, hit.headers))  # raises if the signature is wrong
    # Deliveries run in parallel on the webhook worker: they may arrive in any order, but each
    # carries the time its event happened.
    payloads.sort(key=lambda p: p["timestamp"])
    types = [p["type"] for p in payloads]
    assert types[0] == "job.started" and types[-1] == "job.completed", types
    assert payloads[-1]["data"]["output"] == done["output"] and payloads[-1]["data"]["status"] == "succeeded"
    outputs = [p for p in payloads if p["type"] == "job.output"]
    assert outputs, "no output event"
    texts = [p["data"]["output"] for p in outputs]
    assert all(done["output"].startswith(t) for t in texts)  # the text so far
    duration = done["timings"]["finished_at"] - done["timings"]["started_at"]
    assert len(outputs) <= 2 * duration + 1  # at most two per second

    def attempts() -> list[dict[str, object]]:  # recorded once each POST has its answer
        return http.get(f"/v1/jobs/{job['id']}").json()["webhook_attempts"]  # type: ignore[no-any-return]

    wait_for(lambda: len(attempts()) == len(payloads), 10, "every attempt recorded")
    assert {a["outcome"] for a in attempts()} == {"delivered"}


def test_webhook_for_a_cancelled_job(http: httpx.Client, receiver: Receiver, webhook_worker: None) -> None:
    url = receiver.expect("/cancel")
    endpoint = http.post("/v1/webhooks", json={"url": url}).json()
    job = post(http, max_tokens=1000, ignore_eos=True, webhook={"url": url}).json()  # the default events
    wait_for(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 10, "the job to run")
    http.delete(f"/v1/jobs/{job['id']}")
    wait_for(lambda: receiver.to("/cancel"), 10, "the cancelled event")
    (hit,) = receiver.to("/cancel")
    payload = Webhook(endpoint["secret"]).verify(hit.body, hit.headers)
    assert payload["type"] == "job.cancelled" and payload["data"]["status"] == "cancelled"


def test_slow_receiver_does_not_slow_generation(
    http: httpx.Client, receiver: Receiver, webhook_worker: None
) -> None:
    from tests.receiver import Reply

    url = receiver.expect("/slow", Reply(200, delay_s=3.0))
    http.post("/v1/webhooks", json={"url": url})
    hooked = post(http, max_tokens=64, ignore_eos=True, webhook={"url": url, "events": ["started", "output"]})
    plain = post(http, max_tokens=64, ignore_eos=True)
    a, b = wait_done(http, hooked.json()["id"]), wait_done(http, plain.json()["id"])
    took = [j["timings"]["finished_at"] - j["timings"]["started_at"] for j in (a, b)]
    assert took[0] < 2.5, took  # the 3 s receiver sits on the webhook worker, not the engine
