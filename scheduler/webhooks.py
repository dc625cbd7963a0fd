"""Webhooks: what the API, the job workers and the webhook worker agree on.

A job names a URL and the events it wants (`WebhookSpec`). The API checks the URL against the
allowlist (`check_url`) and registers it as an `Endpoint` of the API key's owner — one per owner
and URL, each with its own signing secret. When an event happens its payload is fixed once
(`enqueue_delivery`: the exact body bytes every attempt will send) and put on the webhook queue;
the webhook worker (workers/webhooks.py) POSTs it, signed per Standard Webhooks
(https://www.standardwebhooks.com), retrying with the same webhook id and body. Every attempt is
appended to the job's attempt log (`record_attempt`, `read_attempts`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio
from celery import Celery
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.client import Pipeline

from scheduler import keys

# --- Redis keys ---------------------------------------------------------------------------------
# localmoe:webhook:endpoint:<id>  hash: the Endpoint's fields, each value JSON-encoded (as jobs.py)
# localmoe:webhook:owner:<owner>  hash: url → endpoint id, one entry per endpoint of that owner
# localmoe:job:<job id>:webhooks  list: WebhookAttempt JSON, oldest first, expires with the job
# An endpoint hash exists exactly when its owner's index names it: both change in one transaction.

T = TypeVar("T")

WEBHOOK_PREFIX = f"{keys.PREFIX}:webhook:"
MAX_ATTEMPTS_KEPT = 1000  # per job: the attempt log keeps its newest entries


def endpoint_key(endpoint_id: str) -> str:
    return f"{WEBHOOK_PREFIX}endpoint:{endpoint_id}"


def owner_key(owner: str) -> str:
    return f"{WEBHOOK_PREFIX}owner:{owner}"


def attempts_key(job_id: str) -> str:
    return f"{keys.job(job_id)}:webhooks"


# --- What a job asks for ------------------------------------------------------------------------


class WebhookEventType(StrEnum):
    STARTED = "started"
    OUTPUT = "output"  # the output so far; at most one per webhooks.output_interval_s
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def payload_type(self) -> str:
        """The payload's `type`: "job.completed"."""
        return f"job.{self.value}"


DEFAULT_EVENTS = [WebhookEventType.COMPLETED, WebhookEventType.FAILED, WebhookEventType.CANCELLED]
MAX_URL_LENGTH = 2048


