"""Body checks before any route runs: a size cap (413), a time limit (408) and UTF-8 for JSON
bodies (422).

A pure ASGI middleware: it buffers at most `max_bytes` of a request body, answers on its own
when the body is too large, has not arrived within `timeout_s` (a stalled or trickled upload
would otherwise hold its connection for as long as the client likes) or is not UTF-8, and
otherwise replays the buffered body to the app. The paths in `streamed` (file uploads) pass
through unbuffered and unchecked: their routes read the body as it arrives, with limits of their
own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _reply(send: Send, status: int, detail: str | list[dict[str, object]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (408, 413):  # the rest of the body is never read: this connection cannot go on
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyGuard:
    def __init__(
        self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0, streamed: Collection[str] = ()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s  # for the whole body, from the end of the headers
        self.streamed = frozenset(streamed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PUT", "PATCH")
            or scope["path"] in self.streamed
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _reply(send, 413, f"request body is larger than {self.max_bytes} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await _reply(send, 408, f"request body not received within {self.timeout_s:g} s")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reply(send, 413, f"request body is larger than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if b"json" in headers.get(b"content-type", b"json"):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"request body is not valid UTF-8 (byte {e.start})"  # FastAPI's 422 shape
                await _reply(send, 422, [{"loc": ["body"], "msg": msg, "type": "value_error"}])
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later messages: a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
