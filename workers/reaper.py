"""The reaper: a job whose worker died is run again elsewhere, or failed after max_attempts.

Every worker holds a lease (keys.lease: its incarnation id, renewed with each heartbeat, gone
LEASE_S after the last one) and records each job it claims in its running hash with that
incarnation. The reaper, which every worker runs every few seconds (one at a time, under a
lock), looks for running-hash entries whose incarnation no longer holds the lease: that worker
died (SIGKILL, power, OOM) or was cut off. Each such job goes back to `queued` (scheduler/record.py
REQUEUE) and onto the shared queue at once (the broker keeps no copy of a message once taken:
scheduler/queue.py), and the next attempt continues from the text the dead one streamed
(record.RESUME). A job on its max_attempts-th run fails with the reason instead: a prompt that
kills workers stops there.

A worker that was only cut off and comes back cannot undo this: its final write is fenced on
the attempt number (record.py `finalize`), and readers drop its late tokens (Fence in
scheduler/stream.py). Jobs still waiting on a dead worker's own queue are put on the shared
queue too. A requeued job stays in the dead worker's running hash until its new message is sent,
so a reaper killed in between is finished by the next sweep. And every job still queued after
record.WAITING_CHECK_S is sent again (keys.WAITING): the Redis transport can lose a message taken
by a consumer killed before it recorded it; the claim takes a job once, so a duplicate is harmless.
Such a loss is known sooner: when a worker's incarnation ends (its lease gone, or a new one under
its name), every queued job whose message is on no queue is sent again at that sweep.
Last, the backlog's entries whose job has no record at two sweeps of the same process are
released: an API process killed between admitting a job (its backlog count) and writing it
(scheduler/queue.py: two round trips) answered nobody, and its count would hold admission's room
for ever. That check reads the whole backlog (one EXISTS per entry), so it runs once a minute, not
at every sweep: such a count is released one to two minutes after the kill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import cast

import redis
from celery import Celery

from scheduler import backlog, keys, record
from scheduler.jobs import Job, JobStatus, job_from_hash
from scheduler.queue import job_ids_in_queues
from scheduler.webhooks import Delivery, send_delivery

log = logging.getLogger(__name__)

SWEEP_S = 5.0
UNWRITTEN_EVERY_S = 60.0  # the backlog's unwritten entries: O(backlog) Redis work, so seldom
OUTBOX_GRACE_S = 30.0
LOCK = f"{keys.PREFIX}:reaper:lock"

_RUNNING = (keys.running("*"), keys.running(""))  # (the scan pattern, the key minus the name)


class Reaper:
    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        max_attempts: int,
        ttl_s: int,
        on_failed: Callable[[Job], None] | None = None,
        unwritten_every_s: float = UNWRITTEN_EVERY_S,
    ) -> None:
        """on_failed: told of a job failed here (its webhook, say); unwritten_every_s: how often a
        sweep here also looks for backlog entries that were never written."""
        self.client = client
        self.app = app
        self.max_attempts = max_attempts
        self.ttl_s = ttl_s
        self.on_failed = on_failed
        self._requeue = client.register_script(record.REQUEUE)
        self._forget = client.register_script(record.FORGET)
        self._release = client.register_script(backlog.RELEASE)
        self._last = 0.0
        self._unwritten: set[str] = set()  # backlog entries with no job record at the last look
        self._unwritten_every_s = unwritten_every_s
        self._unwritten_at = -float("inf")  # monotonic time of the last look

    def maybe_sweep(self) -> None:
        """Sweep if SWEEP_S has passed here and no other process swept meanwhile."""
        now = time.monotonic()
        if now - self._last < SWEEP_S:
            return
        self._last = now
        if self.client.set(LOCK, "1", nx=True, px=int(SWEEP_S * 1000) - 200):
            self.sweep()

    def sweep(self) -> dict[str, int]:
        """One pass over every worker's running jobs and dead workers' queues. → outcome counts."""
        counts: dict[str, int] = {}
        pattern, bare = _RUNNING
        head, tail = bare.split(":running")[0], ":running"
        for key in self.client.scan_iter(pattern, count=500):
            worker = key[len(head) : -len(tail)]
            entries = cast(dict[str, str], self.client.hgetall(key))
            lease = self.client.get(keys.lease(worker))
            for job_id, entry in entries.items():
                if entry.split(" ")[0] == lease:
                    continue
                outcome = self._reap(worker, job_id, entry)
                counts[outcome] = counts.get(outcome, 0) + 1
        for worker in self._dead_with_a_queue():
            counts["moved"] = counts.get("moved", 0) + self._move_queued(worker)
        if workers := self._incarnations_ended():
            lost = self._resend_lost(workers)
            if lost:
                counts["lost"] = lost
        resent = self._resend_waiting()
        if resent:
            counts["resent"] = resent
        hooks = self._flush_outbox()
        if hooks:
            counts["webhooks"] = hooks
        released = 0
        if (now := time.monotonic()) - self._unwritten_at >= self._unwritten_every_s:
            self._unwritten_at = now
            released = self._release_unwritten()
        if released:
            counts["unwritten"] = released
        if counts:
            log.warning("reaper: %s", counts)
        return counts

    def _release_unwritten(self) -> int:
        """The backlog's entries with no job record now and at this process's last look (a minute
        or more ago; an admission being made writes its job one round trip later) are released.
        → how many."""
        ids = [cast(str, field) for field, _ in self.client.hscan_iter(keys.QUEUED_JOBS, count=500)]
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(keys.job(job_id))
        unwritten = {job_id for job_id, found in zip(ids, pipe.execute(), strict=True) if not found}
        stale, self._unwritten = unwritten & self._unwritten, unwritten - self._unwritten
        released = 0
        for job_id in stale:
            released += int(cast(int, self._release(keys=backlog.RELEASE_KEYS, args=[job_id])))
            log.warning(
                "job %s: admitted by a process that never wrote it; its backlog count released", job_id
            )
        return released

    def _reap(self, worker: str, job_id: str, entry: str) -> str:
        error = f"its worker died under it on {self.max_attempts} attempts (last: {worker})"
        outcome = record.requeue(self._requeue, job_id, worker, entry, self.max_attempts, self.ttl_s, error)
        if outcome == "requeued":
            job = self._job(job_id)
            if job is not None:
                self._send(job)
            record.forget(self._forget, worker, job_id, entry)  # sent: the entry is done
            log.warning("job %s: worker %s died running it; queued again", job_id, worker)
        elif outcome == "failed":
            log.error("job %s failed: %s", job_id, error)
            job = self._job(job_id)
            if job is not None and self.on_failed is not None:
                self.on_failed(job)
        return outcome

    def _dead_with_a_queue(self) -> list[str]:
        """Workers with jobs routed to their own queue and no lease: they will not take them."""
        head = keys.queued("")
        out = []
        for key in self.client.scan_iter(keys.queued("*"), count=500):
            worker = key[len(head.removesuffix(":queued")) : -len(":queued")]
            if not self.client.exists(keys.lease(worker)):
                out.append(worker)
        return out

    def _move_queued(self, worker: str) -> int:
        moved = 0
        for job_id in cast(list[str], self.client.hkeys(keys.queued(worker))):
            self.client.hdel(keys.queued(worker), job_id)
            job = self._job(job_id)
            if job is not None and job.status is JobStatus.QUEUED:
                self._send(job)  # its old message stays behind: a later claim of it is a no-op
                moved += 1
        return moved

    def _incarnations_ended(self) -> list[str]:
        """If a worker incarnation that held its lease at the last sweep (this process's or
        another's: keys.INCARNATIONS) is gone (its lease expired, or holds a new incarnation: the
        worker restarted under its name), every worker's name; else []. Records the incarnations
        that live now."""
        seen = cast(dict[str, str], self.client.hgetall(keys.INCARNATIONS))
        # every worker that ever beat (a heartbeat writes its lease and its WORKERS entry together)
        names = sorted(set(cast(list[str], self.client.zrange(keys.WORKERS, 0, -1))) | set(seen))
        values = cast(list[str | None], self.client.mget([keys.lease(n) for n in names])) if names else []
        live = {name: value for name, value in zip(names, values, strict=True) if value}
        pipe = self.client.pipeline()
        pipe.delete(keys.INCARNATIONS)
        if live:
            pipe.hset(keys.INCARNATIONS, mapping=live)  # type: ignore[arg-type]
        pipe.execute()
        return names if any(live.get(name) != inc for name, inc in seen.items()) else []

    def _resend_lost(self, workers: list[str]) -> int:
        """After an incarnation ended: every queued job whose message is on no queue is sent again
        now, not after record.WAITING_CHECK_S. Such a message was taken by that incarnation's
        consumer and died with it unclaimed (the broker keeps no copy: scheduler/queue.py). A job
        whose message a live consumer has just taken is sent twice: harmless, the claim takes a
        job once. → how many."""
        present = job_ids_in_queues(self.client, workers)
        resent = 0
        for job_id in cast(list[str], self.client.zrange(keys.WAITING, 0, -1)):
            if job_id in present:
                continue
            job = self._job(job_id)
            if job is not None and job.status is JobStatus.QUEUED:
                self._send(job)
                resent += 1
        return resent

    def _resend_waiting(self) -> int:
        """Jobs queued for a while are sent again: a message can be lost (a consumer killed
        between taking it off the queue and recording it as unacknowledged), and a duplicate is
        harmless (the claim takes a job once). Checks back off: 2 min, then the time waited."""
        now = time.time()
        due = cast(list[str], self.client.zrangebyscore(keys.WAITING, "-inf", now, start=0, num=500))
        resent = 0
        for job_id in due:
            job = self._job(job_id)
            if job is None or job.status is not JobStatus.QUEUED:
                self.client.zrem(keys.WAITING, job_id)
                continue
            waited = now - (job.timings.queued_at or now)
            self.client.zadd(keys.WAITING, {job_id: now + max(record.WAITING_CHECK_S, waited)})
            self._send(job)
            resent += 1
        return resent

    def _flush_outbox(self) -> int:
        """Terminal webhook events a process wrote with the job's final state and died before
        handing to the webhook queue (OUTBOX_GRACE_S: the live sender's time to do it)."""
        sent = 0
        for job_id, raw in cast(dict[str, str], self.client.hgetall(keys.WEBHOOK_OUTBOX)).items():
            delivery = Delivery.model_validate_json(raw)
            if time.time() - delivery.created_at < OUTBOX_GRACE_S:
                continue
            send_delivery(self.app, delivery)  # the same webhook id as the lost one
            self.client.hdel(keys.WEBHOOK_OUTBOX, job_id)
            sent += 1
        return sent

    def _job(self, job_id: str) -> Job | None:
        fields = cast(dict[str, str], self.client.hgetall(keys.job(job_id)))
        return job_from_hash(fields) if fields else None

    def _send(self, job: Job) -> None:
        job = job.model_copy(update={"queue": keys.SHARED_QUEUE})
        self.client.zadd(keys.WAITING, {job.id: time.time() + record.WAITING_CHECK_S}, nx=True)
        self.app.send_task(
            keys.RUN_JOBS_TASK,
            args=[[job.model_dump(mode="json")]],
            queue=keys.SHARED_QUEUE,
            priority=job.priority.rank,
            argsrepr=f"[{job.id}]",
        )
