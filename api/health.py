"""Liveness, readiness and the worker registry."""

from __future__ import annotations

import redis.asyncio as aioredis
from fastapi import APIRouter, Response

from api.auth import Caller
from api.deps import ServicesDep
from api.protocol import Health, refusals
from localmoe.settings import get_settings
from scheduler.registry import WorkerInfo

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The API process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}, **refusals(401)})
async def readyz(services: ServicesDep, _caller: Caller, response: Response) -> Health:
    """Ready once Redis answers and at least one worker has loaded and warmed up its engine.
    Under `localmoe up`, the X-LocalMoE-Instance header names the `up` that started this process."""
    if instance := get_settings().instance:
        response.headers["X-LocalMoE-Instance"] = instance
    try:
        ready = [w for w in await services.store.workers() if w.ready]
    except aioredis.RedisError as e:
        response.status_code = 503
        return Health(status="unavailable", detail=f"redis: {e}")
    if not ready:
        response.status_code = 503
        return Health(status="starting", detail="no worker has warmed up its engine yet")
    return Health(status="ready", workers_ready=len(ready))


@router.get(
    "/health",
    response_class=Response,
    responses={200: {"description": "Serving (no body)."}, 503: {"description": "No warm worker yet."}},
)
async def health(services: ServicesDep) -> Response:
    """vLLM's health route, for the clients and benchmark tools that wait on it: 200 with no body
    once a worker has warmed up its engine (readyz's test), else 503. No API key, as vLLM's."""
    try:
        ready = any(w.ready for w in await services.store.workers())
    except aioredis.RedisError:
        ready = False
    return Response(status_code=200 if ready else 503)


@router.get("/v1/workers", response_model=list[WorkerInfo], tags=["workers"], responses=refusals(401))
async def workers(services: ServicesDep, _caller: Caller) -> list[WorkerInfo]:
    """Workers whose heartbeat is fresh (three missed beats and a worker is gone)."""
    return await services.store.workers()
