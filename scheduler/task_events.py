"""Each job as a task in Flower: Celery task events, made per job by the worker's relay.

Celery's own task events describe a message, not a job: the consumer sends task-received,
task-started and task-succeeded for each `localmoe.run_jobs` message (one to 64 jobs, args
"[n jobs]", a Celery id that is no job's), and the message "succeeds" once the runtime has
answered for its jobs, whether they succeeded, failed, were cancelled or were not claimed here.
So those stay off (scheduler/queue.py) and the relay (workers/relay.py) publishes, per job, what
Celery's worker sends for a task of its own:

    claimed        task-received (name, args: the prompt cut short, kwargs, routing key: its
                   queue) and task-started, stamped at the claim
    finalized      task-succeeded | task-failed (exception: the job's error) | task-cancelled
                   (a state of its own: CANCELLED), each with runtime and result (finish reason,
                   token counts), sent only if the terminal write it reports was made
    cancelled      task-received and task-cancelled when the worker takes the message of a job
    while queued   that was cancelled before any worker claimed it

Each relay batch's events travel as one Celery event message holding a list (the grouped form
Celery's EventReceiver unpacks) on the channel kombu's Redis transport fans Celery events out on,
published by the relay's own script: no round trip of their own. Flower reads them as a worker's.
"""

from __future__ import annotations

import itertools
import socket
import uuid
from typing import Any

import orjson

from host.settings import FlowerSettings
from scheduler import keys
from scheduler.jobs import Job, JobStatus

TASK_NAME = keys.RUN_JOB_TASK  # "localmoe.run_job": the task every job shows as
EXCHANGE = "celeryev"  # Celery's event exchange
ROUTING_KEY = "task.multi"  # Celery's routing key for a list of task events

_TERMINAL_TYPE = {
    JobStatus.SUCCEEDED: "task-succeeded",
    JobStatus.FAILED: "task-failed",
    JobStatus.CANCELLED: "task-cancelled",
}

# `task_events(channel, head, tail, parts)`: publishes the event JSON texts in `parts` (a table)
# as one message, head .. <the list as a JSON string> .. tail (`envelope`); nothing when empty.
TASK_EVENTS_LUA = """
local function task_events(channel, head, tail, parts)
  if #parts == 0 then return end
  redis.call('PUBLISH', channel, head .. cjson.encode('[' .. table.concat(parts, ',') .. ']') .. tail)
end
"""


def node_name(worker: str) -> str:
    """The worker's Celery node name, which its consumer runs under (workers/main.py) and its
    relay's events carry, so that Flower files a job under the worker it sees."""
    return f"{worker}@{socket.gethostname()}"


def channel(db: int) -> str:
    """Where kombu's Redis transport publishes Celery events (fanout exchange `celeryev`, with its
    default fanout prefix and patterns) for the database `db`."""
    return f"/{db}.{EXCHANGE}/{ROUTING_KEY}"


class Envelope:
    """The kombu message around one list of events: head + the list as a JSON string + tail. No
    body encoding: kombu hands the body to the JSON decoder as it is. Each message gets a delivery
    tag of its own (the node's, numbered)."""

    def __init__(self, node: str) -> None:
        rest = {
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": node},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": EXCHANGE, "routing_key": ROUTING_KEY},
                "priority": 0,
                "delivery_tag": "",
            },
        }
        tail = "," + orjson.dumps(rest).decode()[1:]
        self._before, self._after = tail.split('"delivery_tag":""')
        self._tag = '"delivery_tag":' + orjson.dumps(f"{node}.{uuid.uuid4().hex[:8]}.").decode()[:-1]
        self._count = itertools.count(1)

    def next(self) -> tuple[str, str]:
        """(head, tail) of the next message."""
        return '{"body":', f'{self._before}{self._tag}{next(self._count)}"{self._after}'


def claimed(job: Job, node: str, at: float, view: FlowerSettings) -> list[str]:
    """task-received and task-started for a job this worker claimed at `at` (unix seconds)."""
    return [
        _event("task-received", job, node, at, **_described(job, view)),
        _event("task-started", job, node, at),
    ]


def ended(job: Job, node: str, started_at: float | None) -> str:
    """The event of `job`'s terminal state (its status, error, usage and finished_at set)."""
    finished = job.timings.finished_at or 0.0
    fields: dict[str, Any] = {
        "result": repr(
            {
                "finish_reason": job.finish_reason,
                "prompt_tokens": job.usage.prompt_tokens,
                "completion_tokens": job.usage.completion_tokens,
            }
        ),
    }
    if started_at is not None:
        fields["runtime"] = max(0.0, finished - started_at)
    if job.error is not None:
        fields["exception"] = job.error
        fields["traceback"] = None
    return _event(_TERMINAL_TYPE[job.status], job, node, finished, **fields)


def cancelled_while_queued(job: Job, node: str, at: float, view: FlowerSettings) -> list[str]:
    """task-received and task-cancelled for a job cancelled before any worker claimed it, when
    this worker takes its message."""
    result = repr({"finish_reason": "abort", "prompt_tokens": 0, "completion_tokens": 0})
    return [
        _event("task-received", job, node, at, **_described(job, view)),
        _event("task-cancelled", job, node, at, result=result),
    ]


def _described(job: Job, view: FlowerSettings) -> dict[str, Any]:
    """What task-received says of the job: the prompt (cut short, or only its length when
    redacted) as args, the rest as kwargs, its queue as the routing key."""
    prompt = job.spec.prompt
    if view.redact_prompts:
        shown = f"<redacted: {len(prompt)} characters>"
    else:
        shown = prompt[: view.prompt_chars] + ("…" if len(prompt) > view.prompt_chars else "")
    queue = job.queue or keys.SHARED_QUEUE
    kwargs = {
        "modality": job.modality.value,
        "priority": job.priority.value,
        "queue": queue,
        "max_tokens": job.spec.max_tokens,
        "attempt": job.attempt,
    }
    return {
        "args": repr([shown]),
        "kwargs": repr(kwargs),
        "retries": max(0, job.attempt - 1),
        "eta": None,
        "expires": None,
        "root_id": job.id,
        "parent_id": None,
        "exchange": "",
        "routing_key": queue,
    }


def _event(kind: str, job: Job, node: str, at: float, **fields: Any) -> str:
    body = {"type": kind, "uuid": job.id, "name": TASK_NAME, "hostname": node, "timestamp": at, **fields}
    return orjson.dumps(body).decode()
