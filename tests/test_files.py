"""OpenAI's Files API (POST/GET/DELETE /v1/files) against a real API process and Redis: the
official `openai` client for the round trip, raw HTTP for what it refuses. No worker is needed:
files are the API's alone. The bytes are checked on disk, in the stack's own files directory."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.requests import Request

from api.auth import Scope, create_key
from api.openai.batch_input import LineChecker
from api.openai.upload import ENVELOPE_BYTES, UploadRefused, receive_form
from tests.conftest import Stack, _stop, bearer, private_stack, start_api

MAX_BODY = 16 << 10  # the other routes' body limit in these stacks
MAX_FILE = 64 << 10  # the upload limit: above MAX_BODY, so uploads must get past BodyGuard


def line(custom_id: str, url: str = "/v1/chat/completions", **extra: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": f"Say {custom_id}"}], "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


GOOD = jsonl(line("a"), line("b", "/v1/completions"), line("c"))


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def stack(service_env: dict[str, str], files_dir: Path) -> Iterator[Stack]:
    settings = {
        "LOCALMOE_FILES_DIR": str(files_dir),
        "LOCALMOE_LIMITS__MAX_BODY_BYTES": str(MAX_BODY),
        "LOCALMOE_LIMITS__MAX_FILE_BYTES": str(MAX_FILE),
    }
    with private_stack(service_env, worker=False, **settings) as s:
        yield s


@pytest.fixture(scope="module")
def keys(stack: Stack) -> tuple[str, str]:
    """Two user keys of the stack: the owner and another."""
    return tuple(create_key(stack.client, n, Scope.USER).secret for n in ("files (a)", "files (b)"))  # type: ignore[return-value]


@pytest.fixture
def client(stack: Stack, keys: tuple[str, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.api}/v1", api_key=keys[0], max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def http(stack: Stack, keys: tuple[str, str]) -> Iterator[httpx.Client]:
    with stack.http(keys[0]) as c:
        yield c


def upload(http: httpx.Client, data: bytes, purpose: str = "batch", name: str = "in.jsonl") -> httpx.Response:
    return http.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    e: dict[str, Any] = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


def stored(files_dir: Path) -> set[str]:
    """The file ids whose bytes are on disk, and any upload still in `incoming/`."""
    return {p.name for p in files_dir.iterdir() if p.is_file()} | {
        p.name for p in (files_dir / "incoming").iterdir()
    }


def test_round_trip_with_the_openai_client(client: openai.OpenAI, files_dir: Path) -> None:
    made = client.files.create(file=("batch.jsonl", GOOD), purpose="batch")
    assert made.id.startswith("file-") and len(made.id) == 5 + 32
    assert (made.object, made.purpose, made.status, made.filename) == (
        "file",
        "batch",
        "processed",
        "batch.jsonl",
    )
    assert made.bytes == len(GOOD) and abs(made.created_at - time.time()) < 5
    assert made.expires_at == made.created_at + 30 * 86_400  # limits.file_ttl_s's default
    assert (files_dir / made.id).read_bytes() == GOOD  # on disk, under the files directory

    assert client.files.retrieve(made.id) == made
    assert client.files.content(made.id).content == GOOD
    assert made.id in [f.id for f in client.files.list()]

    gone = client.files.delete(made.id)
    assert (gone.id, gone.object, gone.deleted) == (made.id, "file", True)
    assert not (files_dir / made.id).exists()
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(made.id)
    assert made.id not in [f.id for f in client.files.list()]


def test_list_is_newest_first_in_cursor_pages(stack: Stack) -> None:
    key = create_key(stack.client, "files (list)", Scope.USER).secret
    with openai.OpenAI(base_url=f"{stack.api}/v1", api_key=key, max_retries=0, timeout=30) as c:
        ids = [c.files.create(file=(f"{i}.jsonl", GOOD), purpose="batch").id for i in range(5)]
        page = c.files.list(limit=2)
        assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
        assert [f.id for f in c.files.list(limit=2)] == ids[::-1]  # the client follows `after`
        assert [f.id for f in c.files.list(order="asc", limit=3)] == ids
        assert [f.id for f in c.files.list(purpose="batch_output")] == []
    with stack.http(key) as http:
        body = http.get("/v1/files", params={"limit": 2, "after": ids[3]}).json()
        assert [f["id"] for f in body["data"]] == [ids[2], ids[1]]
        assert (body["object"], body["first_id"], body["last_id"], body["has_more"]) == (
            "list",
            ids[2],
            ids[1],
            True,
        )
        e = error(http.get("/v1/files", params={"after": "file-" + "0" * 32}), 400)
        assert e["param"] == "after"
        assert error(http.get("/v1/files", params={"limit": 0}), 400)["param"] == "query.limit"


BAD_LINES = {
    "not json": ("{custom_id: 1}", "not valid JSON"),
    "not an object": ("[1, 2]", "not an object"),
    "no url": ({k: v for k, v in line("x").items() if k != "url"}, "url: Field required"),
    "another url": (line("x", "/v1/embeddings"), "url: Input should be"),
    "GET": ({**line("x"), "method": "GET"}, "method: Input should be 'POST'"),
    "body not an object": ({**line("x"), "body": "hi"}, "body: Input should be a valid dictionary"),
    "an unknown key": (line("x", extra=1), "extra: Extra inputs are not permitted"),
    "an empty custom_id": (line(""), "custom_id: String should have at least 1 character"),
    "an empty line": ("", "empty line"),
}


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
def test_a_bad_line_is_a_400_naming_it(case: str, http: httpx.Client, files_dir: Path) -> None:
    bad, reason = BAD_LINES[case]
    before = stored(files_dir)
    e = error(upload(http, jsonl(line("a"), line("b"), bad, line("d"))), 400)
    assert e["message"].startswith("line 3: ") and reason in e["message"], e["message"]
    assert (e["param"], e["type"]) == ("file", "invalid_request_error")
    assert stored(files_dir) == before  # nothing kept, not even the part that arrived


def test_a_duplicate_custom_id_is_a_400(http: httpx.Client) -> None:
    e = error(upload(http, jsonl(line("a"), line("b"), line("c"), line("b"))), 400)
    assert e["message"] == "line 4: custom_id 'b' is already used on line 2"


def test_bytes_that_are_not_a_batch_file(http: httpx.Client) -> None:
    assert error(upload(http, b""), 400)["message"].startswith("line 1: the file is empty")
    assert "line 2: not valid JSON" in error(upload(http, jsonl(line("a")) + b"\xff\xfe\n"), 400)["message"]
    # a last line without its newline still counts
    assert upload(http, GOOD.rstrip(b"\n")).json()["bytes"] == len(GOOD) - 1
    assert upload(http, GOOD.replace(b"\n", b"\r\n")).status_code == 200


def test_purpose_and_form_fields(http: httpx.Client, client: openai.OpenAI) -> None:
    e = error(upload(http, GOOD, purpose="fine-tune"), 400)
    assert e["param"] == "purpose" and "'fine-tune' is not supported" in e["message"]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", GOOD), purpose="assistants")
    assert error(http.post("/v1/files", files={"file": ("x", GOOD)}), 400)["param"] == "purpose"
    assert (
        error(http.post("/v1/files", data={"purpose": "batch"}, files={"x": ("a", b"")}), 400)["param"] == "x"
    )
    assert error(http.post("/v1/files", json={"purpose": "batch"}), 400)["message"].startswith(
        "the body must be multipart/form-data"
    )
    truncated = http.post(
        "/v1/files",
        content=b'--b\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert "closing boundary" in error(truncated, 400)["message"]


def test_expires_after(client: openai.OpenAI) -> None:
    made = client.files.create(
        file=("x.jsonl", GOOD), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert made.expires_at == made.created_at + 3600
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(
            file=("x.jsonl", GOOD), purpose="batch", expires_after={"anchor": "created_at", "seconds": 10**9}
        )
    assert "limits.file_ttl_s" in str(e.value)


def test_an_upload_over_the_limit_is_a_413(http: httpx.Client, files_dir: Path) -> None:
    lines = [line(f"{i:06d}") for i in range(1000)]
    big = jsonl(*lines)
    assert MAX_BODY < len(jsonl(*lines[:400])) < MAX_FILE < len(big)
    before = stored(files_dir)
    assert upload(http, jsonl(*lines[:400])).status_code == 200  # larger than any other route takes
    e = error(upload(http, big), 413)
    assert e["param"] == "file" and f"larger than {MAX_FILE} bytes" in e["message"]

    def chunked(piece: int) -> Iterator[bytes]:  # no Content-Length: the limit holds as bytes arrive
        yield b'--b\r\ncontent-disposition: form-data; name="file"; filename="x"\r\n\r\n'
        for i in range(0, len(big), piece):
            yield big[i : i + piece]
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    r = http.post("/v1/files", content=chunked(4096), headers=headers)  # 130 KB: all sent first
    assert error(r, 413)["param"] == "file"
    assert len(stored(files_dir)) == len(before) + 1  # only the accepted one
    # every other route keeps the body limit
    assert http.post("/v1/completions", json={"prompt": "x" * MAX_BODY}).status_code == 413


def test_another_keys_file_is_404(stack: Stack, keys: tuple[str, str], http: httpx.Client) -> None:
    made = upload(http, GOOD).json()
    for key in (keys[1], stack.admin_key):
        with stack.http(key) as other:
            for r in (
                other.get(f"/v1/files/{made['id']}"),
                other.get(f"/v1/files/{made['id']}/content"),
                other.delete(f"/v1/files/{made['id']}"),
            ):
                assert error(r, 404)["message"] == f"No such File object: {made['id']}"
            assert made["id"] not in [f["id"] for f in other.get("/v1/files").json()["data"]]
    assert http.get(f"/v1/files/{made['id']}").json() == made  # the owner still has it
    assert error(http.get(f"/v1/files/{made['id'].upper()}"), 404)  # ids are checked before any lookup
    assert error(http.get("/v1/files/file-x"), 404)["param"] == "file_id"


def test_every_api_process_sees_every_file(stack: Stack, keys: tuple[str, str], http: httpx.Client) -> None:
    made = upload(http, GOOD).json()
    proc, second = start_api(stack.env, stack.admin_key, ready=False)
    try:
        with httpx.Client(base_url=second, headers=bearer(keys[0]), timeout=30) as c:
            assert c.get(f"/v1/files/{made['id']}").json() == made
            assert c.get(f"/v1/files/{made['id']}/content").content == GOOD
            assert c.delete(f"/v1/files/{made['id']}").json()["deleted"] is True
    finally:
        _stop(proc)
    assert error(http.get(f"/v1/files/{made['id']}"), 404)


def test_expired_files_are_gone_with_their_bytes(service_env: dict[str, str], tmp_path: Path) -> None:
    with private_stack(
        service_env, worker=False, LOCALMOE_FILES_DIR=str(tmp_path), LOCALMOE_LIMITS__FILE_TTL_S="2"
    ) as s:
        key = create_key(s.client, "files (ttl)", Scope.USER).secret
        with s.http(key) as http:
            read, unread = (upload(http, GOOD).json() for _ in range(2))
            assert read["expires_at"] == read["created_at"] + 2
            assert http.get(f"/v1/files/{read['id']}").status_code == 200
            time.sleep(max(read["expires_at"], unread["expires_at"]) - time.time() + 0.1)
            # read after expiry: gone, bytes too (the lazy check)
            assert error(http.get(f"/v1/files/{read['id']}/content"), 404)
            assert not (tmp_path / read["id"]).exists()
            # never read again: the next upload's sweep removes it
            assert (tmp_path / unread["id"]).exists()
            fresh = upload(http, GOOD).json()
            assert not (tmp_path / unread["id"]).exists()
            assert [f["id"] for f in http.get("/v1/files").json()["data"]] == [fresh["id"]]
            assert error(http.get(f"/v1/files/{unread['id']}"), 404)


@pytest.mark.parametrize("piece", [4096, 200 << 10])
def test_the_file_limit_holds_however_the_server_groups_the_body(tmp_path: Path, piece: int) -> None:
    """uvicorn hands the body in whatever pieces one socket read gave (up to 256 KiB on a busy
    server): a piece that carries the file past its limit and the body past the envelope's is
    refused for the file, as small pieces are."""
    big = jsonl(*(line(f"{i:06d}") for i in range(1500)))  # ~200 KB: past MAX_FILE + ENVELOPE_BYTES
    body = b'--b\r\ncontent-disposition: form-data; name="file"; filename="x"\r\n\r\n' + big
    assert len(body) > MAX_FILE + ENVELOPE_BYTES
    messages = [body[i : i + piece] for i in range(0, len(body), piece)]

    async def receive() -> dict[str, Any]:
        chunk = messages.pop(0) if messages else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(messages)}

    scope = {"type": "http", "method": "POST", "path": "/v1/files", "query_string": b""}
    scope["headers"] = [(b"content-type", b"multipart/form-data; boundary=b")]
    check = LineChecker(max_lines=10_000, max_line_bytes=1 << 20)
    with pytest.raises(UploadRefused) as refused:
        asyncio.run(receive_form(Request(scope, receive), tmp_path / "f", MAX_FILE, check))
    assert (refused.value.status, refused.value.param) == (413, "file")
    assert f"larger than {MAX_FILE} bytes" in refused.value.message
