"""`localmoe up` as a user runs it: a fresh home, the embedded default (its own Redis, the trained
small model unpacked on first start, one CPU worker, the API, Flower), driven with the CLI and curl-like
HTTP, then stopped with SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from localmoe.redis_server import free_port
from tests.conftest import bearer, wait_for


def test_up_serves_the_embedded_default_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    api_port, flower_port = free_port(), free_port()
    env = {
        **os.environ,
        "LOCALMOE_HOME": str(home),
        "LOCALMOE_API_PORT": str(api_port),
        "LOCALMOE_FLOWER_PORT": str(flower_port),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
        "LOCALMOE_API_PROCESSES": "2",  # what a box of 6+ cores gets by default
    }
    for key in ("LOCALMOE_REDIS_URL", "LOCALMOE_MODEL_DIR"):
        env.pop(key, None)
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
        assert httpx.get(f"{api}/readyz", timeout=5).status_code == 401
        assert httpx.get(f"{api}/readyz", headers=bearer(key), timeout=5).status_code == 200

        # Two API processes on one port; whichever answers a scrape counts what both accepted.
        assert re.findall(r"started (api-\d+)", printed) == ["api-0", "api-1"]
        before = _submitted(api, key)
        for _ in range(12):  # a connection each: the kernel spreads them over the two processes
            r = httpx.post(f"{api}/v1/jobs", json={"prompt": "x", "max_tokens": 1}, headers=bearer(key))
            assert r.status_code == 202, r.text
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
