"""The engine's own process.

A worker is two processes: the Celery consumer (message handling, claims, acks) and this one
(the engine, its loop, the relay, heartbeats, cancels). Kept apart, the consumer never waits for
the GIL behind a decode step, and the decode loop never stalls behind message handling — the
split vLLM's engine core makes for the same reason. The engine process is spawned (never forked:
CUDA does not survive a fork) and dies with its parent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import uuid
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from localmoe.config_store import ConfigWatcher
from localmoe.settings import Settings, get_settings
from workers.messages import MESSAGE, Claimed, ConsumerReady, EngineReady, Finished, Shutdown, Submit

if TYPE_CHECKING:  # the consumer process never imports torch: only the engine process does
    from workers.runtime import Runtime

log = logging.getLogger(__name__)


class EngineProcess:
    """The consumer side's handle: start the engine process, hand it jobs, learn when they end."""

    def __init__(self, name: str) -> None:
        self.name = name
        # This run of the worker: its lease carries it, its claims record it (workers/reaper.py).
        self.incarnation = uuid.uuid4().hex[:12]
        self._conn, child = mp.get_context("spawn").Pipe(duplex=True)
        self._proc = mp.get_context("spawn").Process(
            target=_main, args=(child, name, self.incarnation), name=f"engine-{name}"
        )
        self._send_lock = threading.Lock()
        self._pending: dict[str, Future[Finished]] = {}
        self._stopping = False

    def start(self) -> EngineReady:
        """Spawn the engine and wait until it has loaded and warmed up."""
        self._proc.start()
        ready = MESSAGE.validate_json(self._conn.recv_bytes())
        assert isinstance(ready, EngineReady), ready
        threading.Thread(target=self._read, name="engine-replies", daemon=True).start()
        return ready

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._send(Shutdown())
        self._proc.join(timeout)
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the engine's process group (the engine, vLLM's core)."""
        if self._proc.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.join(5)

    def consumer_ready(self) -> None:
        self._send(ConsumerReady())

    def run(self, jobs: list[Claimed]) -> list[Finished]:
        """Hand claimed jobs to the engine in one message; returns once every one's terminal state
        is in Redis."""
        done: list[Future[Finished]] = []
        for claimed in jobs:
            done.append(Future())
            self._pending[claimed.job.id] = done[-1]
        self._send(Submit(jobs=jobs))
        return [f.result() for f in done]

    def _send(self, message: Submit | ConsumerReady | Shutdown) -> None:
        with self._send_lock:
            self._conn.send_bytes(message.model_dump_json().encode())

    def _read(self) -> None:
        try:
            while True:
                message = MESSAGE.validate_json(self._conn.recv_bytes())
                if isinstance(message, Finished):
                    self._pending.pop(message.job_id).set_result(message)
        except (EOFError, OSError):
            if self._stopping:  # stop() asked for it
                return
        # The engine is gone with jobs in flight: end this worker at once, without acknowledging
        # them, so the broker hands them to another worker (the supervisor restarts this one).
        log.critical(
            "engine process %s died (exit code %s); stopping the worker", self.name, self._proc.exitcode
        )
        self._kill_group()
        os._exit(70)


def _main(conn: Connection, name: str, incarnation: str) -> None:
    """The engine process: load, warm up, report ready, then serve the pipe until it closes."""
    # Its own process group: engines start processes of their own (vLLM's engine core) that do
    # not watch their parent; the consumer ends the whole group, so none outlives the worker.
    os.setpgrp()
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    runtime = _build_runtime(settings, name, incarnation)
    send_lock = threading.Lock()

    def send(message: EngineReady | Finished) -> None:
        with send_lock:
            conn.send_bytes(message.model_dump_json().encode())

    runtime.start()
    watcher = ConfigWatcher(runtime.client, settings, runtime.reconfigure)  # live config, within 2 s
    watcher.check()
    watcher.start()
    send(EngineReady(info=runtime.info))
    try:
        while True:
            message = MESSAGE.validate_json(conn.recv_bytes())
            if isinstance(message, Submit):
                for claimed in message.jobs:
                    held = runtime.submit(
                        claimed.job, claimed.attempt, claimed.resume_text, claimed.resume_tokens
                    )
                    held.future.add_done_callback(
                        lambda f: send(
                            Finished(
                                job_id=f.result().id,
                                status=f.result().status,
                                completion_tokens=f.result().usage.completion_tokens,
                            )
                        )
                    )
            elif isinstance(message, ConsumerReady):
                runtime.mark_ready()
            elif isinstance(message, Shutdown):
                break
    except (EOFError, OSError):  # the consumer process is gone: so is this one
        pass
    runtime.stop()  # the loop stops stepping, then the engine lets go of the device
    os._exit(0)


def _build_runtime(settings: Settings, name: str, incarnation: str) -> Runtime:
    import redis
    import torch

    from scheduler.notify import Notifier
    from scheduler.queue import make_celery
    from scheduler.webhooks import WebhookEventType
    from workers.engine_setup import start_engine
    from workers.metrics import serve_worker_metrics
    from workers.reaper import Reaper
    from workers.runtime import Runtime, worker_info

    device = settings.engine.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(settings.engine.resolved_cpu_threads())
    model_dir = settings.resolved_model_dir
    capacity = settings.engine.max_batch_size
    log.info("worker %s: loading %s on %s", name, model_dir, device)
    engine, choice = start_engine(model_dir, device, settings.engine)
    client = redis.Redis.from_url(
        settings.require_redis_url(), decode_responses=True, health_check_interval=10
    )
    info = worker_info(name, engine, device, str(model_dir), capacity)
    info.engine_reason = (
        choice.reason if engine.name == choice.backend else f"{choice.backend} failed to load"
    )
    celery = make_celery(settings.require_redis_url())
    notifier = Notifier(celery, client)
    reaper = Reaper(
        client,
        celery,
        settings.limits.max_attempts,
        settings.limits.job_ttl_s,
        on_failed=lambda job: notifier.emit(job, WebhookEventType.FAILED, durable=True),
    )
    return Runtime(
        client,
        engine,
        info,
        settings.limits.job_ttl_s,
        settings.engine.step_delay_s,
        notifier=notifier,
        output_interval_s=settings.webhooks.output_interval_s,
        metrics=serve_worker_metrics(info, settings.metrics),
        incarnation=incarnation,
        reaper=reaper,
    )
