"""The worker's runtime process, and the consumer's handle on it (`RuntimeProcess`).

A worker is three processes, each with an interpreter lock of its own: the Celery consumer
(messages, acks), this one (claims, the relay to Redis, heartbeats, cancels, webhooks, metrics)
and the engine process it starts (the engine and its step loop, workers/engine_proc.py). The
consumer never waits behind a relay write, the relay never behind a decode step, and the engine
never behind either: the split vLLM's engine core makes for the same reason. Spawned (never
forked: CUDA does not survive a fork); it ends when the consumer's pipe closes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import signal
import threading
import uuid
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from host.config_store import ConfigWatcher
from host.heap import freeze_heap
from host.instance import set_process_name
from host.settings import Settings, get_settings
from scheduler.jobs import Job, Priority
from workers.messages import MESSAGE, ConsumerReady, EngineReady, Finished, Shutdown, Submit, submit_json

if TYPE_CHECKING:  # the consumer process never imports torch: only the engine process does
    from workers.runtime import Runtime

log = logging.getLogger(__name__)

MAX_SUBMITS = 64  # consumer messages the runtime claims together at most (one script call)


class RuntimeProcess:
    """The consumer side's handle: start the runtime process (and so the engine), hand it jobs,
    learn when they end."""

    def __init__(self, name: str) -> None:
        self.name = name
        # This run of the worker: its lease carries it, its claims record it (workers/reaper.py).
        self.incarnation = uuid.uuid4().hex[:12]
        self._conn, child = mp.get_context("spawn").Pipe(duplex=True)
        self._proc = mp.get_context("spawn").Process(
            target=_main, args=(child, name, self.incarnation), name=f"runtime-{name}"
        )
        self._send_lock = threading.Lock()
        self._pending: dict[tuple[int, str], Future[Finished]] = {}  # (Submit seq, job id) → its end
        self._seq = 0
        self._stopping = False

    def start(self) -> EngineReady:
        """Spawn the runtime (which spawns the engine) and wait until the engine is warm."""
        self._proc.start()
        ready = MESSAGE.validate_json(self._conn.recv_bytes())
        assert isinstance(ready, EngineReady), ready
        threading.Thread(target=self._read, name="runtime-replies", daemon=True).start()
        return ready

    def stop(self, timeout: float = 10.0) -> None:
        """After Celery's warm shutdown (every task thread's jobs ended): the batch tier's jobs,
        which hold no task thread (see run), end too; then the runtime and its engine stop."""
        for done in list(self._pending.values()):
            done.result()
        self._stopping = True
        self._send(Shutdown())
        self._proc.join(timeout)
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the runtime's process group (it, the engine, vLLM's core)."""
        if self._proc.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.join(5)

    def consumer_ready(self) -> None:
        self._send(ConsumerReady())

    def run(self, jobs: list[dict[str, Any]]) -> list[Finished]:
        """Hand one message's jobs (as it carried them) to the runtime, which claims and runs them;
        returns once every one's terminal state is in Redis, or it was not claimed here.

        A message of batch-tier jobs (the API puts jobs of one priority in a message; the reaper
        one job) returns at once, []: its task thread is the consumer's flow control, which the
        batch tier has in admission instead (api/admission.py), and a batch line can wait in the
        engine for long (engine.batch_yield_rows: while any other job runs). Holding threads, such
        lines took every one of them after a worker died and its lines came here, and the next
        interactive message waited in Redis for a line to end (or was lost with a consumer killed
        holding it: the reaper sends such a job again only after record.WAITING_CHECK_S)."""
        with self._send_lock:
            self._seq += 1
            seq = self._seq
            done = [self._pending.setdefault((seq, str(job["id"])), Future()) for job in jobs]
            self._conn.send_bytes(submit_json(seq, jobs))
        if all(job.get("priority") == Priority.BATCH for job in jobs):
            return []
        return [f.result() for f in done]

    def _send(self, message: ConsumerReady | Shutdown) -> None:
        with self._send_lock:
            self._conn.send_bytes(message.model_dump_json().encode())

    def _read(self) -> None:
        try:
            while True:
                message = MESSAGE.validate_json(self._conn.recv_bytes())
                if isinstance(message, Finished):  # a job listed twice in one message: one reply counts
                    done = self._pending.pop((message.seq, message.job_id), None)
                    if done is not None:
                        done.set_result(message)
        except (EOFError, OSError):
            if self._stopping:  # stop() asked for it
                return
        # The runtime (or the engine, which takes the runtime with it) is gone with jobs in flight:
        # end this worker at once, without acknowledging
        # them, so the broker hands them to another worker (the supervisor restarts this one).
        log.critical(
            "runtime process %s died (exit code %s); stopping the worker", self.name, self._proc.exitcode
        )
        self._kill_group()
        os._exit(70)


