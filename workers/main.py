"""`localmoe worker`: one process, one device, one engine, loaded and warmed before consuming."""

from __future__ import annotations

import logging
import socket

import redis
from celery.signals import worker_ready

from localmoe.settings import Settings
from moe_core.torch_engine import TorchEngine
from scheduler.queue import make_celery
from workers.runtime import Runtime, worker_info
from workers.tasks import register

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def serve(settings: Settings, name: str | None = None) -> None:
    url = settings.require_redis_url()
    device = resolve_device(settings.engine.device)
    name = name or f"{device.replace(':', '')}-{socket.gethostname()}"
    model_dir = settings.resolved_model_dir
    capacity = settings.engine.max_batch_size

    if device == "cpu":
        import torch

        torch.set_num_threads(settings.engine.resolved_cpu_threads())
    log.info("worker %s: loading %s on %s", name, model_dir, device)
    engine = TorchEngine(model_dir, device=device, dtype=settings.engine.dtype, max_batch_size=capacity)
    engine.load()

    client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=10)
    runtime = Runtime(
        client, engine, worker_info(name, engine, device, str(model_dir), capacity), settings.limits.job_ttl_s
    )
    runtime.start()  # heartbeats say ready=False until Celery consumes

    app = make_celery(url, task_events=settings.task_events)
    register(app, runtime)
    worker_ready.connect(lambda **_: runtime.mark_ready(), weak=False)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={capacity}",  # one task thread per batch slot; each waits on its job
            f"--queues={','.join(runtime.info.queues)}",
            f"--hostname={name}@%h",
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
