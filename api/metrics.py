"""The API's Prometheus metrics, at GET /metrics.

/metrics needs an admin key, sent as `Authorization: Bearer <key>`; Prometheus scrapes with
`authorization: {credentials_file: ...}` holding one. It carries the API process's own counters
(HTTP requests by route template, jobs accepted and refused) and the service's state, read from
Redis when scraped (bounded by SCRAPE_TIMEOUT_S): Celery queue depths, the admission backlog and
the workers by state. The API processes `localmoe up` runs on one port share their counters through
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `up`): whichever process
answers a scrape reports all of them. Replicas on other hosts are scraped each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import cast

import redis.asyncio as aioredis
from fastapi import APIRouter, HTTPException, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.admission import Refused
from api.auth import Admin
from api.deps import ServicesDep
from api.protocol import refusals
from scheduler import keys
from scheduler.backlog import Verdict
from scheduler.jobs import Job

log = logging.getLogger(__name__)

disable_created_metrics()  # no `_created` twin of every counter and histogram series
REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "localmoe_http_requests",
    "HTTP requests answered, by route template (`other`: no route matched).",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "localmoe_http_request_duration_seconds",
    "From a request's arrival to its response's last byte (streams: the whole stream).",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)
JOBS_SUBMITTED = Counter(
    "localmoe_jobs_submitted", "Jobs accepted, by modality and (capped) priority.", ["modality", "priority"],
    registry=REGISTRY,
)  # fmt: skip
JOBS_REJECTED = Counter(
    "localmoe_jobs_rejected", "Submissions refused with 429, by reason.", ["reason"], registry=REGISTRY
)

REASONS = {
    Verdict.RATE_LIMITED: "rate_limit",
    Verdict.TOO_MANY_JOBS: "backlog_jobs",
    Verdict.TOO_MANY_TOKENS: "backlog_tokens",
    Verdict.KEY_TOO_MANY_JOBS: "key_backlog_jobs",
    Verdict.KEY_TOO_MANY_TOKENS: "key_backlog_tokens",
}
for _reason in REASONS.values():  # every reason exported from the start, at 0
    JOBS_REJECTED.labels(_reason)

# The refusal's detail names its verdict: admission's own templates, read back. A 429 from
# admission that matches none is the rate limiter's.
# kombu's Redis transport keeps a queue as one list per priority step: `name`, `name:1`, `name:2`,
# `name:3` (scheduler/queue.py: priority_steps [0, 1, 2, 3], sep ":").
PRIORITY_LISTS = ("", ":1", ":2", ":3")
SCRAPE_TIMEOUT_S = 2.0
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # any other is `other`


def count_submitted(job: Job) -> None:
    JOBS_SUBMITTED.labels(job.modality.value, job.priority.value).inc()


def count_rejected(refusal: HTTPException) -> None:
    """A refusal from Admission.admit, counted by the limit it hit. Not the batch tier waiting for
    spare capacity: that is its pace, not work refused."""
    if isinstance(refusal, Refused) and refusal.verdict is not Verdict.NO_SPARE:
        JOBS_REJECTED.labels(REASONS[refusal.verdict]).inc()


# --- HTTP requests ------------------------------------------------------------------------------


class HttpMetrics:
    """ASGI middleware: counts and times each HTTP request under its route's template
    (`/v1/jobs/{job_id}`, set in the scope by the router), or `other` when none matched; labels
    stay bounded whatever clients send. Websockets are not counted."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = route.path if isinstance(route, BaseRoute) and hasattr(route, "path") else "other"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            HTTP_REQUESTS.labels(template, method, str(status)).inc()
            HTTP_DURATION.labels(template, method).observe(time.perf_counter() - started)


# --- the service's state, read from Redis at scrape time ------------------------------------------


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def service_state(client: aioredis.Redis, workers_ready: int, workers_loading: int) -> list[Metric]:
    """Queue depths (the shared queue, every registered worker's, the webhooks') and the backlog."""
    names = cast(list[str], await client.zrange(keys.WORKERS, 0, -1))
    queues = [keys.SHARED_QUEUE, *(keys.worker_queue(n) for n in sorted(names)), keys.WEBHOOK_QUEUE]
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for suffix in PRIORITY_LISTS:
            pipe.llen(queue + suffix)
    pipe.hget(keys.QUEUED_COUNT, "*")
    pipe.hget(keys.QUEUED_TOKENS, "*")
    replies = await pipe.execute()
    depth = GaugeMetricFamily(
        "localmoe_queue_depth", "Messages waiting in a Celery queue, all priorities.", labels=["queue"]
    )
    n = len(PRIORITY_LISTS)
    for i, queue in enumerate(queues):
        depth.add_metric([queue], sum(int(x) for x in replies[i * n : (i + 1) * n]))
    jobs, tokens = replies[-2:]
    workers = GaugeMetricFamily("localmoe_workers", "Workers with a fresh heartbeat.", labels=["state"])
    workers.add_metric(["ready"], workers_ready)
    workers.add_metric(["loading"], workers_loading)
    return [
        depth,
        GaugeMetricFamily("localmoe_backlog_jobs", "Jobs admitted, not yet claimed.", value=int(jobs or 0)),
        GaugeMetricFamily("localmoe_backlog_tokens", "Their prompt + max_tokens.", value=int(tokens or 0)),
        workers,
    ]


def _api_registry() -> CollectorRegistry:
    """This process's counters, or every API process's when they share a multiprocess folder."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    merged = CollectorRegistry(auto_describe=True)
    multiprocess.MultiProcessCollector(merged)
    return merged


router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
        **refusals(401, 403, inline=True),
    },
)
async def metrics(services: ServicesDep, _admin: Admin) -> Response:
    """Prometheus metrics of the API processes and of the service's queues (an admin key)."""
    body = generate_latest(_api_registry())
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT_S):
            workers = await services.store.workers()
            ready = sum(w.ready for w in workers)
            state = await service_state(services.store.client, ready, len(workers) - ready)
    except (aioredis.RedisError, TimeoutError) as e:  # the counters above still go out
        log.warning("metrics: no queue, backlog or worker state from Redis (%s)", e)
    else:
        snapshot = CollectorRegistry(auto_describe=False)
        snapshot.register(_Families(state))
        body += generate_latest(snapshot)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
