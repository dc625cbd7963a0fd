"""The CLI's HTTP client for the running service's API."""

from __future__ import annotations

import sys

import httpx


def api_client(timeout: httpx.Timeout | float = 30) -> httpx.Client:
    """An HTTP client for the API, carrying the CLI's key (LOCALMOE_API_KEY, else the admin key
    that `localmoe up` kept in home/secrets.json)."""
    from host.settings import get_settings

    s = get_settings()
    key = s.cli_api_key()
    if key is None:
        raise SystemExit(
            f"no API key: set LOCALMOE_API_KEY, or start `localmoe up` once (it keeps one in {s.home})"
        )
    return httpx.Client(
        base_url=s.resolved_api_url, timeout=timeout, headers={"Authorization": f"Bearer {key}"}
    )


def refused(r: httpx.Response) -> int:
    print(f"refused ({r.status_code}): {r.text}", file=sys.stderr)
    return 1
