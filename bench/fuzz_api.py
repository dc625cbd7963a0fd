"""Hostile input against the real service (RELIABILITY.md, "Hostile input").

    python -m bench.fuzz_api [--examples 500] [--seed N] [--skip-schemathesis]

Starts Redis, a worker on the small model and the API with `limits.max_tokens` 8 (a generated
job that passes validation is cheap to run), then:

1. schemathesis over every operation of GET /openapi.json, with the run's admin key: the
   examples, coverage, fuzzing (positive and negative data, up to --examples cases per operation)
   and stateful phases (sequences along the links schemathesis infers from Location headers and
   response fields: POST /v1/jobs → GET/DELETE /v1/jobs/{id}, POST /v1/keys → DELETE ...). Checks:
   not_a_server_error, status_code_conformance, content_type_conformance,
   response_schema_conformance. The hooks below count every request per operation and roll a
   successful config change back at once, so no later case runs on fuzzed settings. The admin
   key cannot revoke itself (409), so DELETE /v1/keys/{key_id} needs no exclusion.
2. HOSTILE: hand-made requests no generator sends (oversized, slow and stalled uploads, deep
   JSON, invalid UTF-8, lone surrogates, huge numbers, NaN, wrong content types, huge headers,
   a crowd of bad requests), each with the outcomes it may have.

Ends by checking that the API and the worker are still up (/readyz 200). Exit status 1 on any
failure.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
import schemathesis

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
CALLS_FILE = "LOCALMOE_FUZZ_CALLS"  # environment: where the hooks append "METHOD PATH STATUS" lines
CAP = 1 << 20  # limits.max_body_bytes, the default
CALLS: collections.Counter[tuple[str, int]] = collections.Counter()  # (operation, status) → requests

# --- schemathesis hooks (also used by tests/test_fuzz.py) ------------------------------------------


# Framing headers are the HTTP client's to set. A negative case may carry made-up ones
# (`Content-Length: at`): the HTTP server refuses such a request before the API sees it (uvicorn's
# 400, text/plain), which fuzzes uvicorn's parser, not the API's operations.
FRAMING = frozenset({"content-length", "transfer-encoding", "host", "connection", "upgrade"})


@schemathesis.hook
def before_call(_context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    if case.headers:
        for name in [k for k in case.headers if k.lower() in FRAMING]:
            del case.headers[name]


@schemathesis.hook
def after_call(_context: schemathesis.HookContext, case: schemathesis.Case, response: Any) -> None:
    label = f"{case.method.upper()} {case.path}"
    CALLS[(label, response.status_code)] += 1
    if path := os.environ.get(CALLS_FILE):
        with open(path, "a") as f:
            f.write(f"{label} {response.status_code}\n")
    changed = case.path in ("/v1/config", "/v1/config/rollback") and case.method.upper() != "GET"
    if changed and response.status_code == 200:  # back to the settings the service started with
        url = str(response.request.url).split("/v1/config")[0] + "/v1/config/rollback"
        auth = {"Authorization": response.request.headers["Authorization"]}
        httpx.post(url, json={"version": 0}, headers=auth, timeout=30).raise_for_status()


# --- hand-made hostile requests --------------------------------------------------------------------

Outcome = int | str  # a status code, "timeout" (the client gave up) or "closed" (no answer)


def _status(sock: socket.socket) -> Outcome:
    head = b""
    try:
        while b"\r\n" not in head:
            got = sock.recv(4096)
            if not got:
                return "closed"
            head += got
    except TimeoutError:
        return "timeout"
    return int(head.split(b" ", 2)[1])


def raw(api: str, head: bytes, pieces: Iterator[bytes], pause_s: float = 0.0) -> Outcome:
    """Sends `head` (request line and headers), then each piece with a pause, stopping early if
    the server answers (or closes) meanwhile; → the status of the answer."""
    u = urlsplit(api)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(head)
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:  # the server answered and closed: read what it said
                break
            time.sleep(pause_s)
            sock.setblocking(False)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
                sock.settimeout(60)
        return _status(sock)


def _head(method: str, path: str, auth: dict[str, str], extra: str) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _chunked(total: int, size: int) -> Iterator[bytes]:
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + b"a" * size + b"\r\n"
    yield b"0\r\n\r\n"


def _post(api: str, auth: dict[str, str], path: str, body: bytes, **headers: str) -> Outcome:
    h = {**auth, "Content-Type": "application/json", **headers}
    return httpx.post(api + path, content=body, headers=h, timeout=60).status_code


def _crowd(api: str, auth: dict[str, str]) -> Outcome:
    """200 bad requests from 20 threads at once; → the set of statuses, as text."""
    seen: set[Outcome] = set()
    lock = threading.Lock()
    bodies = [b'{"prompt": ', b"[" * 10_000, b'{"prompt": "\xff"}', b'{"max_tokens": 1e999}']

    def run(i: int) -> None:
        with httpx.Client(base_url=api, headers=auth, timeout=60) as c:
            for j in range(10):
                s = c.post(
                    "/v1/jobs", content=bodies[(i + j) % 4], headers={"content-type": "application/json"}
                )
                with lock:
                    seen.add(s.status_code)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return " ".join(str(s) for s in sorted(seen, key=str))


CHAT = b'{"messages": [{"role": "user", "content": %s}], "max_tokens": 2%s}'


@dataclass
class Hostile:
    name: str
    expect: tuple[Outcome, ...]
    send: Callable[[str, dict[str, str]], Outcome]


HOSTILE = [
    Hostile(
        "body over the cap, Content-Length declared (2 MB)",
        (413,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "' + b"a" * 2 * CAP + b'"}'),
    ),
    Hostile(
        "body over the cap, chunked, no length (2 MB)",
        (413,),
        lambda api, a: raw(
            api, _head("POST", "/v1/jobs", a, "Transfer-Encoding: chunked\r\n"), _chunked(2 * CAP, 1 << 16)
        ),
    ),
    Hostile(
        "10 MB slow upload, chunked (64 KB every 20 ms)",
        (413,),
        lambda api, a: raw(
            api,
            _head("POST", "/v1/jobs", a, "Transfer-Encoding: chunked\r\n"),
            _chunked(10 * CAP, 1 << 16),
            0.02,
        ),
    ),
    Hostile(
        "10 MB slow upload, length declared (64 KB every 20 ms)",
        (413,),
        lambda api, a: raw(
            api,
            _head("POST", "/v1/jobs", a, f"Content-Length: {10 * CAP}\r\n"),
            iter([b"a" * (1 << 16)] * 160),
            0.02,
        ),
    ),
    Hostile(
        "stalled upload: Content-Length 1000, 10 bytes, then silence",
        (408,),
        lambda api, a: raw(
            api, _head("POST", "/v1/jobs", a, "Content-Length: 1000\r\n"), iter([b'{"prompt":']), 0
        ),
    ),
    Hostile(
        "deeply nested JSON: 100k [", (400, 422), lambda api, a: _post(api, a, "/v1/jobs", b"[" * 100_000)
    ),
    Hostile(
        'deeply nested JSON: 100k {"a": (closed)',
        (400, 422),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    ),
    Hostile(
        "deeply nested JSON in chat `tools` (50k)",
        (400,),
        lambda api, a: _post(
            api, a, "/v1/chat/completions", CHAT % (b'"hi"', b', "tools": [' + b"[" * 50_000)
        ),
    ),
    Hostile(
        "invalid UTF-8 (0xFF)", (422,), lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "caf\xff"}')
    ),
    Hostile(
        "invalid UTF-8: overlong and truncated sequences",
        (422,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "\xc0\xaf \xe2\x82"}'),
    ),
    Hostile(
        "invalid UTF-8 to the OpenAI API",
        (422,),
        lambda api, a: _post(api, a, "/v1/completions", b'{"prompt": "\xed\xa0\x80"}'),
    ),
    Hostile(
        "lone surrogate in a prompt",
        (422,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "x\\ud800"}'),
    ),
    Hostile(
        "lone surrogate in chat content",
        (400,),
        lambda api, a: _post(api, a, "/v1/chat/completions", CHAT % (b'"\\udc00"', b"")),
    ),
    Hostile(
        "lone surrogate in a config path",
        (422,),
        lambda api, a: (
            httpx.patch(
                api + "/v1/config",
                content=b'{"set": {"\\ud800": 1}}',
                headers={**a, "content-type": "application/json"},
            ).status_code
        ),
    ),
    Hostile(
        "lone surrogate in a key name",
        (422,),
        lambda api, a: _post(api, a, "/v1/keys", b'{"name": "\\ud800"}'),
    ),
    Hostile(
        "max_tokens 10**30",
        (422,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 30 + b"}"),
    ),
    Hostile(
        "max_completion_tokens 10**30 (chat)",
        (400,),
        lambda api, a: _post(
            api, a, "/v1/chat/completions", CHAT % (b'"hi"', b', "max_completion_tokens": 1' + b"0" * 30)
        ),
    ),
    Hostile(
        "max_tokens 1e999",
        (422,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "hi", "max_tokens": 1e999}'),
    ),
    Hostile(
        "seed 10**30 (completions)",
        (400,),
        lambda api, a: _post(
            api, a, "/v1/completions", b'{"prompt": "hi", "max_tokens": 2, "seed": 1' + b"0" * 30 + b"}"
        ),
    ),
    Hostile(
        "temperature NaN",
        (422,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "hi", "temperature": NaN}'),
    ),
    Hostile(
        "top_p Infinity",
        (422,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "hi", "top_p": Infinity}'),
    ),
    Hostile(
        "list cursor=nan",
        (422,),
        lambda api, a: httpx.get(api + "/v1/jobs?cursor=nan", headers=a).status_code,
    ),
    Hostile(
        "config value Infinity",
        (422,),
        lambda api, a: (
            httpx.patch(
                api + "/v1/config",
                content=b'{"set": {"webhooks.max_age_s": Infinity}}',
                headers={**a, "content-type": "application/json"},
            ).status_code
        ),
    ),
    Hostile(
        "wrong content type: text/plain",
        (422,),
        lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": "hi"}', **{"Content-Type": "text/plain"}),
    ),
    Hostile(
        "wrong content type: form",
        (422,),
        lambda api, a: _post(
            api, a, "/v1/jobs", b"prompt=hi", **{"Content-Type": "application/x-www-form-urlencoded"}
        ),
    ),
    Hostile(
        "wrong content type: multipart",
        (422,),
        lambda api, a: _post(
            api,
            a,
            "/v1/jobs",
            b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--x--\r\n',
            **{"Content-Type": "multipart/form-data; boundary=x"},
        ),
    ),
    Hostile(
        "wrong content type: XML to the OpenAI API",
        (400,),
        lambda api, a: _post(
            api, a, "/v1/completions", b"<prompt>hi</prompt>", **{"Content-Type": "application/xml"}
        ),
    ),
    Hostile("malformed JSON", (422,), lambda api, a: _post(api, a, "/v1/jobs", b'{"prompt": ')),
    Hostile("empty body", (422,), lambda api, a: _post(api, a, "/v1/jobs", b"")),
    Hostile(
        "huge header (200 KB)",
        (200, 400, 431),
        lambda api, a: httpx.get(api + "/v1/jobs", headers={**a, "X-Big": "a" * 200_000}).status_code,
    ),
    Hostile(
        "5,000 headers",
        (200, 400, 431),
        lambda api, a: (
            httpx.get(api + "/v1/jobs", headers={**a, **{f"X-H{i}": "a" for i in range(5000)}}).status_code
        ),
    ),
    Hostile(
        "huge Authorization (100 KB)",
        (401,),
        lambda api, a: (
            httpx.get(api + "/v1/jobs", headers={"Authorization": "Bearer lm-" + "a" * 100_000}).status_code
        ),
    ),
    Hostile("200 concurrent bad requests", ("400 422",), _crowd),
]


def run_hostile(api: str, auth: dict[str, str]) -> list[tuple[Hostile, Outcome, float]]:
    results = []
    for h in HOSTILE:
        t0 = time.monotonic()
        try:
            got = h.send(api, auth)
        except httpx.TimeoutException:
            got = "timeout"
        except httpx.TransportError:
            got = "closed"
        results.append((h, got, time.monotonic() - t0))
        ok = "ok  " if got in h.expect else "FAIL"
        expected = "/".join(map(str, h.expect))
        print(f"  {ok} {h.name:<58} {got!s:>9} (expected {expected}) {results[-1][2]:5.1f} s", flush=True)
    return results


# --- the run ---------------------------------------------------------------------------------------


def run_schemathesis(api: str, key: str, examples: int, seed: int | None, out: Path) -> tuple[int, Path]:
    """The CLI, with this module as its hooks; → (exit status, the JUnit report)."""
    junit = out / "junit.xml"
    argv = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{api}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(examples),
        "--workers",
        "1",  # one at a time: a config change is rolled back before the next case
        "--request-timeout",
        "60",
        "--suppress-health-check",
        "too_slow,filter_too_much",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
        "--no-color",
    ]
    if seed is not None:
        argv += ["--seed", str(seed)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "bench.fuzz_api", CALLS_FILE: str(out / "calls.txt")}
    return subprocess.call(argv, env=env, cwd=Path(__file__).parent.parent), junit


def summarize(calls_file: Path, junit: Path) -> None:
    import xml.etree.ElementTree as ET

    calls: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in calls_file.read_text().splitlines():
        op, status = line.rsplit(" ", 1)
        calls[op][status] += 1
    failures: collections.Counter[str] = collections.Counter()
    if junit.exists() and junit.stat().st_size:  # empty when schemathesis was stopped
        for case in ET.parse(junit).iter("testcase"):
            failures[case.get("name", "?")] += len(case.findall("failure")) + len(case.findall("error"))
    print(f"\n{'operation':<36} {'requests':>8} {'failures':>8}  statuses")
    for op in sorted(calls):
        statuses = " ".join(f"{s}×{n}" for s, n in sorted(calls[op].items()))
        print(f"{op:<36} {sum(calls[op].values()):>8} {failures.get(op, 0):>8}  {statuses}")
    five = sum(n for c in calls.values() for s, n in c.items() if s.startswith("5") and s != "503")
    print(f"total requests {sum(sum(c.values()) for c in calls.values())}; 5xx (but readyz 503) {five}")


def main() -> None:
    from bench.harness import auth, service_env, start_api, start_worker, stop, wait_workers_ready
    from localmoe.redis_server import RedisServer
    from moe_build.checkpoint import build_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=500, help="schemathesis cases per operation")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--skip-schemathesis", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-fuzz-"))
    t0 = time.monotonic()
    print(f"[1/4] building the small model in {tmp}", flush=True)
    model = build_checkpoint(tmp / "model", progress=False)
    with RedisServer(tmp / "redis") as server:
        env = service_env(
            server.url, model, tmp, LOCALMOE_LIMITS__MAX_TOKENS="8", LOCALMOE_METRICS__WORKER_PORT="0"
        )
        print("[2/4] starting a worker and the API (limits.max_tokens 8)", flush=True)
        procs = [start_worker("fuzz0", env, quiet=True)]
        client = redis.Redis.from_url(server.url, decode_responses=True)
        wait_workers_ready(client, ["fuzz0"])
        proc, api = start_api(env)
        procs.append(proc)
        ok = True
        try:
            if not args.skip_schemathesis:
                print(f"[3/4] schemathesis, {args.examples} cases per operation", flush=True)
                code, junit = run_schemathesis(api, env["LOCALMOE_API_KEY"], args.examples, args.seed, tmp)
                summarize(tmp / "calls.txt", junit)
                ok = code == 0
            print("[4/4] hostile input", flush=True)
            results = run_hostile(api, auth(env))
            ok = ok and all(got in h.expect for h, got, _ in results)
            alive = all(p.poll() is None for p in procs)
            ready = httpx.get(f"{api}/readyz", headers=auth(env), timeout=10).status_code
            print(f"after it all: API and worker running: {alive}; /readyz {ready}")
            ok = ok and alive and ready == 200
        finally:
            stop(procs)
            client.close()
    print(f"{'PASS' if ok else 'FAIL'} in {time.monotonic() - t0:.0f} s", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
