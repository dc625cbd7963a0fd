"""Liveness, readiness (the probes need no API key and say no more than ready or not), the
version and the worker registry."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Response
from pydantic import BaseModel

from api.auth import Caller
from api.deps import Services, ServicesDep
from api.protocol import Health, refusals
from host.settings import get_settings
from scheduler.registry import WorkerInfo

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The API process is up."""
    return Health(status="ok")


async def _ready(services: Services) -> bool | None:
    """At least one worker has loaded and warmed up its engine; None: Redis does not answer."""
    try:
        return any(w.ready for w in await services.store.workers())
    except aioredis.RedisError:
        return None


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(services: ServicesDep, response: Response) -> Health:
    """Ready once Redis answers and at least one worker has loaded and warmed up its engine. No API
    key (load balancers, compose and Kubernetes probe it), so it says no more than that: `ready`,
    `starting` (no warm worker yet) or `unavailable` (Redis does not answer), 503 unless ready.
    Under `localmoe up`, the X-LocalMoE-Instance header names the `up` that started this process."""
    if instance := get_settings().instance:
        response.headers["X-LocalMoE-Instance"] = instance
    ready = await _ready(services)
    if not ready:
        response.status_code = 503
        return Health(status="unavailable" if ready is None else "starting")
    return Health(status="ready")


_PROBE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Serving (no body)."},
    503: {"description": "No warm worker yet, or Redis does not answer."},
}


@router.get("/health", response_class=Response, responses=_PROBE)
async def health(services: ServicesDep) -> Response:
    """vLLM's health route, for the clients and benchmark tools that wait on it: 200 with no body
    once a worker has warmed up its engine (readyz's test), else 503. No API key, as vLLM's."""
    return Response(status_code=200 if await _ready(services) else 503)


@router.get("/ping", response_class=Response, responses=_PROBE)
@router.post("/ping", response_class=Response, responses=_PROBE)
async def ping(services: ServicesDep) -> Response:
    """vLLM's /ping (SageMaker's probe), GET or POST: the same answer as /health. No API key."""
    return await health(services)


class Version(BaseModel):
    version: str


@router.get("/version", response_model=Version, responses=refusals(401))
async def version(_caller: Caller) -> Version:
    """LocalMoE's version (vLLM answers its own here); behind the key, unlike the probes."""
    return Version(version=metadata.version("localmoe"))


@router.get("/v1/workers", response_model=list[WorkerInfo], tags=["workers"], responses=refusals(401))
async def workers(services: ServicesDep, _caller: Caller) -> list[WorkerInfo]:
    """Workers whose heartbeat is fresh (three missed beats and a worker is gone)."""
    return await services.store.workers()
