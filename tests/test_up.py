"""`localmoe up` as a user runs it: a fresh home, the embedded default (its own Redis, the trained
small model unpacked on first start, one CPU worker, the API, Flower), driven with the CLI and curl-like
HTTP, then stopped with SIGINT."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from localmoe.redis_server import free_port
from tests.conftest import bearer, wait_for

pytestmark = pytest.mark.service  # each test starts `localmoe up`


def test_up_serves_the_embedded_default_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    api_port, flower_port = distinct_ports(2)
    env = {**up_env(home, api_port, flower_port), "LOCALMOE_API_PROCESSES": "2"}  # a 4+ core box's
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(
        [sys.executable, "-m", "localmoe", "up"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    api = f"http://127.0.0.1:{api_port}"
    try:

        def ready() -> bool:
            assert up.poll() is None, f"localmoe up exited early:\n{(tmp_path / 'up.log').read_text()}"
            return "is ready" in (tmp_path / "up.log").read_text()

        wait_for(ready, 180, "localmoe up to be ready", interval=0.2)
        # The shipped trained model, unpacked on first start (not a random one built here).
        assert json.loads((home / "models" / "localmoe-small" / "training.json").read_text())["steps"] > 0
        assert "unpacking the embedded small model" in (tmp_path / "up.log").read_text()
        printed = (tmp_path / "up.log").read_text()
        assert api in printed and f"{api}/docs" in printed and f":{flower_port}" in printed
        # An admin key, made on first start, printed once and kept for the CLI (which used it above).
        key = json.loads((home / "secrets.json").read_text())["api_key"]
        assert printed.count(key) == 1
        assert httpx.get(f"{api}/readyz", timeout=5).json() == {"status": "ready"}  # a probe: no key

        # Two API processes on one port; whichever answers a scrape counts what both accepted.
        assert re.findall(r"started (api-\d+)", printed) == ["api-0", "api-1"]
        before = _submitted(api, key)
        posted = []
        for _ in range(12):  # a connection each: the kernel spreads them over the two processes
            r = httpx.post(f"{api}/v1/jobs", json={"prompt": "x", "max_tokens": 1}, headers=bearer(key))
            assert r.status_code == 202, r.text
            posted.append(r.json()["id"])
        assert {_submitted(api, key) - before for _ in range(6)} == {12}
        made = localmoe(env, "keys", "create", "alice", "--max-priority", "low", timeout=30)
        assert made.returncode == 0, made.stderr
        alice = made.stdout.split()[-1]
        listed = localmoe(env, "keys", "list")
        alice_id = made.stdout.split()[1]
        assert f"{alice_id}  user   active" in listed.stdout, listed.stdout
        assert alice not in listed.stdout  # only hashes are kept
        r = httpx.post(f"{api}/v1/jobs", json={"prompt": "x", "priority": "high"}, headers=bearer(alice))
        assert r.status_code == 202 and r.json()["priority"] == "low"  # capped by the key
        revoked = localmoe(env, "keys", "revoke", alice_id)
        assert revoked.returncode == 0
        wait_for(
            lambda: httpx.get(f"{api}/v1/jobs", headers=bearer(alice)).status_code == 401, 3, "revocation"
        )

        streamed = localmoe(env, "submit", "def fib(n):", "--stream", "--max-tokens", "12", timeout=60)
        assert streamed.returncode == 0, streamed.stderr
        assert "succeeded" in streamed.stderr and streamed.stdout.strip()
        polled = localmoe(env, "submit", "def fib(n):", "--max-tokens", "12", timeout=60)
        assert polled.returncode == 0, polled.stderr
        assert polled.stdout == streamed.stdout  # greedy: the same text either way

        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        wait_for(lambda: _status(flower) == 401, 30, "Flower to answer")
        password = json.loads((home / "secrets.json").read_text())["flower_password"]
        assert httpx.get(flower, auth=("admin", password), timeout=5).status_code == 200

        def in_flower() -> dict[str, str]:  # each job a task, in its terminal state
            tasks = httpx.get(flower.replace("workers", "tasks"), auth=("admin", password), timeout=5).json()
            return {i: t["state"] for i, t in tasks.items() if i in posted}

        wait_for(lambda: in_flower() == dict.fromkeys(posted, "SUCCESS"), 30, "Flower to list the jobs")
        assert (home / "secrets.json").stat().st_mode & 0o077 == 0

        # Supervision: a worker killed with SIGKILL is restarted, and serves again.
        log_text = (tmp_path / "up.log").read_text()
        pid = int(re.search(r"started worker-\S+ \(pid (\d+)\)", log_text).group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "restarted worker" in (tmp_path / "up.log").read_text(), 30, "the restart")
        again = localmoe(env, "submit", "def fib(n):", "--max-tokens", "12", timeout=180)
        assert again.returncode == 0, again.stderr
        assert again.stdout == streamed.stdout
        assert "exited with code -9; restarting it in 1 s" in (tmp_path / "up.log").read_text()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    assert code == 0
    for port in (api_port, flower_port):
        assert _status(f"http://127.0.0.1:{port}/") is None  # nothing listens any more
    assert "all stopped" in (tmp_path / "up.log").read_text()
    assert list((home / "flower").glob("state*")), "Flower wrote its state file as it stopped"


def localmoe(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `localmoe` CLI, as a user runs it next to `localmoe up`."""
    argv = [sys.executable, "-m", "localmoe", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _submitted(api: str, key: str) -> float:
    """localmoe_jobs_submitted_total over its labels, from one scrape (a connection of its own)."""
    text = httpx.get(f"{api}/metrics", headers=bearer(key), timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("localmoe_jobs_submitted_total{")
    )


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def up_env(home: Path, api_port: int, flower_port: int) -> dict[str, str]:
    """A user's environment for `localmoe up` on a fresh home, on ports of its own (the test
    session's worker and webhook worker hold the default metrics ports)."""
    worker_metrics, webhook_metrics = distinct_ports(2, {api_port, flower_port})
    env = {
        **os.environ,
        "LOCALMOE_HOME": str(home),
        "LOCALMOE_API_PORT": str(api_port),
        "LOCALMOE_FLOWER_PORT": str(flower_port),
        "LOCALMOE_METRICS__WORKER_PORT": str(worker_metrics),
        "LOCALMOE_METRICS__WEBHOOK_PORT": str(webhook_metrics),
        "LOCALMOE_API_PROCESSES": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("LOCALMOE_REDIS_URL", "LOCALMOE_MODEL_DIR"):
        env.pop(key, None)
    return env


def distinct_ports(n: int, taken: set[int] | None = None) -> list[int]:
    """n free ports, none equal to another or to `taken` (free_port() may hand one out twice)."""
    out: list[int] = []
    while len(out) < n:
        port = free_port()
        if port not in out and port not in (taken or set()):
            out.append(port)
    return out


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`localmoe up`, appending to log; returns once it says it is ready (again)."""
    before = log.read_text().count("is ready") if log.exists() else 0
    out = log.open("ab")
    up = subprocess.Popen(
        [sys.executable, "-m", "localmoe", "up"], env=env, stdout=out, stderr=subprocess.STDOUT
    )

    def ready() -> bool:
        assert up.poll() is None, f"localmoe up exited early:\n{log.read_text()[-3000:]}"
        return log.read_text().count("is ready") > before

    wait_for(ready, 180, "localmoe up to be ready", interval=0.2)
    return up


def tree(pid: int) -> list[int]:
    """pid's descendants, from /proc."""
    from host.instance import children

    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent (gone too) never reaped it


def test_one_up_per_home_its_children_go_with_it_and_a_crash_loses_no_job(tmp_path: Path) -> None:
    home, log = tmp_path / "home", tmp_path / "up.log"
    api_port, flower_port = distinct_ports(2)
    env = up_env(home, api_port, flower_port)
    api = f"http://127.0.0.1:{api_port}"
    up = start_up(env, log)
    try:
        key = json.loads((home / "secrets.json").read_text())["api_key"]
        status = localmoe(env, "status")
        assert status.returncode == 0, status.stderr
        assert f"pid {up.pid}" in status.stdout and api in status.stdout and "worker cpu0" in status.stdout
        assert {"redis", "api", "worker", "webhooks", "flower"} <= set(
            re.findall(r"pid \d+ +(\w+)", status.stdout)
        )

        # A second `up` on the same home is refused at once, and the first one keeps serving.
        second = localmoe(env, "up", timeout=60)
        assert second.returncode == 2
        assert f"pid {up.pid}" in second.stderr and api in second.stderr and "localmoe down" in second.stderr
        assert httpx.get(f"{api}/readyz", headers=bearer(key), timeout=5).status_code == 200

        # Another home, but the first one's API port: refused before anything starts.
        other = up_env(tmp_path / "other", api_port, distinct_ports(1, {api_port})[0])
        clash = localmoe(other, "up", timeout=60)
        assert clash.returncode == 2, clash.stderr
        assert (
            f"port {api_port} (LOCALMOE_API_PORT) is taken" in clash.stderr
            and "nothing was started" in clash.stderr
        )
        assert not (tmp_path / "other" / "redis").exists()

        # Jobs in every state, then SIGKILL of the supervisor alone: every child is gone within 5 s.
        jobs = [_submit(api, key, f"def job_{i}(x):", 48) for i in range(6)]
        wait_for(lambda: _state(api, key, jobs[0]) != "queued", 60, "a job to start")
        kids = tree(up.pid)
        assert len(kids) >= 5
        up.kill()
        up.wait()
        wait_for(lambda: not any(alive(p) for p in kids), 5, "every child of the killed `up` to exit")

        # Started again on the same home: the kernel dropped the lock; then a power cut as close as
        # one box allows (every process of the tree SIGKILLed at once), and a third start.
        up = start_up(env, log)
        jobs += [_submit(api, key, f"def late_{i}(x):", 48) for i in range(4)]
        wait_for(lambda: _state(api, key, jobs[-4]) != "queued", 60, "a later job to start")
        for pid in [up.pid, *tree(up.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        up.wait()
        up = start_up(env, log)
        wait_for(
            lambda: all(_state(api, key, j) in ("succeeded", "failed", "cancelled") for j in jobs),
            300,
            "every job to end",
        )
        for job_id in jobs:  # each ran to completion once, and its stream replays from the start
            record = httpx.get(f"{api}/v1/jobs/{job_id}", headers=bearer(key), timeout=10).json()
            assert record["status"] == "succeeded" and record["usage"]["completion_tokens"] == 48, record
            events = _events(api, key, job_id)
            assert [e for e, _ in events].count("done") == 1
            assert "".join(d.get("text", "") for e, d in events if e == "token") == record["output"]
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert localmoe(env, "status").returncode == 3  # nothing runs


def _submit(api: str, key: str, prompt: str, tokens: int) -> str:
    r = httpx.post(
        f"{api}/v1/jobs",
        json={"prompt": prompt, "max_tokens": tokens, "ignore_eos": True},
        headers=bearer(key),
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _state(api: str, key: str, job_id: str) -> str:
    return str(httpx.get(f"{api}/v1/jobs/{job_id}", headers=bearer(key), timeout=10).json()["status"])


def _events(api: str, key: str, job_id: str) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    """The job's SSE stream replayed from the start: (event, data) pairs up to `done`."""
    out, event = [], ""
    with httpx.stream("GET", f"{api}/v1/jobs/{job_id}/events", headers=bearer(key), timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("token", "done"):
                out.append((event, json.loads(line[6:])))
                if event == "done":
                    break
    return out


def test_down_stops_a_running_up(tmp_path: Path) -> None:
    env = up_env(tmp_path / "home", *distinct_ports(2))
    up = start_up(env, tmp_path / "up.log")
    kids = tree(up.pid)
    try:
        done = localmoe(env, "down", timeout=120)
        assert done.returncode == 0 and "stopped" in done.stdout, done.stderr
        assert up.wait(10) == 0  # the stop Ctrl-C makes
        assert not any(alive(p) for p in kids)
    finally:
        if up.poll() is None:
            up.kill()
    assert localmoe(env, "down").stdout.startswith("no `localmoe up` runs")
