"""`localmoe batches`: the Batch API of the running service from a terminal (submit a JSONL file,
watch it with a progress bar, list, show, cancel, download the results), through its HTTP API as
any client would (`POST /v1/files`, `/v1/batches`...)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from localmoe.client import api_client, refused

TERMINAL = ("completed", "failed", "expired", "cancelled")
POLL_S = 0.5
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def add_commands(sub: Any) -> None:  # argparse's _SubParsersAction
    batches = sub.add_parser("batches", help="OpenAI-style batches: submit a JSONL file, watch, download")
    verbs = batches.add_subparsers(dest="batches_command", required=True)
    submit = verbs.add_parser("submit", help="upload a JSONL file of requests and run it as a batch")
    submit.add_argument("file", type=Path, help='one request a line: {"custom_id", "method", "url", "body"}')
    submit.add_argument("--endpoint", choices=ENDPOINTS, default=ENDPOINTS[0], help="every line's url")
    submit.add_argument("--metadata", nargs="*", default=[], type=_pair, metavar="KEY=VALUE")
    submit.add_argument("--webhook", metavar="URL", help="a registered webhook URL: told when it ends")
    submit.add_argument("--watch", action="store_true", help="then watch it, and download its results")
    submit.add_argument("--out", type=Path, default=Path("."), help="where --watch writes the results")
    listing = verbs.add_parser("list", help="newest first: id, status, lines done / total, made, endpoint")
    listing.add_argument("--limit", type=int, default=20)
    for verb, text in (
        ("show", "one batch as JSON"),
        ("watch", "a progress bar until it ends"),
        ("cancel", "stop it: lines not yet answered end as batch_cancelled"),
        ("download", "its output and error files, as <batch id>_output.jsonl / _error.jsonl"),
    ):
        one = verbs.add_parser(verb, help=text)
        one.add_argument("batch_id")
        if verb == "download":
            one.add_argument("--out", type=Path, default=Path("."), help="a directory, or - for stdout")
    for parser in verbs.choices.values():
        parser.add_argument("--url", dest="api_url", help="API base URL (env LOCALMOE_API_URL)")
        parser.set_defaults(func=run)


def _pair(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def run(args: argparse.Namespace) -> int:
    with api_client(httpx.Timeout(30, read=300)) as http:
        command = args.batches_command
        if command == "submit":
            return _submit(http, args)
        if command == "list":
            return _list(http, args.limit)
        if command == "watch":
            return _watch(http, args.batch_id)
        if command == "download":
            return _download(http, args.batch_id, args.out)
        r = http.get(f"/v1/batches/{args.batch_id}") if command == "show" else _cancel(http, args.batch_id)
        if r.status_code != 200:
            return refused(r)
        print(json.dumps(r.json(), indent=2))
        return 0


def _cancel(http: httpx.Client, batch_id: str) -> httpx.Response:
    return http.post(f"/v1/batches/{batch_id}/cancel")


def _submit(http: httpx.Client, args: argparse.Namespace) -> int:
    with args.file.open("rb") as f:
        r = http.post("/v1/files", files={"file": (args.file.name, f)}, data={"purpose": "batch"})
    if r.status_code != 200:
        return refused(r)
    body: dict[str, Any] = {
        "input_file_id": r.json()["id"],
        "endpoint": args.endpoint,
        "completion_window": "24h",
    }
    if args.metadata:
        body["metadata"] = dict(args.metadata)
    if args.webhook:
        body["webhook"] = {"url": args.webhook}
    r = http.post("/v1/batches", json=body)
    if r.status_code != 200:
        return refused(r)
    batch_id = r.json()["id"]
    print(batch_id)
    if not args.watch:
        return 0
    code = _watch(http, batch_id)
    return _download(http, batch_id, args.out) or code


def _list(http: httpx.Client, limit: int) -> int:
    r = http.get("/v1/batches", params={"limit": limit})
    if r.status_code != 200:
        return refused(r)
    for b in r.json()["data"]:
        counts = b["request_counts"]
        done = f"{counts['completed'] + counts['failed']}/{counts['total']}"
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(b["created_at"]))
        print(f"{b['id']}  {b['status']:<11}  {done:>11}  {when}  {b['endpoint']}")
    return 0


def _watch(http: httpx.Client, batch_id: str) -> int:
    """A progress bar of the lines done (failed ones counted in its postfix) until the batch ends.
    → 0 when it completed."""
    with tqdm(unit="line", file=sys.stderr, dynamic_ncols=True) as bar:
        while True:
            r = http.get(f"/v1/batches/{batch_id}")
            if r.status_code != 200:
                return refused(r)
            batch = r.json()
            counts = batch["request_counts"]
            bar.total = counts["total"] or None
            bar.n = counts["completed"] + counts["failed"]
            bar.set_postfix_str(f"{batch['status']}, {counts['failed']} failed", refresh=False)
            bar.refresh()
            if batch["status"] in TERMINAL:
                break
            time.sleep(POLL_S)
    errors = (batch.get("errors") or {}).get("data") or []
    for e in errors:
        print(f"line {e.get('line')}: {e['message']}", file=sys.stderr)
    print(f"{batch_id}: {batch['status']}", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1


def _download(http: httpx.Client, batch_id: str, out: Path) -> int:
    """The batch's output and error files (those it has) into `out` (a directory; "-": stdout)."""
    r = http.get(f"/v1/batches/{batch_id}")
    if r.status_code != 200:
        return refused(r)
    batch = r.json()
    files = [(kind, batch[f"{kind}_file_id"]) for kind in ("output", "error") if batch[f"{kind}_file_id"]]
    if not files:
        print(f"{batch_id} has no result files ({batch['status']})", file=sys.stderr)
        return 1
    for kind, file_id in files:
        with http.stream("GET", f"/v1/files/{file_id}/content") as content:
            if content.status_code != 200:
                content.read()
                return refused(content)
            if str(out) == "-":
                for chunk in content.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                continue
            path = out / f"{batch_id}_{kind}.jsonl"
            with path.open("wb") as f:
                for chunk in content.iter_bytes():
                    f.write(chunk)
            print(path, file=sys.stderr)
    sys.stdout.flush()
    return 0
