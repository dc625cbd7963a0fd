"""The Celery side every process shares: one app configured for LocalMoE's guarantees.

The API only sends (`send_task` by name, so it never imports worker code); workers register the
task in workers/tasks.py on an app made here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from celery import Celery
from kombu import Queue

from scheduler import keys


def make_celery(broker_url: str, task_events: bool = False) -> Celery:
    app = Celery("localmoe", broker=broker_url, set_as_current=False)
    app.conf.update(
        # JSON only, both ways: a pickle message is refused, never executed.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Results live in the job's Redis record, not in a Celery backend.
        task_ignore_result=True,
        # A job is acknowledged only once its terminal state is written; a worker process that
        # dies mid-job hands it back to the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=keys.SHARED_QUEUE,
        task_queues=[Queue(keys.SHARED_QUEUE)],
        task_create_missing_queues=True,
        task_send_sent_event=False,  # halves apply_async throughput (shared/NOTES.md)
        worker_send_task_events=task_events,  # Flower's task view; costs two publishes per job
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


class Enqueuer:
    """Sends job messages from one thread over one broker connection.

    Celery's send_task is blocking; called from many request threads at once it contends for
    the producer pool (64 concurrent sends: 83 ms, against 25 ms one after another). Requests
    hand their message to this thread and await the outcome instead.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._inbox: queue.SimpleQueue[
            tuple[dict[str, Any], str, asyncio.AbstractEventLoop, asyncio.Future[None]]
        ]
        self._inbox = queue.SimpleQueue()
        threading.Thread(target=self._run, name="enqueuer", daemon=True).start()

    async def send(self, job: dict[str, Any], queue_name: str) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._inbox.put((job, queue_name, loop, done))
        await done

    def _run(self) -> None:
        with self.app.producer_or_acquire() as producer:
            while True:
                job, queue_name, loop, done = self._inbox.get()
                try:
                    self.app.send_task(keys.RUN_JOB_TASK, args=[job], queue=queue_name, producer=producer)
                except Exception as e:
                    loop.call_soon_threadsafe(_settle, done, e)
                else:
                    loop.call_soon_threadsafe(_settle, done, None)


def _settle(done: asyncio.Future[None], error: Exception | None) -> None:
    if done.done():  # the request went away meanwhile
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
