"""The API process: `uvicorn api.main:app` (or `localmoe api`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api import admin, config, health, jobs, metrics, playground, streams, webhooks
from api.admission import Admission
from api.auth import KeyStore
from api.deps import Services
from api.intake import BodyGuard
from api.openai import batches as openai_batches
from api.openai import chat as openai_chat
from api.openai import completions as openai_completions
from api.openai import files as openai_files
from api.openai import models as openai_models
from api.openai import tokenize as openai_tokenize
from api.openai.batch_runs import BatchRuns
from api.openai.batch_store import BatchStore
from api.openai.file_store import FileStore
from api.store import JobStore
from host.config_store import ConfigWatcher
from host.settings import Settings, get_settings
from scheduler import redis_client
from scheduler.notify import Notifier
from scheduler.queue import Enqueuer, make_celery
from scheduler.routing import PromptCounter, Scheduler


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with where and why, never echoing the input: it may not even be encodable (a lone
    surrogate), and echoing a 1 MB prompt back helps nobody."""
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


MAX_REDIS_CONNECTIONS = 10_000


async def redis_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """Redis restarting or unreachable: 503 and a hint to retry, not a 500. Nothing was accepted."""
    detail = f"the job store is unavailable ({type(exc).__name__}); try again"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or get_settings()
        url = s.require_redis_url()
        # redis-py's asyncio pool caps at 100 and then fails every caller at once: when every live
        # stream held a pooled connection for its XREAD BLOCK, 100 open streams made the next
        # request answer 500 (bench/stream_load.py, RELIABILITY.md). Streams now share one reader
        # (api/stream_hub.py), but bursts of requests may still need many connections at once.
        client = aioredis.from_url(
            url, decode_responses=True, health_check_interval=10, max_connections=MAX_REDIS_CONNECTIONS
        )
        sync_client = redis_client.connect(url, decode_responses=True, health_check_interval=10)
        celery = make_celery(url)
        notifier = Notifier(celery, sync_client)
        notifier.start()
        scheduler = Scheduler(sync_client, s.scheduler)
        watcher = ConfigWatcher(sync_client, s, lambda new, v: app.state.services.reconfigure(new, v))
        app.state.services = Services(
            settings=s,
            base_settings=s,
            config_watcher=watcher,
            store=JobStore(client, s.limits.job_ttl_s),
            files=FileStore(client, s.resolved_files_dir),
            batches=BatchStore(client),
            keys=KeyStore(client),
            admission=Admission(client, s.limits),
            enqueuer=Enqueuer(celery, sync_client, s.limits.job_ttl_s, scheduler.prefixes),
            notifier=notifier,
            counter=PromptCounter(s.resolved_model_dir),
            scheduler=scheduler,
        )
        app.state.services.scheduler.start()
        watcher.check()  # the live config version, before the first request
        watcher.start()
        app.state.batch_runs = batch_runs = BatchRuns(app.state.services)
        background = [
            asyncio.create_task(app.state.services.files.sweep_forever()),
            asyncio.create_task(batch_runs.watch_forever()),
        ]
        yield
        for task in background:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*background, return_exceptions=True)
        await batch_runs.stop()  # each run where it is, its lease given back: another API takes over
        await app.state.services.store.hub.close()
        await client.aclose()

    app = FastAPI(
        title="LocalMoE",
        version="0.1.0",
        summary="On-premises inference for Mixture-of-Experts language models",
        lifespan=lifespan,
        # The service exports Prometheus metrics (api/metrics.py), not OpenTelemetry. With FastAPI's
        # native OTel on (its default) every request asks whether a provider is configured: ~9.5 µs
        # of the API's CPU per request on a 2-core box, for nothing; off, ~0.2 µs.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    for error in (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
        app.add_exception_handler(error, redis_unavailable)
    app.add_middleware(
        BodyGuard,
        max_bytes=(settings or get_settings()).limits.max_body_bytes,
        streamed={openai_files.UPLOAD_PATH},  # reads its own body, with limits.max_file_bytes
    )
    app.add_middleware(metrics.HttpMetrics)  # outermost: it sees BodyGuard's answers too
    # Starlette matches a request against each route in turn (FastAPI's included routers too, with
    # no prefix short-cut): the busiest routes first. A chat completion matched after every other
    # router took ~46 µs of the API's CPU per request (2-core box), ~6 µs first. No two routers'
    # paths overlap, so the order changes nothing else.
    for router in (
        openai_chat.router,
        openai_completions.router,
        jobs.router,
        streams.router,
        health.router,  # probes: frequent, cheap
        openai_models.router,
        openai_tokenize.router,
        openai_files.router,
        openai_batches.router,
        webhooks.router,
        admin.router,
        config.router,
        metrics.router,
        playground.router,
    ):
        app.include_router(router)
    return app


app = create_app()
