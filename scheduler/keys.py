"""Every Redis key, channel and Celery queue name LocalMoE uses, in one place (the ground floor's
own, PREFIX and the live configuration's, are in host/keys.py)."""

from host.keys import PREFIX as PREFIX  # re-exported: every key here and in scheduler/ starts with it

SHARED_QUEUE = "localmoe.jobs"  # consumed by every worker; the fallback route
RUN_JOBS_TASK = "localmoe.run_jobs"  # a message: the jobs one API process accepted for one queue at once
RUN_JOB_TASK = "localmoe.run_job"  # one job a message: what earlier versions sent (still consumed)
WEBHOOK_QUEUE = "localmoe.webhooks"  # consumed only by the webhook worker(s)
DELIVER_WEBHOOK_TASK = "localmoe.deliver_webhook"
CANCEL_CHANNEL = f"{PREFIX}:cancel"  # pub/sub wake-up carrying a job id; the hash flag is the truth
WORKERS = f"{PREFIX}:workers"  # sorted set: worker name → last heartbeat (unix seconds)


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    """The job's token stream (Redis stream); entry ids are the SSE event ids."""
    return f"{PREFIX}:job:{job_id}:events"


# Every entry written to any job's events stream is also listed in the feed, one feed entry per
# script that wrote (a relay batch: every job's tokens of the steps it carries). Each API process
# reads the feed alone, not one stream per client (scheduler/stream.py, api/stream_hub.py).
FEED = f"{PREFIX}:feed"
FEED_LAST = f"{PREFIX}:feed:last"  # the feed's newest entry id: the next entry names it as `p`


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


# Stream: per batch and worker, the hashes of the prompt blocks the API routed there
# (scheduler/prefix.py): how every API process learns what the others sent where.
PREFIX_SENT = f"{PREFIX}:prefix:sent"


def worker_of_queue(queue: str | None) -> str | None:
    """The worker whose own queue this is; None for the shared queue."""
    if queue is None or not queue.startswith(WORKER_QUEUE_PREFIX):
        return None
    return queue.removeprefix(WORKER_QUEUE_PREFIX)


# --- API keys, admission, idempotency, listings (api/auth.py, api/admission.py) ----------------
API_KEYS = f"{PREFIX}:apikeys"  # hash: key id → SHA-256 of the key


def api_key(digest: str) -> str:
    """The key's record (ApiKey JSON), under the SHA-256 of the key itself."""
    return f"{PREFIX}:apikey:{digest}"


# Jobs admitted and not yet claimed by a worker (the backlog backpressure bounds):
QUEUED_JOBS = f"{PREFIX}:queued:jobs"  # hash: job id → "<tokens> <owner>"
QUEUED_COUNT = f"{PREFIX}:queued:count"  # hash: "*" (all) and owner id → jobs waiting
QUEUED_TOKENS = f"{PREFIX}:queued:tokens"  # hash: "*" and owner id → their prompt + max_tokens


def rate(owner: str) -> str:
    """The owner's rate limiter state: the theoretical arrival time (GCRA), unix seconds."""
    return f"{PREFIX}:rate:{owner}"


def idempotency(owner: str, key_digest: str) -> str:
    """ "<job id> <body digest>" for one Idempotency-Key of one owner, kept 24 h."""
    return f"{PREFIX}:idem:{owner}:{key_digest}"


ALL_JOBS = f"{PREFIX}:jobs"  # sorted set: job id → queued_at, every job (admins list it)


def owner_jobs(owner: str) -> str:
    """Sorted set: job id → queued_at, the jobs of one API key."""
    return f"{PREFIX}:owner:{owner}:jobs"


# --- leases: who runs what (workers/reaper.py) ---------------------------------------------------
def lease(worker_name: str) -> str:
    """The worker's incarnation id while it lives: renewed with every heartbeat, expires LEASE_S
    after the last one (Redis judges the time, so clocks of other boxes do not matter)."""
    return f"{PREFIX}:worker:{worker_name}:lease"


def running(worker_name: str) -> str:
    """Hash: job id → "<incarnation> <attempt>", the jobs this worker has claimed and not finished."""
    return f"{PREFIX}:worker:{worker_name}:running"


def claim_reply(claim_id: str) -> str:
    """String, for a minute: what one CLAIM call answered (JSON), so that the same call made
    again after its reply was lost (Redis restarting) gets that answer, not a second claim."""
    return f"{PREFIX}:claim:{claim_id}"


WAITING = f"{PREFIX}:waiting"  # sorted set: job id → when to check it still has a message (reaper)
# Hash: worker name → the incarnation its lease held at the reaper's last sweep (any process's):
# one gone or changed at the next sweep ended, and with it the messages its consumer held.
INCARNATIONS = f"{PREFIX}:incarnations"

# Terminal webhook events written with the job's final state and not yet handed to the webhook
# queue: hash job id → Delivery JSON (scheduler/notify.py removes it once sent; the reaper sends
# what a dead process left behind).
WEBHOOK_OUTBOX = f"{PREFIX}:webhook:outbox"


# --- files: POST /v1/files (api/openai/file_store.py owns them) ---------------------------------
def file(file_id: str) -> str:
    """The file's record (FileRecord JSON); expires a grace period after the file does."""
    return f"{PREFIX}:file:{file_id}"


def owner_files(owner: str) -> str:
    """Sorted set: file id → when it was uploaded (unix seconds, fractional), the files of one API key."""
    return f"{PREFIX}:owner:{owner}:files"


# Sorted set: file id → expires_at, every file whose bytes may be on disk (written before the
# bytes, removed after them): the sweep's and the lazy check's list of what to delete.
FILES_EXPIRY = f"{PREFIX}:files:expiry"


# --- batches: POST /v1/batches (api/openai/batch_store.py owns them) ----------------------------
def batch(batch_id: str) -> str:
    """Hash: the batch's record, status, timings, request counts and result files."""
    return f"{PREFIX}:batch:{batch_id}"


def owner_batches(owner: str) -> str:
    """Sorted set: batch id → when it was created (unix seconds, fractional), one API key's batches."""
    return f"{PREFIX}:owner:{owner}:batches"


def owner_open_batches(owner: str) -> str:
    """Sorted set: batch id → created_at, one API key's batches that may still be open (an entry
    no longer in OPEN_BATCHES is dropped when counted): its limit on batches is checked on it."""
    return f"{PREFIX}:owner:{owner}:batches:open"


def owner_batch_lines(owner: str) -> str:
    """Hash: batch id → lines of that batch in flight (sent as jobs, not yet answered), for one
    API key's limit on lines in flight across API processes."""
    return f"{PREFIX}:owner:{owner}:batches:lines"


def batch_lines(batch_id: str) -> str:
    """Hash: custom_id → the line of the output or error file it ended as (JSON), written once per
    line; the ledger a resumed run skips by and the result files are written from."""
    return f"{PREFIX}:batch:{batch_id}:lines"


def batch_lease(batch_id: str) -> str:
    """The id of the run that holds the batch, while it holds it: set with an expiry, renewed
    while the run lives (Redis judges the time); any API process takes over a batch without one."""
    return f"{PREFIX}:batch:{batch_id}:lease"


# Sorted set: batch id → created_at, every batch not yet in a terminal status: what the API
# processes look through for batches whose run died.
OPEN_BATCHES = f"{PREFIX}:batches:open"
