"""POST /v1/files' body: a multipart form read as it arrives, its file part streamed to disk.

BodyGuard lets this route's body through unbuffered (api/intake.py); its limits are here instead:
the file part at most `max_bytes` (413 as soon as one more byte arrives), the whole body at most
that plus ENVELOPE_BYTES, at most MAX_PARTS parts, each other field at most MAX_FIELD_BYTES, and
no pause longer than IDLE_S between two pieces of the body (408). In memory at once: the piece
being parsed (what one socket read gave uvicorn: up to 256 KiB) and the one line the LineChecker is reading.
"""

from __future__ import annotations

import asyncio
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.openai.batch_input import LineChecker

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

ENVELOPE_BYTES = 64 << 10  # boundaries, part headers and the small fields around the file
MAX_PARTS = 16
MAX_FIELD_BYTES = 1024
MAX_FILENAME = 255  # characters
IDLE_S = 30.0


class UploadRefused(Exception):
    """The upload cannot be taken: answer `status` with `message` (`param`: the form field)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)  # every field but `file`, as text
    filename: str | None = None  # the `file` part's file name; None: the form had no `file`
    size: int = 0  # bytes of the `file` part


def _filename(raw: bytes) -> str:
    """The name a client gave its file, as a name only: no directories, no control characters."""
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    return name[:MAX_FILENAME] or "upload.jsonl"


class _FormReader:
    """python-multipart's callbacks → a Form; the `file` part's bytes queued in `pending` for the
    sink (the callbacks are synchronous: the writes happen between parser.write calls)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.form = Form()
        self.pending: list[bytes] = []
        self.ended = False  # the closing boundary was read
        self._parts = 0
        self._header = (bytearray(), bytearray())  # the part header being read: name, value
        self._disposition = b""
        self._field: str | None = None  # the current part's name, unless it is the file
        self._value = bytearray()
        self._in_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header[1].extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise UploadRefused(400, f"more than {MAX_PARTS} parts in the form")
        self._disposition = b""

    def _header_end(self) -> None:
        name, value = self._header
        if bytes(name).lower() == b"content-disposition":
            self._disposition = bytes(value)
        name.clear()
        value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise UploadRefused(400, "a form part without a name (Content-Disposition: form-data; name=...)")
        name = raw_name.decode("utf-8", "replace")
        if name == "file":
            if self.form.filename is not None:
                raise UploadRefused(400, "more than one `file` in the form", "file")
            self.form.filename = _filename(options.get(b"filename", b""))
            self._in_file = True
            return
        if name in self.form.fields:
            raise UploadRefused(400, f"`{name}` appears twice in the form", name)
        self._field = name
        self._value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._in_file:
            self.form.size += len(piece)
            if self.form.size > self.max_bytes:
                raise UploadRefused(413, f"the file is larger than {self.max_bytes} bytes", "file")
            self.pending.append(piece)
        elif self._field is not None:
            self._value += piece
            if len(self._value) > MAX_FIELD_BYTES:
                why = f"`{self._field}` is longer than {MAX_FIELD_BYTES} bytes"
                raise UploadRefused(400, why, self._field)

    def _part_end(self) -> None:
        if self._field is not None:
            try:
                self.form.fields[self._field] = self._value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UploadRefused(400, f"`{self._field}` is not UTF-8", self._field) from e
        self._field, self._in_file = None, False

    def _end(self) -> None:
        self.ended = True

    def take(self) -> list[bytes]:
        pending, self.pending = self.pending, []
        return pending


class _Sink:
    """The file's bytes → `dest` and the line checker (in a worker thread, one batch at a time).
    After the first bad line the rest is read but not kept: the upload will be refused."""

    def __init__(self, dest: Path, check: LineChecker) -> None:
        self.check = check
        self.out: BinaryIO = dest.open("wb")

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            if self.check.error is None:
                self.check.feed(piece)
                self.out.write(piece)


async def receive_form(request: Request, dest: Path, max_bytes: int, check: LineChecker) -> Form:
    """Reads the request's multipart body to its end: the `file` part into `dest` (created) and
    through `check` (the caller asks it for the verdict), the other fields into the Form.
    Raises UploadRefused for a body that is not a well-formed form within the limits."""
    kind, options = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadRefused(400, "the body must be multipart/form-data, with a `file` and a `purpose`")
    limit = max_bytes + ENVELOPE_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadRefused(413, f"the file is larger than {max_bytes} bytes", "file")
    reader = _FormReader(max_bytes)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    sink = _Sink(dest, check)
    received = 0
    stream = request.stream()
    try:
        while True:
            try:
                async with asyncio.timeout(IDLE_S):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise UploadRefused(408, f"no part of the upload arrived for {IDLE_S:g} s") from None
            except ClientDisconnect:
                raise UploadRefused(400, "the client went away before the upload ended") from None
            # The parser first: a chunk that carries the file part past `max_bytes` is refused for
            # the file (param "file") however the server happened to group the bytes into chunks.
            parser.write(chunk)
            received += len(chunk)
            if received > limit:
                raise UploadRefused(413, f"the request body is larger than {limit} bytes")
            if reader.pending:
                await asyncio.to_thread(sink.write, reader.take())
        parser.finalize()
    except MultipartParseError as e:
        raise UploadRefused(400, f"the multipart body is malformed: {e}") from None
    finally:
        sink.out.close()
        await stream.aclose()
    if not reader.ended:
        raise UploadRefused(400, "the multipart body ended before its closing boundary")
    return reader.form
