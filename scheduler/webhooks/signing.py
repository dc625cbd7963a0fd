"""Signing per Standard Webhooks (https://www.standardwebhooks.com): a secret per endpoint, an
HMAC-SHA256 over `id.timestamp.body`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# --- Signing (Standard Webhooks) ----------------------------------------------------------------

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """whsec_ + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: v1,<base64 HMAC-SHA256 of "<msg_id>.<timestamp>.<body>">."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()
