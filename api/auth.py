"""Who is calling: API keys, stored hashed, with a scope and per-key limits.

A key is `lm-<43 url-safe characters>` (256 random bits), shown once when made. Redis keeps only
its SHA-256 (a key is random, not a password: a fast hash is the right one) under
`localmoe:apikey:<digest>` → ApiKey JSON, and `localmoe:apikeys` (hash: key id → digest) lists
them. Revoking keeps the record with `revoked_at` set, so a revoked key is told so, not "unknown".

Requests carry the key as `Authorization: Bearer <key>` (what the OpenAI client sends); browser
websockets, which cannot set headers, offer it as the subprotocol `bearer.<key>` beside `localmoe`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, cast

import redis
import redis.asyncio as aioredis
from fastapi import Depends, HTTPException, Request, WebSocket
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from scheduler import keys
from scheduler.jobs import Priority

KEY_PREFIX = "lm-"
WS_PROTOCOL = "localmoe"
WS_BEARER = "bearer."
_CACHE_S = 1.0  # a lookup is reused this long: a revoked key stops working within a second


class Scope(StrEnum):
    USER = "user"  # submits jobs, sees its own
    ADMIN = "admin"  # sees every job, manages keys


class KeyLimits(BaseModel):
    """Per-key ceilings; None takes the server's default (settings.limits.per_key_*)."""

    max_priority: Priority | None = Field(None, description="Highest priority this key's jobs get.")
    max_queued_jobs: int | None = Field(None, ge=1, description="Jobs waiting in queues at once.")
    max_queued_tokens: int | None = Field(None, ge=1, description="Prompt + max_tokens of those jobs.")
    rate_per_s: float | None = Field(None, gt=0, description="Sustained submissions per second.")
    burst: int | None = Field(None, ge=1, description="Submissions allowed at once above the rate.")
    max_batches: int | None = Field(None, ge=1, description="Batches not yet ended.")
    batch_lines_in_flight: int | None = Field(None, ge=1, description="Lines of its batches running at once.")


class ApiKey(BaseModel):
    id: str
    name: str
    scope: Scope = Scope.USER
    created_at: float
    revoked_at: float | None = None
    limits: KeyLimits = Field(default_factory=KeyLimits)

    @property
    def admin(self) -> bool:
        return self.scope is Scope.ADMIN

    @property
    def max_priority(self) -> Priority:
        default = Priority.HIGH if self.admin else Priority.NORMAL
        return self.limits.max_priority or default


class NewKey(BaseModel):
    """What creating a key answers: the record, and the key itself (shown this once)."""

    key: ApiKey
    secret: str


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(name: str, scope: Scope, limits: KeyLimits | None = None) -> NewKey:
    record = ApiKey(
        id=secrets.token_hex(6), name=name, scope=scope, created_at=time.time(), limits=limits or KeyLimits()
    )
    return NewKey(key=record, secret=KEY_PREFIX + secrets.token_urlsafe(32))


# --- the store: async for the API, one sync helper for `localmoe up` ----------------------------


class KeyStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}  # digest → (read at, record)

    async def lookup(self, secret: str) -> ApiKey | None:
        d = digest(secret)
        hit = self._cache.get(d)
        now = time.monotonic()
        if hit is not None and now - hit[0] < _CACHE_S:
            return hit[1]
        raw = await self.client.get(keys.api_key(d))
        record = ApiKey.model_validate_json(raw) if raw else None
        if len(self._cache) > 10_000:  # bounded: a flood of bad keys must not grow it forever
            self._cache.clear()
        self._cache[d] = (now, record)
        return record

    async def by_id(self, key_id: str) -> ApiKey | None:
        """The key's record (revoked or not) by its id, uncached."""
        d = cast(str | None, await self.client.hget(keys.API_KEYS, key_id))
        raw = await self.client.get(keys.api_key(d)) if d else None
        return ApiKey.model_validate_json(raw) if raw else None

    async def create(self, name: str, scope: Scope, limits: KeyLimits | None = None) -> NewKey:
        made = new_key(name, scope, limits)
        d = digest(made.secret)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(keys.api_key(d), made.key.model_dump_json())
        pipe.hset(keys.API_KEYS, made.key.id, d)
        await pipe.execute()
        return made

    async def list(self) -> list[ApiKey]:
        digests = cast(dict[str, str], await self.client.hgetall(keys.API_KEYS))
        if not digests:
            return []
        raws = await self.client.mget([keys.api_key(d) for d in digests.values()])
        found = [ApiKey.model_validate_json(r) for r in raws if r]
        return sorted(found, key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> ApiKey | None:
        d = cast(str | None, await self.client.hget(keys.API_KEYS, key_id))
        raw = await self.client.get(keys.api_key(d)) if d else None
        if not raw:
            return None
        record = ApiKey.model_validate_json(raw)
        if record.revoked_at is None:
            record.revoked_at = time.time()
            await self.client.set(keys.api_key(cast(str, d)), record.model_dump_json())
        self._cache.clear()
        return record


def create_key(client: redis.Redis, name: str, scope: Scope, limits: KeyLimits | None = None) -> NewKey:
    """The sync twin of KeyStore.create, for `localmoe up` and tests."""
    made = new_key(name, scope, limits)
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.api_key(digest(made.secret)), made.key.model_dump_json())
    pipe.hset(keys.API_KEYS, made.key.id, digest(made.secret))
    pipe.execute()
    return made


def ensure_admin_key(client: redis.Redis, secrets_file: Path) -> str | None:
    """`localmoe up` on first start: make an admin key and keep it (0600) where the CLI finds it.
    Returns the new key to print once, or None when the kept key is still valid."""
    kept: dict[str, str] = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
    current = kept.get("api_key")
    if current:
        raw = client.get(keys.api_key(digest(current)))
        if raw and ApiKey.model_validate_json(cast(str, raw)).revoked_at is None:
            return None
    made = create_key(client, "admin (made by localmoe up)", Scope.ADMIN)
    kept["api_key"] = made.secret
    secrets_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secrets_file.touch(mode=0o600)
    secrets_file.write_text(json.dumps(kept, indent=2))
    return made.secret


# --- the dependencies -----------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key: `localmoe keys create NAME`.")


def _refuse(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


async def _check(store: KeyStore, secret: str | None) -> ApiKey:
    if not secret:
        raise _refuse("an API key is required: send `Authorization: Bearer <key>`")
    if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
        raise _refuse("that is not a LocalMoE API key")
    record = await store.lookup(secret)
    if record is None:
        raise _refuse("unknown API key")
    if record.revoked_at is not None:
        raise _refuse("this API key has been revoked")
    return record


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    store: KeyStore = request.app.state.services.keys
    return await _check(store, credentials.credentials if credentials else None)


async def require_admin(caller: Annotated[ApiKey, Depends(authenticate)]) -> ApiKey:
    if not caller.admin:
        raise HTTPException(403, "this needs an admin key")
    return caller


async def authenticate_websocket(websocket: WebSocket) -> tuple[ApiKey | None, str | None]:
    """(the caller or None, the subprotocol to accept). Header first, then `bearer.<key>`."""
    store: KeyStore = websocket.app.state.services.keys
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    secret = None
    header = websocket.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        secret = header[7:].strip()
    secret = secret or next((p[len(WS_BEARER) :] for p in offered if p.startswith(WS_BEARER)), None)
    subprotocol = WS_PROTOCOL if WS_PROTOCOL in offered else None
    try:
        return await _check(store, secret), subprotocol
    except HTTPException:
        return None, subprotocol


Caller = Annotated[ApiKey, Depends(authenticate)]
Admin = Annotated[ApiKey, Depends(require_admin)]
