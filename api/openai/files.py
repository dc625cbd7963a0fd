"""OpenAI's Files API: POST /v1/files, GET /v1/files, GET /v1/files/{file_id},
GET /v1/files/{file_id}/content, DELETE /v1/files/{file_id}.

An upload is a batch's input (`purpose` "batch"), streamed to disk and checked line by line as it
arrives (upload.py, batch_input.py): the first bad line is a 400 naming it, and nothing is kept.
A file belongs to the API key that uploaded it; any other key, admins' too, gets 404 (its lines
are the owner's requests). It is kept `limits.file_ttl_s` (less with `expires_after`), then it and
its bytes are gone (file_store.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api.auth import Caller
from api.deps import ServicesDep
from api.openai.batch_input import LineChecker
from api.openai.errors import ERRORS, ErrorResponse, OpenAIError, OpenAIRoute, error_response
from api.openai.file_store import FileRecord, new_file_id
from api.openai.protocol import FileDeleted, FileList, FileObject, FilePurpose
from api.openai.upload import Form, UploadRefused, receive_form

UPLOAD_PATH = "/v1/files"  # BodyGuard passes this route's body through: receive_form limits it
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")  # and `file`
_SECONDS = re.compile(r"^[0-9]{1,12}$")

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


def _refusal(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


FILE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: _refusal("No such file of this key (never uploaded, deleted, or expired)."),
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: _refusal("Not a form with a `file` and purpose `batch`, or a bad line: the first one, by number."),
    408: _refusal("The upload paused longer than 30 s."),
    413: _refusal("The file is larger than `limits.max_file_bytes`."),
}
# The route reads its multipart body itself (streamed to disk), so FastAPI is only told its shape.
UPLOAD_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL: per line {custom_id, method: POST, url, body}.",
                        },
                        "purpose": {"type": "string", "enum": ["batch"]},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "Keep the file this long; at most limits.file_ttl_s.",
                        },
                    },
                }
            }
        },
    }
}


def _purpose_and_ttl(form: Form, max_ttl_s: int) -> tuple[FilePurpose, int]:
    """The form's fields → (purpose, seconds to keep the file); UploadRefused for bad ones."""
    if unknown := sorted(set(form.fields) - set(FIELDS)):
        raise UploadRefused(400, f"unknown form field `{unknown[0]}`", unknown[0])
    purpose: FilePurpose = "batch"  # what an upload can be: batch_output files are a batch's results
    given = form.fields.get("purpose")
    if given is None:
        raise UploadRefused(400, "`purpose` is required", "purpose")
    if given != purpose:
        why = f"purpose {given!r} is not supported: files here are batch input (purpose 'batch')"
        raise UploadRefused(400, why, "purpose")
    if form.filename is None:
        raise UploadRefused(400, "`file` is required", "file")
    anchor, seconds = (form.fields.get(f"expires_after[{k}]") for k in ("anchor", "seconds"))
    if anchor is None and seconds is None:
        return purpose, max_ttl_s
    if anchor != "created_at":
        raise UploadRefused(400, "expires_after[anchor] must be 'created_at'", "expires_after[anchor]")
    if seconds is None or not _SECONDS.match(seconds) or not 1 <= int(seconds) <= max_ttl_s:
        raise UploadRefused(
            400,
            f"expires_after[seconds] must be a whole number from 1 to {max_ttl_s} (limits.file_ttl_s)",
            "expires_after[seconds]",
        )
    return purpose, int(seconds)


@router.post("/files", response_model=FileObject, responses=UPLOAD_ERRORS, openapi_extra=UPLOAD_FORM)
async def upload_file(request: Request, services: ServicesDep, caller: Caller) -> Response:
    """Upload a batch's input: JSONL, one request per line (`custom_id`, `method`, `url`, `body`)."""
    limits = services.settings.limits
    store = services.files
    file_id = new_file_id()
    part = store.incoming(file_id)
    check = LineChecker(limits.max_file_lines, limits.max_body_bytes)
    try:
        form = await receive_form(request, part, limits.max_file_bytes, check)
        purpose, ttl_s = _purpose_and_ttl(form, limits.file_ttl_s)
        if (bad := check.finish()) is not None:
            raise UploadRefused(400, str(bad), "file")
        assert form.filename is not None
        record = await store.add(file_id, caller.id, form.filename, purpose, ttl_s, part)
    except UploadRefused as e:
        # 408 / 413 answer before the body has been read to its end: the connection cannot go on
        headers = {"Connection": "close"} if e.status in (408, 413) else None
        return error_response(e.status, e.message, e.param, headers=headers)
    finally:
        part.unlink(missing_ok=True)
    await store.sweep()
    return JSONResponse(record.public().model_dump())


async def owned_file(services: ServicesDep, caller: Caller, file_id: Annotated[str, Path()]) -> FileRecord:
    record = await services.files.get(caller.id, file_id)
    if record is None:
        raise OpenAIError(404, f"No such File object: {file_id}", "file_id")
    return record


OwnedFile = Annotated[FileRecord, Depends(owned_file)]


@router.get("/files", response_model=FileList, responses=FILE_ERRORS)
async def list_files(
    services: ServicesDep,
    caller: Caller,
    purpose: Annotated[str | None, Query(description="Only files with this purpose.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="By created_at.")] = "desc",
    after: Annotated[str | None, Query(description="A file id: the page after it (`last_id`).")] = None,
) -> FileList:
    """The caller's files, newest first by default."""
    page = await services.files.page(caller.id, purpose, after, limit, order)
    if page is None:
        raise OpenAIError(400, f"after: no file {after!r} in this list (deleted, or expired?)", "after")
    records, more = page
    return FileList.of([r.public() for r in records], more)


@router.get("/files/{file_id}", response_model=FileObject, responses=FILE_ERRORS)
async def retrieve_file(record: OwnedFile) -> FileObject:
    return record.public()


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    with source:
        while data := source.read(1 << 16):
            yield data


CONTENT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
}


@router.get("/files/{file_id}/content", response_class=Response, responses={**FILE_ERRORS, **CONTENT})
async def file_content(record: OwnedFile, services: ServicesDep) -> Response:
    """The file's bytes, as uploaded."""
    try:  # opened now: a removal from here on leaves this read whole (POSIX unlink)
        source = services.files.path(record.id).open("rb")
    except FileNotFoundError:
        raise OpenAIError(404, f"No such File object: {record.id}", "file_id") from None
    headers = {
        "Content-Length": str(os.fstat(source.fileno()).st_size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(record.filename)}",
    }
    return StreamingResponse(_chunks(source), media_type="application/octet-stream", headers=headers)


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=FILE_ERRORS)
async def delete_file(record: OwnedFile, services: ServicesDep) -> FileDeleted:
    await services.files.remove(record.id, record.owner)
    return FileDeleted(id=record.id)
