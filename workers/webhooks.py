"""`python -m workers.webhooks`: the webhook worker — POSTs each Delivery, signed, and retries it.

Its own Celery queue (keys.WEBHOOK_QUEUE) and process, threads pool: a slow receiver holds one of
its threads, never a GPU worker. One message is one attempt. A retry is a new message carrying
the same Delivery with attempt + 1 (same webhook_id, same body), sent with a countdown. Delivery
is at least once: a worker that dies after sending the retry but before acknowledging its own
message (acks_late) makes the attempt again; receivers deduplicate on webhook-id, as Standard
Webhooks asks.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import redis
from celery import Celery

from host.config_store import ConfigWatcher
from host.settings import Settings, WebhookSettings, get_settings
from scheduler import keys, redis_client
from scheduler.queue import make_celery
from scheduler.webhooks import (
    Delivery,
    Endpoint,
    Outcome,
    WebhookAttempt,
    check_url,
    disable_endpoint,
    get_endpoint,
    parse_allowlist,
    record_attempt,
    send_delivery,
    sign,
)
from workers.metrics import WEBHOOK_DELIVERIES, serve_webhook_metrics

log = logging.getLogger(__name__)

USER_AGENT = "LocalMoE-Webhooks/0.1"


@dataclass(frozen=True)
class Answer:
    """What one POST came to: a status (and its Retry-After, in seconds), or an error."""

    status_code: int | None
    error: str | None = None
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


def backoff_s(settings: WebhookSettings, attempt: int, retry_after_s: float | None) -> float:
    """The wait after failed attempt `attempt` (1-based): full jitter over
    base · 2^(attempt-1), Retry-After as the least wait, never more than max_backoff_s."""
    ceiling = min(settings.max_backoff_s, settings.base_backoff_s * 2.0 ** min(attempt - 1, 60))
    delay = random.uniform(0.0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return min(delay, settings.max_backoff_s)


def retryable(answer: Answer) -> bool:
    code = answer.status_code
    return code is None or code == 429 or code >= 500


class Deliverer:
    """Makes one attempt of a Delivery and decides what follows: done, a retry, or nothing more.

    client: Redis (decode_responses=True), for endpoints and attempt logs; ttl_s: how long an
    attempt log is kept (the job's TTL); http: the client every attempt POSTs with.
    """

    def __init__(
        self, app: Celery, client: redis.Redis, settings: WebhookSettings, ttl_s: int, http: httpx.Client
    ) -> None:
        self.app = app
        self.client = client
        self.settings = settings
        self.ttl_s = ttl_s
        self.http = http

    def attempt(self, delivery: Delivery) -> WebhookAttempt:
        now = time.time()
        if delivery.first_attempt_at is None:
            delivery = delivery.model_copy(update={"first_attempt_at": now})
        endpoint = get_endpoint(self.client, delivery.endpoint_id)
        if endpoint is None:
            return self._record(delivery, "", now, "refused", error="the endpoint was deleted")
        if endpoint.disabled:
            reason = f"the endpoint is disabled: {endpoint.disabled_reason}"
            return self._record(delivery, endpoint.url, now, "disabled", error=reason)
        refused = check_url(endpoint.url, self.settings.allow, resolve=True)
        if refused is not None:
            return self._record(delivery, endpoint.url, now, "refused", error=refused)

        answer = self._post(endpoint, delivery, int(now))
        code = answer.status_code
        if code is not None and 200 <= code < 300:
            return self._record(delivery, endpoint.url, now, "delivered", code)
        if code == 410:
            reason = "the receiver answered 410 Gone"
            disable_endpoint(self.client, endpoint.id, reason)
            return self._record(delivery, endpoint.url, now, "disabled", code, f"{reason}; endpoint disabled")
        error = answer.error or f"HTTP {code}"
        if not retryable(answer):
            if code is not None and 300 <= code < 400:
                error += ": redirects are not followed"
            return self._record(delivery, endpoint.url, now, "gave_up", code, error)

        assert delivery.first_attempt_at is not None
        next_at = time.time() + backoff_s(self.settings, delivery.attempt, answer.retry_after_s)
        if next_at - delivery.first_attempt_at > self.settings.max_age_s:
            error += f"; no retry after {self.settings.max_age_s:g} s from the first attempt"
            return self._record(delivery, endpoint.url, now, "gave_up", code, error)
        # Logged before the retry is sent, so the log stays in attempt order.
        done = self._record(delivery, endpoint.url, now, "retrying", code, error, next_at)
        retry = delivery.model_copy(update={"attempt": delivery.attempt + 1})
        send_delivery(self.app, retry, countdown=max(0.0, next_at - time.time()))
        return done

    def _post(self, endpoint: Endpoint, delivery: Delivery, timestamp: int) -> Answer:
        body = delivery.body.encode()
        headers = {
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(endpoint.secret, delivery.webhook_id, timestamp, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        try:
            # The response body is never read: only its status and Retry-After matter.
            with self.http.stream("POST", endpoint.url, content=body, headers=headers) as response:
                wait = parse_retry_after(response.headers.get("retry-after"), time.time())
                return Answer(response.status_code, retry_after_s=wait)
        except httpx.TimeoutException:
            return Answer(None, f"timed out after {self.settings.timeout_s:g} s")
        except httpx.HTTPError as e:
            return Answer(None, f"{type(e).__name__}: {e}")

    def _record(
        self,
        delivery: Delivery,
        url: str,
        at: float,
        outcome: Outcome,
        status_code: int | None = None,
        error: str | None = None,
        next_attempt_at: float | None = None,
    ) -> WebhookAttempt:
        attempt = WebhookAttempt(
            webhook_id=delivery.webhook_id,
            type=delivery.type,
            endpoint_id=delivery.endpoint_id,
            url=url,
            attempt=delivery.attempt,
            at=at,
            status_code=status_code,
            error=error,
            outcome=outcome,
            next_attempt_at=next_attempt_at,
        )
        record_attempt(self.client, delivery.job_id, attempt, self.ttl_s)
        WEBHOOK_DELIVERIES.labels(outcome).inc()
        log.info(
            "webhook %s (job %s, %s) attempt %d → %s %s",
            delivery.webhook_id,
            delivery.job_id,
            delivery.type.value,
            delivery.attempt,
            outcome,
            error or status_code,
        )
        return attempt


def make_http(settings: WebhookSettings) -> httpx.Client:
    # trust_env=False: no proxy from the environment — the allowlist judges the real destination.
    return httpx.Client(
        timeout=settings.timeout_s,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(
            max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
        ),
    )


def register_delivery(app: Celery, client: redis.Redis, settings: WebhookSettings, ttl_s: int) -> Deliverer:
    """Register keys.DELIVER_WEBHOOK_TASK on `app`: each message is one attempt of a Delivery."""
    deliverer = Deliverer(app, client, settings, ttl_s, make_http(settings))

    @app.task(name=keys.DELIVER_WEBHOOK_TASK)
    def deliver_webhook(delivery: dict[str, Any]) -> dict[str, Any]:
        done = deliverer.attempt(Delivery.model_validate(delivery))
        return {"webhook_id": done.webhook_id, "attempt": done.attempt, "outcome": done.outcome}

    return deliverer


def serve(settings: Settings) -> None:
    webhooks = settings.webhooks
    parse_allowlist(webhooks.allow)  # a malformed entry fails here, not at the first delivery
    if not webhooks.allow:
        log.warning("webhooks are off (webhooks.allow is empty): every delivery will be refused")
    url = settings.require_redis_url()
    client = redis_client.connect(url, decode_responses=True, health_check_interval=10)
    app = make_celery(url)
    deliverer = register_delivery(app, client, webhooks, settings.limits.job_ttl_s)

    def reconfigure(new: Settings, _version: object) -> None:  # live config: allowlist, retries
        deliverer.settings, deliverer.ttl_s = new.webhooks, new.limits.job_ttl_s

    watcher = ConfigWatcher(client, settings, reconfigure)
    watcher.check()
    watcher.start()
    serve_webhook_metrics(settings.metrics)
    log.info(
        "webhook worker: allow %s; %d in flight; consuming %s",
        webhooks.allow,
        webhooks.concurrency,
        keys.WEBHOOK_QUEUE,
    )
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={webhooks.concurrency}",
            f"--queues={keys.WEBHOOK_QUEUE}",
            "--hostname=webhooks@%h",
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


if __name__ == "__main__":
    _settings = get_settings()
    logging.basicConfig(
        level=_settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per POST otherwise
    serve(_settings)
