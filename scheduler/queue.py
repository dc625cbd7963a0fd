"""The Celery side every process shares: one app configured for LocalMoE's guarantees.

The API only sends (`send_task` by name, so it never imports worker code); workers register the
task in workers/tasks.py on an app made here.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from scheduler import keys


def make_celery(broker_url: str) -> Celery:
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
        worker_send_task_events=True,  # Flower's task view
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