class WebhookSpec(BaseModel):
    """A job's webhook: where to POST, and which of the job's events."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=MAX_URL_LENGTH,
        description="http(s) URL without credentials; its host must be in the server's webhook allowlist.",
    )
    events: list[WebhookEventType] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        description="started, output, completed, failed, cancelled (default: the three terminal ones).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        problem = url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[WebhookEventType]) -> list[WebhookEventType]:
        if len(set(events)) != len(events):
            raise ValueError("events must not repeat")
        return events


# --- URL policy ---------------------------------------------------------------------------------
# Residual risk, DNS rebinding: check_url(resolve=True) resolves the host, then httpx resolves it
# again to connect. A name whose DNS answer changes between the two (short TTL, attacker-run
# DNS) can pass the check with an allowed address and connect to another. Host-name entries
# should therefore name hosts whose DNS the operator controls; an allowlist of IPs/CIDRs with IP
# URLs has no such gap. Closing it fully means connecting to the checked address itself.

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# Cloud instance-metadata services: AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba.
METADATA_ADDRESSES = frozenset(ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a webhook URL whatever the allowlist, or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"webhook URLs are at most {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "webhook URL contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 — raises ValueError on a bad port
    except ValueError as e:
        return f"invalid webhook URL: {e}"
    if parts.scheme not in ("http", "https"):
        return "webhook URLs must be http or https"
    if "@" in parts.netloc:
        return "webhook URLs may not carry credentials (user:password@)"
    if not parts.hostname:
        return "webhook URL has no host"
    return None


@dataclass(frozen=True)
class Allowlist:
    """The parsed `webhooks.allow` setting. names: exact host names; suffixes: ".corp.example"
    from "*.corp.example" (any depth of subdomain, not the bare domain); networks: IPs and CIDRs."""

    names: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[IPNetwork, ...]

    def admits_name(self, host: str) -> bool:
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def contains(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.networks)  # False across IP versions


def parse_allowlist(allow: list[str]) -> Allowlist:
    """Raises ValueError on an entry that is neither a host name, "*.domain", an IP nor a CIDR."""
    names: set[str] = set()
    suffixes: list[str] = []
    networks: list[IPNetwork] = []
    for entry in allow:
        e = entry.strip().lower().rstrip(".")
        try:
            networks.append(ip_network(e.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        host = e.removeprefix("*.")
        if not host or any(c in host for c in "*/:@[] ") or url_problem(f"http://{host}/") is not None:
            raise ValueError(f"webhook allowlist entry {entry!r} is not a host name, *.domain, IP or CIDR")
        if e.startswith("*."):
            suffixes.append(f".{host}")
        else:
            names.add(host)
    return Allowlist(frozenset(names), tuple(suffixes), tuple(networks))


def _plain(addr: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d reaches a.b.c.d: judge it as that."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _literal(host: str) -> IPAddress | None:
    try:
        return _plain(ip_address(host))
    except ValueError:
        return None


def special_kind(addr: IPAddress) -> str | None:
    """Why an address is never reached without an explicit IP/CIDR entry, or None."""
    if addr in METADATA_ADDRESSES:
        return "cloud-metadata"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_multicast:
        return "multicast"
    return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (raises OSError when it does not)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({_plain(ip_address(str(info[4][0]))) for info in infos}, key=str)


def check_url(url: str, allow: list[str], resolve: bool) -> str | None:
    """None when a webhook may POST to `url`; else why not, for a human.

    The host must be admitted by the allowlist: by name ("hooks.corp.example", "*.corp.example")
    or by address (an IP or CIDR entry). With resolve=True, every address the host resolves to
    is checked too: each must be inside an IP/CIDR entry unless the host was admitted by name,
    and loopback, link-local (cloud metadata included), unspecified and multicast addresses
    need an IP/CIDR entry containing them whatever admitted the host. With resolve=False, a host
    name that only IP/CIDR entries could admit passes: resolve=True decides it at delivery.
    Raises ValueError on a malformed allowlist (see parse_allowlist).
    """
    problem = url_problem(url)
    if problem is not None:
        return problem
    if not allow:
        return "webhooks are off: no hosts are allowed"
    rules = parse_allowlist(allow)
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    literal = _literal(host)
    by_name = literal is None and rules.admits_name(host)
    if literal is not None and not rules.contains(literal):
        return f"{host} is not in the webhook allowlist"
    if literal is None and not by_name and not rules.networks:
        return f"{host} is not in the webhook allowlist"
    if not resolve:
        return None
    try:
        addrs = resolve_host(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as e:
        return f"cannot resolve {host}: {e}"
    if not addrs:
        return f"{host} resolves to no address"
    for addr in addrs:
        explicit = rules.contains(addr)
        kind = special_kind(addr)
        if kind is not None and not explicit:
            return (
                f"{host} resolves to {addr}, a {kind} address: only an IP or CIDR allowlist entry admits it"
            )
        if not by_name and not explicit:
            return f"{host} resolves to {addr}, outside the allowed addresses"
    return None


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


# --- Deliveries ---------------------------------------------------------------------------------


class Delivery(BaseModel):
    """One event for one endpoint: the webhook queue's message. A retry is the same Delivery with
    attempt + 1: the webhook id and the body (the exact bytes signed and sent) never change."""

    webhook_id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    endpoint_id: str
    job_id: str
    type: WebhookEventType
    body: str  # {"type": "job.<event>", "timestamp": "<ISO 8601 UTC>", "data": {...}}
    created_at: float = Field(default_factory=time.time)
    first_attempt_at: float | None = None  # set by the first attempt; retries stop max_age_s after
    attempt: int = Field(1, ge=1)  # the attempt this message is (1 = the first)


def make_delivery(
    endpoint_id: str, job_id: str, event_type: WebhookEventType, data: dict[str, Any]
) -> Delivery:
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
    body = json.dumps(
        {"type": event_type.payload_type, "timestamp": stamp, "data": data}, separators=(",", ":")
    )
    return Delivery(endpoint_id=endpoint_id, job_id=job_id, type=event_type, body=body, created_at=now)


def enqueue_delivery(
    app: Celery, endpoint: Endpoint, job_id: str, event_type: WebhookEventType, data: dict[str, Any]
) -> Delivery:
    """Fix the event's payload now (`data`: any JSON-able dict — job id, status, output so far...)
    and put it on the webhook queue."""
    delivery = make_delivery(endpoint.id, job_id, event_type, data)
    send_delivery(app, delivery)
    return delivery


def send_delivery(
    app: Celery, delivery: Delivery, countdown: float | None = None, producer: Any = None
) -> None:
    app.send_task(
        keys.DELIVER_WEBHOOK_TASK,
        args=[delivery.model_dump(mode="json")],
        queue=keys.WEBHOOK_QUEUE,
        countdown=countdown,
        producer=producer,
    )


# --- The attempt log on the job -----------------------------------------------------------------

Outcome = Literal["delivered", "retrying", "gave_up", "disabled", "refused"]


class WebhookAttempt(BaseModel):
    """One delivery attempt, as the job's owner sees it (GET the job's webhooks)."""

    webhook_id: str
    type: WebhookEventType
    endpoint_id: str
    url: str  # "" when the endpoint had been deleted
    attempt: int
    at: float  # unix seconds the attempt began (its webhook-timestamp)
    status_code: int | None = None  # None: no HTTP answer (refused, connection error, timeout)
    error: str | None = None
    outcome: Outcome
    next_attempt_at: float | None = None  # set when outcome is "retrying"


def record_attempt(client: redis.Redis, job_id: str, attempt: WebhookAttempt, ttl_s: int) -> None:
    key = attempts_key(job_id)
    pipe = client.pipeline(transaction=True)
    pipe.rpush(key, attempt.model_dump_json())
    pipe.ltrim(key, -MAX_ATTEMPTS_KEPT, -1)
    pipe.expire(key, ttl_s)
    pipe.execute()


def read_attempts(client: redis.Redis, job_id: str) -> list[WebhookAttempt]:
    raw: list[str] = client.lrange(attempts_key(job_id), 0, -1)  # type: ignore[assignment]
    return [WebhookAttempt.model_validate_json(r) for r in raw]


async def read_attempts_async(client: redis.asyncio.Redis, job_id: str) -> list[WebhookAttempt]:
    raw = await client.lrange(attempts_key(job_id), 0, -1)
    return [WebhookAttempt.model_validate_json(r) for r in raw]
