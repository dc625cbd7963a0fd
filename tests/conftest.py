"""Shared fixtures: a real Redis, the real small model, a real Celery worker and the real API,
each started once per test session as separate processes, the way `localmoe up` runs them."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
import redis

from localmoe.redis_server import RedisServer, free_port
from scheduler import keys
from scheduler.jobs import JobStatus
from scheduler.registry import WorkerInfo

if TYPE_CHECKING:
    from api.auth import KeyLimits

TERMINAL = {s.value for s in JobStatus if s.terminal}

# A test that uses one of these starts LocalMoE's processes (a worker, the API, their environment):
# it is marked `service`, and `make test-fast` leaves it out. Modules that start processes of
# their own (`localmoe up`, benchmarks, a browser) carry `pytestmark = pytest.mark.service`.
SERVICE_FIXTURES = {"service_env", "worker", "api_url", "http", "admin_http", "webhook_worker"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_build.checkpoint import build_checkpoint

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


@contextmanager
def scratch_db(redis_server: RedisServer, db: int) -> Iterator[redis.Redis]:
    """A Redis database of a test's own, empty before and after (the session's service uses 0)."""
    c = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{db}", decode_responses=True)
    c.flushdb()
    try:
        yield c
    finally:
        c.flushdb()
        c.close()


def new_key(
    redis_server: RedisServer, name: str, limits: KeyLimits | None = None, admin: bool = False
) -> str:
    """A key of its own (a user's unless `admin`; the server's default limits unless `limits`), made
    the way `localmoe up` makes its first one."""
    from api.auth import Scope, create_key

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        return create_key(client, name, Scope.ADMIN if admin else Scope.USER, limits).secret
    finally:
        client.close()


@pytest.fixture(scope="session")
def admin_key(redis_server: RedisServer) -> str:
    return new_key(redis_server, "tests (admin)", admin=True)


@pytest.fixture(scope="session")
def user_key(redis_server: RedisServer) -> str:
    return new_key(redis_server, "tests (user)")


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
        "LOCALMOE_WEBHOOKS__ALLOW": '["127.0.0.1"]',  # the tests' receiver (tests/receiver.py)
        "LOCALMOE_WEBHOOKS__BASE_BACKOFF_S": "0.2",
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
def openai_client(api_url: str, user_key: str) -> Iterator[openai.OpenAI]:
    """The official OpenAI client, as a user key."""
    with openai.OpenAI(base_url=f"{api_url}/v1", api_key=user_key, max_retries=0, timeout=120) as client:
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


@pytest.fixture(scope="session")
def webhook_worker(service_env: dict[str, str], redis_server: RedisServer) -> Iterator[None]:
    """`python -m workers.webhooks` beside the session's service, the way `localmoe up` runs it."""
    from scheduler.queue import make_celery

    proc = subprocess.Popen([sys.executable, "-m", "workers.webhooks"], env=service_env)
    app = make_celery(redis_server.url)

    def ready() -> bool:
        assert proc.poll() is None, f"webhook worker exited with {proc.returncode}"
        replies = app.control.ping(timeout=0.3) or []
        return any(name.startswith("webhooks@") for reply in replies for name in reply)

    try:
        wait_for(ready, 30, "the webhook worker")
        yield
    finally:
        _stop(proc)
        app.close()


@dataclass
class Stack:
    """A service of its own (its own Redis database): for tests that need other settings."""

    api: str
    client: redis.Redis
    admin_key: str
    env: dict[str, str]
    api_proc: subprocess.Popen[bytes]  # the stack's API process (its end stops it if still running)

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=60, headers=bearer(key or self.admin_key))


# Databases for private stacks (7: test_readiness, 11: test_webhooks), handed out in turn: a stack
# flushes its database when it ends and puts it at the back, so it is used again only after every
# other one (by then whatever the stack left running, e.g. a killed worker's engine, has exited).
_PRIVATE_DBS = collections.deque([3, 4, 5, 6, 8, 9, 10, 12, 13, 14, 15])


def start_api(env: dict[str, str], key: str, ready: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """One more API process (uvicorn) on `env`'s Redis; returns once /readyz (or /healthz) is 200."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)]
    proc = subprocess.Popen([*argv, "--log-level", "warning"], env=env)
    api = f"http://127.0.0.1:{port}"
    path = "/readyz" if ready else "/healthz"

    def up() -> bool:
        assert proc.poll() is None, "the API exited"
        try:
            return httpx.get(api + path, headers=bearer(key), timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "the API")
    except BaseException:
        _stop(proc)
        raise
    return proc, api


@contextmanager
def private_stack(service_env: dict[str, str], worker: bool, **settings: str) -> Iterator[Stack]:
    """An API (and a worker, if asked) on a fresh Redis database, with LOCALMOE_* `settings`."""
    from api.auth import Scope, create_key

    db = _PRIVATE_DBS.popleft()
    url = service_env["LOCALMOE_REDIS_URL"].rsplit("/", 1)[0] + f"/{db}"
    env = {**service_env, "LOCALMOE_REDIS_URL": url, **settings}
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    admin = create_key(client, "private stack (admin)", Scope.ADMIN).secret
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if worker:
            name = f"private{url.rsplit('/', 1)[1]}"
            procs.append(
                subprocess.Popen([sys.executable, "-m", "localmoe", "worker", "--name", name], env=env)
            )

            def warm() -> bool:
                assert procs[0].poll() is None, "the private worker exited"
                raw = client.get(keys.worker(name))
                return raw is not None and WorkerInfo.model_validate_json(raw).ready

            wait_for(warm, 120, "the private worker")
        proc, api = start_api(env, admin, ready=worker)
        procs.append(proc)
        yield Stack(api, client, admin, env, proc)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        client.flushdb()
        client.close()
        _PRIVATE_DBS.append(db)
