"""Every Redis key, channel and Celery queue name LocalMoE uses, in one place."""

PREFIX = "localmoe"

SHARED_QUEUE = "localmoe.jobs"  # consumed by every worker; the fallback route
RUN_JOB_TASK = "localmoe.run_job"
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub wake-up carrying a job id; the hash flag is the truth
WORKERS = f"{PREFIX}:workers"  # sorted set: worker name → last heartbeat (unix seconds)


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    """The job's token stream (Redis stream); entry ids are the SSE event ids."""
    return f"{PREFIX}:job:{job_id}:events"


def worker(name: str) -> str:
    """The worker's latest heartbeat (JSON, expires when the worker stops beating)."""
    return f"{PREFIX}:worker:{name}"


WORKER_QUEUE_PREFIX = "localmoe.worker."  # + worker name: the queue only that worker consumes


def worker_queue(name: str) -> str:
    return f"{WORKER_QUEUE_PREFIX}{name}"


def queued(worker_name: str) -> str:
    """Hash: job id → estimated cost, for the jobs routed to this worker's queue and not yet
    claimed (the router adds, the claim removes)."""
    return f"{PREFIX}:worker:{worker_name}:queued"


def worker_of_queue(queue: str | None) -> str | None:
    """The worker whose own queue this is; None for the shared queue."""
    if queue is None or not queue.startswith(WORKER_QUEUE_PREFIX):
        return None
    return queue.removeprefix(WORKER_QUEUE_PREFIX)
