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


@router.get("/v1/workers", response_model=list[WorkerInfo], tags=["workers"], responses=refusals(401))
async def workers(services: ServicesDep, _caller: Caller) -> list[WorkerInfo]:
    """Workers whose heartbeat is fresh (three missed beats and a worker is gone)."""
    return await services.store.workers()
