"""The fake at the webhook seam: an HTTP receiver on loopback with scripted answers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before answering


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic() on arrival


class Receiver:
    """An HTTP server on 127.0.0.1: each request to a path gets that path's next scripted Reply
    (the last one repeats; unscripted paths get 200); every request is recorded in `hits`."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.script: dict[str, list[Reply]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.answer(self, body)

            def do_GET(self) -> None:
                receiver.answer(self, b"")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def expect(self, path: str, *replies: Reply) -> str:
        """Script `path`; returns its URL."""
        self.script[path] = list(replies)
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        hit = Hit(
            handler.command,
            handler.path,
            {k.lower(): v for k, v in handler.headers.items()},
            body,
            time.monotonic(),
        )
        with self.lock:
            self.hits.append(hit)
            replies = self.script.get(handler.path) or [Reply()]
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
        time.sleep(reply.delay_s)
        try:
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("content-length", "0")
            handler.end_headers()
        except OSError:  # the client gave up waiting
            pass

    def to(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
