"""A job's webhook events, from the process that sees them happen to the webhook queue.

Workers emit started, output (at most one per output_interval_s, with the text so far) and the
terminal event; the API emits `cancelled` for a job cancelled while still queued. `emit` only
stamps the event (its body is fixed now, so every retry sends the same bytes) and hands it to
one sender thread: neither the engine's relay nor a request ever waits on the broker.

Terminal events are durable: a worker writes the event (keys.WEBHOOK_OUTBOX) in the same Redis
script as the job's final state (workers/relay.py RELAY), and the sender removes it once the
message is on the webhook queue; if the process dies in between, the reaper sends what is left
(the same webhook id: receivers see a repeat at worst, never a loss).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import redis
from celery import Celery

from scheduler import keys
from scheduler.jobs import Job, JobStatus, SequenceOutput
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


def event_data(
    job: Job, output: str | None = None, outputs: list[SequenceOutput] | None = None
) -> dict[str, Any]:
    """The `data` of a job event: what a receiver needs without calling back. `output`, `outputs`:
    the text so far (of sequence 0, of every sequence of a job with n > 1), in place of the job's."""
    outputs = outputs if outputs is not None else job.outputs
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
        **({"logprobs": job.logprobs} if job.logprobs is not None else {}),  # when the job asked
        **({"prompt_logprobs": job.prompt_logprobs} if job.prompt_logprobs is not None else {}),
        **({"outputs": [o.model_dump() for o in outputs]} if outputs is not None else {}),  # n > 1
    }


def delivery_for(
    job: Job,
    event: WebhookEventType,
    output: str | None = None,
    outputs: list[SequenceOutput] | None = None,
) -> Delivery | None:
    """The event's delivery, fixed now, or None when the job's webhook does not ask for it."""
    if not wants(job, event):
        return None
    assert job.webhook_endpoint is not None
    return make_delivery(job.webhook_endpoint, job.id, event, event_data(job, output, outputs))


class Notifier(threading.Thread):
    def __init__(self, app: Celery, client: redis.Redis | None = None) -> None:
        """client: where the outbox is (for durable events); None: no outbox."""
        super().__init__(name="webhook-notifier", daemon=True)
        self.app = app
        self.client = client
        # (delivery, in the outbox, to be written to the outbox before it is sent)
        self._inbox: queue.SimpleQueue[tuple[Delivery, bool, bool]] = queue.SimpleQueue()

    def emit(
        self,
        job: Job,
        event: WebhookEventType,
        output: str | None = None,
        durable: bool = False,
        outputs: list[SequenceOutput] | None = None,
    ) -> None:
        """durable: kept in the outbox until sent (a terminal event no script wrote there)."""
        delivery = delivery_for(job, event, output, outputs)
        if delivery is not None:
            self.send(delivery, outboxed=False, durable=durable)

    def send(self, delivery: Delivery, outboxed: bool, durable: bool = False) -> None:
        """outboxed: already in the outbox (the relay's script put it there); durable: put it there first.
        Either way it leaves the outbox once on the webhook queue."""
        self._inbox.put((delivery, outboxed, durable and not outboxed))

    def run(self) -> None:
        with self.app.producer_or_acquire() as producer:
            while True:
                delivery, outboxed, keep = self._inbox.get()
                if keep and self.client is not None:
                    self.client.hset(keys.WEBHOOK_OUTBOX, delivery.job_id, delivery.model_dump_json())
                    outboxed = True
                for attempt in range(8):  # the broker restarting: keep the event ~1 min
                    try:
                        send_delivery(self.app, delivery, producer=producer)
                        if outboxed and self.client is not None:
                            self.client.hdel(keys.WEBHOOK_OUTBOX, delivery.job_id)
                        break
                    except Exception as e:
                        log.warning(
                            "could not queue webhook %s for job %s: %s", delivery.type, delivery.job_id, e
                        )
                        time.sleep(0.25 * 2**attempt)
