"""A batch's input file, OpenAI's format: one request per line, checked line by line as it arrives.

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

A file `LineChecker` passed holds, on lines 1..n (n ≥ 1; "\\n" or "\\r\\n" ends a line, and the
last may end without one): one JSON object each with exactly these four keys, `custom_id`s unique
within the file, at most `max_lines` lines of at most `max_line_bytes` bytes each (a line is one
request: the synchronous endpoints' body limit applies to it). The body is only required to be an
object here; whether it is a valid request for its `url` is the batch's check, when it runs.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.openai.protocol import Endpoint

MAX_CUSTOM_ID = 512  # characters


class BatchRequestLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID, description="Unique within the file.")
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any] = Field(description="The request the endpoint at `url` takes.")


def _reasons(e: ValidationError) -> str:
    """Pydantic's errors without the input (it may be huge): "url: Input should be ...; ..." """
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


class BadLine(Exception):
    """The first line that breaks the format (1-based) and why."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


class LineChecker:
    """Fed the file's bytes in pieces of any size; keeps only the line being read (at most
    max_line_bytes + one piece) and the custom_ids seen (at most max_lines). Stops at the first
    bad line: `error` holds it, and later pieces are ignored."""

    def __init__(self, max_lines: int, max_line_bytes: int) -> None:
        self.max_lines, self.max_line_bytes = max_lines, max_line_bytes
        self.lines = 0  # complete lines read
        self.error: BadLine | None = None
        self._partial = bytearray()  # the line being read, up to its newline
        self._seen: dict[str, int] = {}  # custom_id → its line

    def feed(self, data: bytes) -> None:
        start = 0
        while self.error is None:
            end = data.find(b"\n", start)
            if end == -1:
                self._partial += data[start:]
                if len(self._partial) > self.max_line_bytes:
                    self._refuse(self.lines + 1, f"longer than {self.max_line_bytes} bytes")
                return
            self._partial += data[start:end]
            self._line(bytes(self._partial))
            self._partial.clear()
            start = end + 1

    def finish(self) -> BadLine | None:
        """The end of the file: its last line, if it had no newline. → the first bad line."""
        if self.error is None and self._partial:
            self._line(bytes(self._partial))
        if self.error is None and self.lines == 0:
            self._refuse(1, "the file is empty: it must hold at least one request")
        return self.error

    def _refuse(self, line: int, reason: str) -> None:
        self.error = BadLine(line, reason)

    def _line(self, raw: bytes) -> None:
        self.lines += 1
        n = self.lines
        raw = raw.removesuffix(b"\r")
        if n > self.max_lines:
            return self._refuse(n, f"more than {self.max_lines} requests in one file (limits.max_file_lines)")
        if len(raw) > self.max_line_bytes:
            return self._refuse(n, f"longer than {self.max_line_bytes} bytes")
        if not raw.strip():
            return self._refuse(n, "empty line: each line must be one JSON object")
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return self._refuse(n, f"not valid JSON: {e.msg} at byte {e.pos}")
        if not isinstance(value, dict):
            return self._refuse(n, f"a JSON {type(value).__name__}, not an object")
        try:
            line = BatchRequestLine.model_validate(value)
        except ValidationError as e:
            return self._refuse(n, _reasons(e))
        if (first := self._seen.setdefault(line.custom_id, n)) != n:
            return self._refuse(n, f"custom_id {line.custom_id!r} is already used on line {first}")
        return None
