"""Registered endpoints: one per owner and URL, each with its own signing secret; disabled after
repeated failures.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
import redis.asyncio
from pydantic import BaseModel
from redis.client import Pipeline

from scheduler.webhooks.signing import new_secret
from scheduler.webhooks.spec import endpoint_key, owner_key

T = TypeVar("T")

# --- Endpoints ----------------------------------------------------------------------------------


class Endpoint(BaseModel):
    """A URL an owner (an API key's owner) receives webhooks at, with the secret that signs them."""

    id: str
    owner: str
    url: str
    secret: str
    disabled: bool = False  # set when the receiver answered 410 Gone; registering again re-enables
    disabled_reason: str | None = None
    created_at: float


def _encode(values: dict[str, Any]) -> Mapping[Any, str]:
    return {k: json.dumps(v) for k, v in values.items()}


def _decode(fields: Mapping[Any, Any]) -> Endpoint:
    """An endpoint hash (str → JSON text, as decode_responses=True returns it) → Endpoint."""
    return Endpoint.model_validate({k: json.loads(v) for k, v in fields.items()})


def _transaction(client: redis.Redis, key: str, body: Callable[[Pipeline], T]) -> T:
    """Run `body` with `key` WATCHed; the commands it queues after pipe.multi() run atomically,
    and the whole body runs again when `key` changed meanwhile."""
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                result = body(pipe)
                pipe.execute()
                return result
            except redis.WatchError:
                continue


def register_endpoint(client: redis.Redis, owner: str, url: str) -> Endpoint:
    """The owner's endpoint for `url`: created with a new secret, or the existing one (re-enabled,
    same id and secret, when it was disabled)."""
    index = owner_key(owner)

    def register(pipe: Pipeline) -> Endpoint:
        existing: str | None = pipe.hget(index, url)  # type: ignore[assignment]
        if existing is not None:
            fields = pipe.hgetall(endpoint_key(existing))
            if fields:  # always, unless written by something else: then replace it below
                endpoint = _decode(fields).model_copy(update={"disabled": False, "disabled_reason": None})
                pipe.multi()
                pipe.hset(
                    endpoint_key(endpoint.id), mapping=_encode({"disabled": False, "disabled_reason": None})
                )
                return endpoint
        endpoint = Endpoint(
            id=f"ep_{uuid.uuid4().hex}", owner=owner, url=url, secret=new_secret(), created_at=time.time()
        )
        pipe.multi()
        pipe.hset(endpoint_key(endpoint.id), mapping=_encode(endpoint.model_dump(mode="json")))
        pipe.hset(index, url, endpoint.id)
        return endpoint

    # WATCH the owner's index: a concurrent register or delete of the same URL retries this one.
    return _transaction(client, index, register)


def get_endpoint(client: redis.Redis, endpoint_id: str) -> Endpoint | None:
    fields: dict[str, str] = client.hgetall(endpoint_key(endpoint_id))  # type: ignore[assignment]
    return _decode(fields) if fields else None


def endpoint_for(client: redis.Redis, owner: str, url: str) -> Endpoint | None:
    endpoint_id: str | None = client.hget(owner_key(owner), url)  # type: ignore[assignment]
    return None if endpoint_id is None else get_endpoint(client, endpoint_id)


def list_endpoints(client: redis.Redis, owner: str) -> list[Endpoint]:
    """The owner's endpoints, oldest first."""
    ids: list[str] = client.hvals(owner_key(owner))  # type: ignore[assignment]
    pipe = client.pipeline(transaction=False)
    for endpoint_id in ids:
        pipe.hgetall(endpoint_key(endpoint_id))
    endpoints = [_decode(fields) for fields in pipe.execute() if fields]
    return sorted(endpoints, key=lambda e: e.created_at)


def delete_endpoint(client: redis.Redis, owner: str, endpoint_id: str) -> bool:
    """False when there is no such endpoint of this owner. Deliveries already queued for it are
    recorded as refused when their turn comes."""
    key = endpoint_key(endpoint_id)

    def delete(pipe: Pipeline) -> bool:
        fields = pipe.hgetall(key)
        if not fields:
            return False
        endpoint = _decode(fields)
        if endpoint.owner != owner:
            return False
        pipe.multi()
        pipe.delete(key)
        pipe.hdel(owner_key(owner), endpoint.url)
        return True

    return _transaction(client, key, delete)


def disable_endpoint(client: redis.Redis, endpoint_id: str, reason: str) -> bool:
    """False when the endpoint no longer exists (it is not recreated)."""
    key = endpoint_key(endpoint_id)

    def disable(pipe: Pipeline) -> bool:
        if not pipe.exists(key):
            return False
        pipe.multi()
        pipe.hset(key, mapping=_encode({"disabled": True, "disabled_reason": reason}))
        return True

    return _transaction(client, key, disable)
