"""Webhooks: what the API, the job workers and the webhook worker agree on.

A job names a URL and the events it wants (`WebhookSpec`), as a batch does (`BatchWebhookSpec`:
its ends, `batch.completed` and the like). The API checks the URL against the
allowlist (`check_url`) and registers it as an `Endpoint` of the API key's owner — one per owner
and URL, each with its own signing secret. When an event happens its payload is fixed once
(`enqueue_delivery`: the exact body bytes every attempt will send) and put on the webhook queue;
the webhook worker (workers/webhooks.py) POSTs it, signed per Standard Webhooks
(https://www.standardwebhooks.com), retrying with the same webhook id and body. Every attempt is
appended to the job's attempt log (`record_attempt`, `read_attempts`).

One module per concern: `spec` (what a job asks for, the keys), `urls` (which URLs are allowed;
the allowlist's syntax is host/allowlist.py, which the settings validate with),
`signing`, `endpoints` (registered URLs and their secrets), `deliveries` (payloads, the queue, the
attempt log). The names every caller uses are re-exported here.
"""

from host.allowlist import (
    MAX_URL_LENGTH,
    Allowlist,
    IPAddress,
    IPNetwork,
    parse_allowlist,
    url_problem,
)
from scheduler.webhooks.deliveries import (
    Delivery,
    Outcome,
    WebhookAttempt,
    enqueue_delivery,
    make_delivery,
    read_attempts,
    read_attempts_async,
    record_attempt,
    send_delivery,
)
from scheduler.webhooks.endpoints import (
    Endpoint,
    delete_endpoint,
    disable_endpoint,
    endpoint_for,
    get_endpoint,
    list_endpoints,
    register_endpoint,
)
from scheduler.webhooks.signing import (
    SECRET_PREFIX,
    new_secret,
    sign,
)
from scheduler.webhooks.spec import (
    DEFAULT_EVENTS,
    MAX_ATTEMPTS_KEPT,
    WEBHOOK_PREFIX,
    BatchEventType,
    BatchWebhookSpec,
    WebhookEventType,
    WebhookSpec,
    attempts_key,
    endpoint_key,
    owner_key,
)
from scheduler.webhooks.urls import (
    METADATA_ADDRESSES,
    check_url,
    resolve_host,
    special_kind,
)

__all__ = [
    "DEFAULT_EVENTS",
    "MAX_ATTEMPTS_KEPT",
    "MAX_URL_LENGTH",
    "METADATA_ADDRESSES",
    "SECRET_PREFIX",
    "WEBHOOK_PREFIX",
    "Allowlist",
    "BatchEventType",
    "BatchWebhookSpec",
    "Delivery",
    "Endpoint",
    "IPAddress",
    "IPNetwork",
    "Outcome",
    "WebhookAttempt",
    "WebhookEventType",
    "WebhookSpec",
    "attempts_key",
    "check_url",
    "delete_endpoint",
    "disable_endpoint",
    "endpoint_for",
    "endpoint_key",
    "enqueue_delivery",
    "get_endpoint",
    "list_endpoints",
    "make_delivery",
    "new_secret",
    "owner_key",
    "parse_allowlist",
    "read_attempts",
    "read_attempts_async",
    "record_attempt",
    "register_endpoint",
    "resolve_host",
    "send_delivery",
    "sign",
    "special_kind",
    "url_problem",
]
