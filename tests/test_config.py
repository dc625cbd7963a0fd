"""Live configuration (versions in Redis, hot sections only) and a stateless API: a job made
through one API process is polled, streamed and cancelled through another."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from api.auth import Scope, create_key
from host import config_store
from host import keys as host_keys
from host.config_store import ConfigError
from host.settings import Settings
from localmoe.redis_server import RedisServer
from tests.conftest import Stack, _stop, bearer, private_stack, scratch_db, start_api, wait_done, wait_for

PROMPT = "def fibonacci(n):\n"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with scratch_db(redis_server, 1) as c:
        yield c


def test_versions_set_validate_and_roll_back(client: redis.Redis) -> None:
    base = Settings()
    assert config_store.current(client).number == 0
    v1 = config_store.set_values(client, base, {"limits.max_queued_jobs": 7}, by="alice", note="tight")
    v2 = config_store.set_values(client, base, {"scheduler.policy": "shared"}, by="bob")
    assert (v1.number, v2.number) == (1, 2)
    assert v2.overrides == {"limits.max_queued_jobs": 7, "scheduler.policy": "shared"}
    live = config_store.apply(base, v2.overrides)
    assert live.limits.max_queued_jobs == 7 and live.scheduler.policy == "shared"
    assert live.limits.max_tokens == base.limits.max_tokens  # untouched settings stay the base's

    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        config_store.set_values(client, base, {"limits.max_queued_jobs": 0}, by="x")
    with pytest.raises(ConfigError, match="not changeable while running: model_dir"):
        config_store.set_values(client, base, {"model_dir": "/elsewhere"}, by="x")
    with pytest.raises(ConfigError, match="no such setting"):
        config_store.set_values(client, base, {"limits.nope": 1}, by="x")
    with pytest.raises(ConfigError, match="allowlist entry"):
        config_store.set_values(client, base, {"webhooks.allow": ["10.0.0.0/33"]}, by="x")
    assert config_store.current(client).number == 2  # refused changes make no version

    v3 = config_store.rollback(client, base, 1, by="carol")
    assert v3.number == 3 and v3.overrides == v1.overrides and "version 1" in (v3.note or "")
    v4 = config_store.set_values(client, base, {"limits.max_queued_jobs": None}, by="dave")  # unset
    assert v4.overrides == {}
    assert [(v.number, v.by) for v in config_store.history(client)] == [
        (1, "alice"),
        (2, "bob"),
        (3, "carol"),
        (4, "dave"),
    ]
    with pytest.raises(ConfigError, match="no version 9"):
        config_store.rollback(client, base, 9, by="x")


def test_concurrent_changes_each_get_a_version(client: redis.Redis) -> None:
    base = Settings()
    threads = [
        threading.Thread(
            target=config_store.set_values, args=(client, base, {"limits.per_key_burst": 10 + i}, f"t{i}")
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = [v.number for v in config_store.history(client)]
    assert numbers == list(range(1, 9))  # none lost, none doubled


def test_watcher_applies_a_new_version_and_skips_a_bad_one(client: redis.Redis) -> None:
    base = Settings()
    seen: list[int] = []
    watcher = config_store.ConfigWatcher(client, base, lambda s, v: seen.append(s.limits.max_tokens))
    watcher.check()
    assert seen == []  # version 0: nothing to apply
    config_store.set_values(client, base, {"limits.max_tokens": 99}, by="x")
    watcher.check()
    watcher.check()
    assert seen == [99]  # once per version
    client.set(
        host_keys.CONFIG_CURRENT,
        config_store.Version(number=5, overrides={"limits.max_tokens": -1}).model_dump_json(),
    )
    watcher.check()
    assert seen == [99]  # a version that does not validate here is skipped


@pytest.fixture(scope="module")
def stack(service_env: dict[str, str]) -> Iterator[Stack]:
    with private_stack(service_env, worker=True) as s:
        yield s


def test_config_through_the_api_and_cli_reaches_every_process(
    stack: Stack, service_env: dict[str, str]
) -> None:
    admin = stack.http()
    user = stack.http(create_key(stack.client, "user", Scope.USER).secret)
    second, second_url = start_api(stack.env, stack.admin_key)  # another API process, same Redis
    try:
        other = httpx.Client(base_url=second_url, headers=bearer(stack.admin_key), timeout=30)
        assert user.get("/v1/config").status_code == 403
        assert admin.patch("/v1/config", json={"set": {"limits.max_tokens": 0}}).status_code == 422
        cold = admin.patch("/v1/config", json={"set": {"redis_url": "redis://x"}})
        assert cold.status_code == 422 and "not changeable while running" in cold.json()["detail"]

        env = {**stack.env, "LOCALMOE_API_URL": stack.api, "LOCALMOE_API_KEY": stack.admin_key}
        cli = [sys.executable, "-m", "localmoe", "config"]
        done = subprocess.run(
            [*cli, "set", "limits.max_tokens=12", "--note", "test"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["effective"]["limits"]["max_tokens"] == 12
        # this API applied it at once; the other within the watcher's poll
        big = {"prompt": PROMPT, "max_tokens": 20}
        assert admin.post("/v1/jobs", json=big).status_code == 422
        wait_for(lambda: other.post("/v1/jobs", json=big).status_code == 422, 5, "the second API")

        # the worker picks up the engine's hot settings too
        assert admin.patch("/v1/config", json={"set": {"engine.step_delay_s": 0.05}}).status_code == 200
        time.sleep(config_store.POLL_S + 1)
        slow = wait_done(
            admin,
            admin.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 10, "ignore_eos": True}).json()[
                "id"
            ],
        )
        assert slow["timings"]["finished_at"] - slow["timings"]["started_at"] >= 0.45  # 10 steps × 50 ms

        history = subprocess.run([*cli, "history"], env=env, capture_output=True, text=True)
        assert history.returncode == 0 and "v1" in history.stdout and "limits.max_tokens" in history.stdout
        back = subprocess.run([*cli, "rollback", "0"], env=env, capture_output=True, text=True)
        assert back.returncode == 0, back.stderr
        assert admin.post("/v1/jobs", json=big).status_code == 202
        wait_for(lambda: other.post("/v1/jobs", json=big).status_code == 202, 5, "the rollback")
        assert [v["number"] for v in admin.get("/v1/config/history").json()] == [1, 2, 3]
    finally:
        _stop(second)


def test_a_job_is_polled_streamed_and_cancelled_through_another_api(stack: Stack) -> None:
    second, second_url = start_api(stack.env, stack.admin_key)
    try:
        a = stack.http()
        b = httpx.Client(base_url=second_url, headers=bearer(stack.admin_key), timeout=30)
        job = a.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 16}).json()
        assert wait_done(b, job["id"])["status"] == "succeeded"
        with b.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            text = "".join(
                json.loads(line[5:])["text"]
                for line in r.iter_lines()
                if line.startswith("data:") and '"text"' in line
            )
        assert text == a.get(f"/v1/jobs/{job['id']}").json()["output"]
        long = a.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}).json()
        wait_for(lambda: b.get(f"/v1/jobs/{long['id']}").json()["status"] == "running", 10, "the job to run")
        assert b.delete(f"/v1/jobs/{long['id']}").status_code == 202
        done = wait_done(a, long["id"])
        assert done["status"] == "cancelled" and done["usage"]["completion_tokens"] < 1000
    finally:
        _stop(second)
