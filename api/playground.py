"""The playground: a static page (HTML + vanilla JS + CSS, no build step) that drives the API from
a browser. It carries no data, so loading it needs no key; every call it makes sends the key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"  # beside the module: found from an installed package too

# The page loads only its own script and style and talks only to this origin (ws:// included).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["playground"], include_in_schema=False)


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=media_type, headers=_HEADERS)


@router.get("/playground")
async def page() -> FileResponse:
    return _file("playground.html", "text/html; charset=utf-8")


@router.get("/playground/playground.js")
async def script() -> FileResponse:
    return _file("playground.js", "text/javascript; charset=utf-8")


@router.get("/playground/playground.css")
async def style() -> FileResponse:
    return _file("playground.css", "text/css; charset=utf-8")
