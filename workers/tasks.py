"""The Celery task: hand the jobs of one message to the runtime process, which claims them
(scheduler/record.py CLAIM, and RESUME for a job whose earlier worker died) and runs them; return
once every one has ended (or was not claimed here), or at once for the batch tier's
(RuntimeProcess.run says why).

The API puts every job it accepted in one short spell and routed to the same queue at the same
priority into one message (scheduler/queue.py): under load a message carries many jobs. Under
many API processes at a high arrival rate a message mostly carries one, and this process (one
interpreter lock for every message the worker takes) pays its per-message costs once per job: so
it does nothing here but forward the message's jobs as they came. The runtime validates them,
and claims together the jobs of every message that reached it meanwhile (one script call).
Measured with bench/consumer_cost.py (BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from scheduler import keys
from workers.runtime_proc import RuntimeProcess


def register(app: Celery, runtime: RuntimeProcess) -> None:
    @app.task(name=keys.RUN_JOBS_TASK)
    def run_jobs(jobs: list[dict[str, Any]]) -> None:
        # → None: Celery writes the repr of what a task returns on every success, results unused
        runtime.run(jobs)

    @app.task(name=keys.RUN_JOB_TASK)
    def run_job(job: dict[str, Any]) -> None:
        """A message of one job, as versions before batched messages sent."""
        runtime.run([job])
