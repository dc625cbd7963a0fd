"""Security by default, as tests: every route but the public ones refuses a missing or wrong
key; workers refuse pickle; Flower and Redis need their passwords (tests/test_up.py)."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from api.main import app
from scheduler import keys
from scheduler.queue import make_celery
from tests.conftest import bearer, wait_done

# Pages that carry no data: the probes (they say ready or not, no more), the API's own docs, the
# playground shell (which asks for a key).
PUBLIC = {"/healthz", "/health", "/readyz", "/ping"}
PUBLIC |= {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PUBLIC_PREFIX = "/playground"

_SAMPLE = {
    "job_id": uuid.uuid4().hex,
    "key_id": "0123456789ab",
    "endpoint_id": "ep_0123",
    "model": "tiny-mixtral",
}


def _routes() -> list[tuple[str, str]]:
    """Every operation of the OpenAPI schema (each router's routes), with sample path values."""
    out = []
    for template, operations in app.openapi()["paths"].items():
        if template in PUBLIC or template.startswith(PUBLIC_PREFIX):
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: _SAMPLE.get(m.group(1), "x"), template)
        out += [(method.upper(), path) for method in sorted(operations)]
    return out


ROUTES = _routes()


def test_the_route_list_is_complete() -> None:
    paths = {p for _, p in ROUTES}
    for needed in ("/v1/jobs", "/v1/keys", "/v1/config", "/v1/webhooks", "/v1/chat/completions", "/version"):
        assert needed in paths, needed  # a new router that is not here would be tested too


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_refuses_missing_and_wrong_keys(api_url: str, method: str, path: str) -> None:
    for headers in ({}, bearer("lm-not-a-real-key"), {"Authorization": "Basic YWRtaW46YWRtaW4="}):
        r = httpx.request(method, api_url + path, headers=headers, json={}, timeout=10)
        assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])


@pytest.mark.parametrize("path", [*sorted(PUBLIC - {"/docs/oauth2-redirect", "/redoc"}), "/playground"])
def test_public_pages_carry_no_data(api_url: str, path: str) -> None:
    r = httpx.get(api_url + path, timeout=10)
    assert r.status_code == 200
    assert not re.search(r"lm-[\w-]{40,}|whsec_[\w+/=]{20,}", r.text)  # no key, no signing secret


def test_admin_routes_refuse_a_user_key(http: httpx.Client) -> None:
    assert http.get("/v1/keys").status_code == 403
    assert http.post("/v1/keys", json={"name": "x"}).status_code == 403
    assert http.get("/v1/config").status_code == 403
    assert http.get("/v1/jobs", params={"everyone": True}).status_code == 403


class _Evil:
    """Unpickling this creates a file: the proof that a pickle was deserialized."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_workers_refuse_pickle_messages(
    http: httpx.Client, redis_server: object, tmp_path: Path, rclient: redis.Redis, worker: str
) -> None:
    marker = tmp_path / "unpickled"
    celery = make_celery(_url(rclient))
    celery.send_task(
        keys.RUN_JOB_TASK, args=[_Evil(marker)], queue=keys.worker_queue(worker), serializer="pickle"
    )
    celery.send_task(keys.RUN_JOB_TASK, args=[_Evil(marker)], queue=keys.SHARED_QUEUE, serializer="pickle")
    # the worker takes them off its queues (and refuses them) before this job, sent after them
    job = http.post("/v1/jobs", json={"prompt": "x", "max_tokens": 4}).json()
    assert wait_done(http, job["id"])["status"] == "succeeded"
    time.sleep(1.0)
    assert not marker.exists(), "a pickle message was deserialized"
    lists = [
        k for k in rclient.scan_iter(f"{keys.WORKER_QUEUE_PREFIX}{worker}*") if rclient.type(k) == "list"
    ]
    assert sum(int(rclient.llen(k)) for k in lists) == 0  # consumed and dropped, not left behind
    celery.close()


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://:{kw['password']}@{kw['host']}:{kw['port']}/{kw.get('db', 0)}"
