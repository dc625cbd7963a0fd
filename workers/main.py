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
            f"--concurrency={info.capacity}",  # one task thread per batch slot; each waits on its job
            f"--queues={','.join(info.queues)}",
            f"--hostname={node_name(name)}",  # the node its relay's task events name (Flower)
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
