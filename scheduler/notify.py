"""A job's webhook events, from the process that sees them happen to the webhook queue.

Workers emit started, output (at most one per output_interval_s, with the text so far) and the
terminal event; the API emits `cancelled` for a job cancelled while still queued. `emit` only
stamps the event (its body is fixed now, so every retry sends the same bytes) and hands it to
one sender thread: neither the engine's relay nor a request ever waits on the broker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from celery import Celery

from scheduler.jobs import Job, JobStatus
from scheduler.webhooks import Delivery, WebhookEventType, make_delivery, send_delivery

log = logging.getLogger(__name__)

TERMINAL_EVENT = {
    JobStatus.SUCCEEDED: WebhookEventType.COMPLETED,
    JobStatus.FAILED: WebhookEventType.FAILED,
    JobStatus.CANCELLED: WebhookEventType.CANCELLED,
}


def wants(job: Job, event: WebhookEventType) -> bool:
    return (
        job.webhook_endpoint is not None and job.spec.webhook is not None and event in job.spec.webhook.events
    )


def event_data(job: Job, output: str | None = None) -> dict[str, Any]:
    """The `data` of a job event: what a receiver needs without calling back."""
    return {
        "id": job.id,
        "status": job.status.value,
        "output": output if output is not None else job.output,
        "finish_reason": job.finish_reason,
        "error": job.error,
        "usage": job.usage.model_dump(),
        "modality": job.modality.value,
        "priority": job.priority.value,
        "worker": job.worker,
    }


class Notifier(threading.Thread):
    def __init__(self, app: Celery) -> None:
        super().__init__(name="webhook-notifier", daemon=True)
        self.app = app
        self._inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()

    def emit(self, job: Job, event: WebhookEventType, output: str | None = None) -> None:
        if not wants(job, event):
            return
        assert job.webhook_endpoint is not None
        self._inbox.put(make_delivery(job.webhook_endpoint, job.id, event, event_data(job, output)))

    def run(self) -> None:
        with self.app.producer_or_acquire() as producer:
            while True:
                delivery = self._inbox.get()
                for attempt in range(8):  # the broker restarting: keep the event ~1 min
                    try:
                        send_delivery(self.app, delivery, producer=producer)
                        break
                    except Exception as e:
                        log.warning(
                            "could not queue webhook %s for job %s: %s", delivery.type, delivery.job_id, e
                        )
                        time.sleep(0.25 * 2**attempt)
