"""/readyz (and vLLM's /health) follows the worker registry: not ready until a worker says its
engine is warm, and not ready again once its heartbeats stop."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import httpx
import pytest
import redis

from api.auth import Scope, create_key
from localmoe.redis_server import RedisServer, free_port
from scheduler import keys
from scheduler.registry import STALE_AFTER_S, WorkerInfo
from tests.conftest import bearer, wait_for


@pytest.fixture
def empty_api(redis_server: RedisServer, service_env: dict[str, str]) -> Iterator[tuple[str, redis.Redis]]:
    """An API on a Redis database no worker uses."""
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--log-level", "warning"],
        env={**service_env, "LOCALMOE_REDIS_URL": url},
    )
    api = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{api}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        wait_for(up, 30, "the API")
        yield api, client
    finally:
        proc.terminate()
        proc.wait(20)
        client.flushdb()
        client.close()


def _beat(client: redis.Redis, ready: bool, at: float, **fields: Any) -> None:
    info = WorkerInfo(
        name="w",
        pid=1,
        queues=[keys.SHARED_QUEUE],
        engine="torch",
        device="cpu",
        model="m",
        max_context=2048,
        capacity=8,
        ready=ready,
        started_at=at,
        heartbeat_at=at,
    )
    info = info.model_copy(update=fields)
    client.set(keys.worker("w"), info.model_dump_json())
    client.zadd(keys.WORKERS, {"w": at})


def test_ready_only_with_a_warm_worker(empty_api: tuple[str, redis.Redis]) -> None:
    api, client = empty_api
    key = create_key(client, "readiness", Scope.USER).secret
    get = functools.partial(httpx.get, headers=bearer(key))

    def probes() -> tuple[int, dict[str, str], int, int, int]:
        """The probes need no key: /readyz (status and body), vLLM's /health, /ping (GET, POST)."""
        r = httpx.get(f"{api}/readyz")
        ping = httpx.get(f"{api}/ping").status_code, httpx.post(f"{api}/ping").status_code
        return r.status_code, r.json(), httpx.get(f"{api}/health").status_code, *ping

    assert probes() == (503, {"status": "starting"}, 503, 503, 503)  # no worker yet
    _beat(client, ready=False, at=time.time())  # loading its engine
    assert probes() == (503, {"status": "starting"}, 503, 503, 503)
    _beat(client, ready=True, at=time.time())
    assert probes() == (200, {"status": "ready"}, 200, 200, 200)  # ready, and nothing more said
    health = httpx.get(f"{api}/health")
    assert health.content == b"" and httpx.get(f"{api}/ping").content == b""
    _beat(client, ready=True, at=time.time() - STALE_AFTER_S - 1)  # three beats missed: gone
    assert probes() == (503, {"status": "starting"}, 503, 503, 503)
    assert get(f"{api}/v1/workers").json() == []
    assert httpx.get(f"{api}/version").status_code == 401  # not a probe: behind the key
    assert get(f"{api}/version").json() == {"version": metadata.version("localmoe")}


def test_workers_show_the_engine_choice(empty_api: tuple[str, redis.Redis]) -> None:
    """What the engine process reported at start reaches /v1/workers: the engine, why, and where
    the weights that do not fit the GPU budget live."""
    api, client = empty_api
    key = create_key(client, "choice", Scope.USER).secret
    why = "weights 9.52 GB exceed the 4.80 GB …: vLLM with 4.40 GiB of weights per GPU in CPU memory"
    _beat(client, True, time.time(), engine="vllm", engine_reason=why, offload="vllm_cpu", cpu_offload_gb=4.4)
    (w,) = httpx.get(f"{api}/v1/workers", headers=bearer(key)).json()
    assert (w["engine"], w["engine_reason"], w["offload"], w["cpu_offload_gb"]) == (
        "vllm",
        why,
        "vllm_cpu",
        4.4,
    )
