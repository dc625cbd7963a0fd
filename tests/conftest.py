"""Shared fixtures: a real Redis, the real small model, a real Celery worker and the real API,
each started once per test session as separate processes, the way `localmoe up` runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from localmoe.redis_server import RedisServer, free_port
from scheduler import keys
from scheduler.jobs import JobStatus
from scheduler.registry import WorkerInfo

TERMINAL = {s.value for s in JobStatus if s.terminal}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_core.checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("models") / "tiny-mixtral", progress=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def rclient(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def admin_key(redis_server: RedisServer) -> str:
    """An admin API key, made the way `localmoe up` makes its first one."""
    from api.auth import Scope, create_key

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        return create_key(client, "tests (admin)", Scope.ADMIN).secret
    finally:
        client.close()


@pytest.fixture(scope="session")
def user_key(redis_server: RedisServer) -> str:
    from api.auth import Scope, create_key

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        return create_key(client, "tests (user)", Scope.USER).secret
    finally:
        client.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def service_env(
    redis_server: RedisServer, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return {
        **os.environ,
        "LOCALMOE_REDIS_URL": redis_server.url,
        "LOCALMOE_MODEL_DIR": str(model_dir),
        "LOCALMOE_HOME": str(tmp_path_factory.mktemp("home")),
        "LOCALMOE_LIMITS__MAX_TOKENS": "1024",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], redis_server: RedisServer) -> Iterator[str]:
    name = "test-cpu0"
    proc = subprocess.Popen([sys.executable, "-m", "localmoe", "worker", "--name", name], env=service_env)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)

    def ready() -> bool:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        raw = client.get(keys.worker(name))
        return raw is not None and WorkerInfo.model_validate_json(raw).ready

    try:
        wait_for(ready, 120, "the worker to warm up")
        yield name
    finally:
        _stop(proc)
        client.close()


@pytest.fixture(scope="session")
def api_url(service_env: dict[str, str], worker: str, admin_key: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--log-level", "warning"],
        env=service_env,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, f"api exited with {proc.returncode}"
        try:
            return httpx.get(f"{url}/readyz", headers=bearer(admin_key), timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 60, "the API to be ready")
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def http(api_url: str, user_key: str) -> Iterator[httpx.Client]:
    """The API as a user key sees it."""
    with httpx.Client(base_url=api_url, timeout=60, headers=bearer(user_key)) as client:
        yield client


@pytest.fixture
def admin_http(api_url: str, admin_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60, headers=bearer(admin_key)) as client:
        yield client


def wait_done(http: httpx.Client, job_id: str, timeout: float = 120) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} not finished after {timeout}s")
