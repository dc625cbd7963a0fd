"""`localmoe worker`: one device; its runtime and engine processes started, the engine warm, before
Celery consumes."""

from __future__ import annotations

import logging
import socket

from celery.signals import worker_ready, worker_shutdown

from host.settings import Settings
from scheduler.queue import make_celery
from scheduler.task_events import node_name
from workers.runtime_proc import RuntimeProcess
from workers.tasks import register

log = logging.getLogger(__name__)

# Task threads per batch slot. A task thread holds its message until the message's jobs end, and
# the worker takes no more messages from the broker than it has threads (prefetch 1 each): with
# one thread per slot, the batch tier's lines (one message each, up to 1 - scheduler.batch_reserve
# of the slots) and a burst of interactive jobs together held every thread, and the next urgent
# message waited in Redis for a job to end (the H200, torch engine: 30 ms p50, 107 ms p95 with no
# reserve). With twice as many, an urgent job is claimed at once and its engine takes it first (by
# rank; the torch engine preempts a batch line for it). Jobs claimed beyond the slots wait in the
# engine, as a message of many jobs always could. The batch tier's messages hold no thread
# (RuntimeProcess.run): admission bounds them.
TASK_THREADS_PER_SLOT = 2


def task_threads(capacity: int) -> int:
    """Celery task threads for an engine of `capacity` batch slots."""
    return TASK_THREADS_PER_SLOT * capacity


def serve(settings: Settings, name: str | None = None) -> None:
    url = settings.require_redis_url()
    name = name or socket.gethostname()
    engine = RuntimeProcess(name)
    ready = engine.start()  # blocks until the engine has loaded and warmed up
    info = ready.info
    log.info("worker %s: engine %s on %s warm; consuming %s", name, info.engine, info.device, info.queues)

    app = make_celery(url)
    register(app, engine)
    worker_ready.connect(lambda **_: engine.consumer_ready(), weak=False)
    worker_shutdown.connect(lambda **_: engine.stop(), weak=False)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={task_threads(info.capacity)}",
            f"--queues={','.join(info.queues)}",
            f"--hostname={node_name(name)}",  # the node its relay's task events name (Flower)
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