def _main(conn: Connection, name: str, incarnation: str) -> None:
    """The runtime process: start the engine, report ready, then serve the pipe until it closes."""
    # Its own process group, which the engine process and vLLM's engine core join: the consumer
    # ends the whole group, so none outlives the worker.
    os.setpgrp()
    try:
        _serve(conn, name, incarnation)  # ends with os._exit
    except BaseException:
        log.exception("the runtime process failed")
    # Failed (the consumer gone while the engine loaded, say): multiprocessing's exit would join
    # the engine process, which waits for this one's messages for ever. The group goes at once.
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _serve(conn: Connection, name: str, incarnation: str) -> None:
    set_process_name("lm-runtime")
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
    freeze_heap()  # what the imports and the start made stays for the process's life (host/heap.py)
    watcher = ConfigWatcher(runtime.client, settings, runtime.reconfigure)  # live config, within 2 s
    watcher.check()
    watcher.start()
    send(EngineReady(info=runtime.info))

    def take(submits: list[Submit]) -> None:
        """The jobs of these Submits, claimed in one script call: each claimed one runs and is
        answered when it ends, the others at once."""
        pairs = [(s.seq, job) for s in submits for job in s.jobs]
        if not pairs:
            return
        for (seq, job), held in zip(pairs, runtime.take([job for _, job in pairs]), strict=True):
            if held is None:
                send(Finished(seq=seq, job_id=job.id, status=None))
                continue
            held.future.add_done_callback(functools.partial(finished, seq))

    def finished(seq: int, done: Future[Job]) -> None:
        job = done.result()
        tokens = job.usage.completion_tokens
        send(Finished(seq=seq, job_id=job.id, status=job.status, completion_tokens=tokens))

    def read() -> Submit | ConsumerReady | Shutdown | None:
        """The consumer's next message; None for a Submit whose jobs do not validate (a message
        from another version of LocalMoE, say): each of them is answered unclaimed, so the
        consumer's task ends and the jobs, still queued, are sent again later (and refused again,
        logged each time) without taking this worker down."""
        raw = conn.recv_bytes()
        try:
            message = MESSAGE.validate_json(raw)
        except ValidationError as e:
            submit = orjson.loads(raw)
            log.error("a message of jobs this worker cannot read, left queued: %s", e)
            for job in submit.get("jobs") or []:
                send(Finished(seq=int(submit["seq"]), job_id=str(job.get("id")), status=None))
            return None
        assert isinstance(message, Submit | ConsumerReady | Shutdown), message
        return message

    try:
        while True:
            # what the consumer sent meanwhile, in order: Submits next to each other are claimed together
            batch = [read()]
            while len(batch) < MAX_SUBMITS and conn.poll():
                batch.append(read())
            submits: list[Submit] = []
            stop = False
            for message in batch:
                if message is None:
                    continue
                if isinstance(message, Submit):
                    submits.append(message)
                    continue
                take(submits)
                submits = []
                if isinstance(message, ConsumerReady):
                    runtime.mark_ready()
                elif isinstance(message, Shutdown):
                    stop = True
                    break
            take(submits)
            if stop:
                break
    except (EOFError, OSError):  # the consumer process is gone: so is this one
        pass
    runtime.stop()  # the engine stops stepping and lets go of the device
    os._exit(0)


def _build_runtime(settings: Settings, name: str, incarnation: str) -> Runtime:
    from scheduler import redis_client
    from scheduler.notify import Notifier
    from scheduler.queue import make_celery
    from scheduler.task_events import node_name
    from scheduler.webhooks import WebhookEventType
    from workers.engine_proc import EngineHost
    from workers.metrics import serve_worker_metrics
    from workers.reaper import Reaper
    from workers.relay import Relay
    from workers.runtime import Runtime, worker_info

    url = settings.require_redis_url()
    client = redis_client.connect(url, decode_responses=True, health_check_interval=10)
    celery = make_celery(url)
    notifier = Notifier(celery, client)
    relay = Relay(
        client,
        settings.limits.job_ttl_s,
        notifier,
        settings.webhooks.output_interval_s,
        node=node_name(name),
        flower=settings.flower,
    )
    engine = EngineHost(settings, relay)
    log.info("worker %s: starting its engine (%s)", name, settings.resolved_model_dir)
    engine.start()  # loaded and warm
    info = worker_info(name, engine, str(settings.resolved_model_dir), settings.engine.max_batch_size)
    info.engine_reason = engine.reason if engine.name == engine.choice else f"{engine.choice} failed to load"
    relay.metrics = serve_worker_metrics(info, settings.metrics)

    def reaped(job: Job) -> None:
        notifier.emit(job, WebhookEventType.FAILED, durable=True)
        relay.failed_elsewhere(job)

    reaper = Reaper(client, celery, settings.limits.max_attempts, settings.limits.job_ttl_s, on_failed=reaped)
    return Runtime(
        client,
        engine,
        info,
        notifier=notifier,
        metrics=relay.metrics,
        incarnation=incarnation,
        reaper=reaper,
        prefill_weight=settings.scheduler.prefill_weight,
    )
