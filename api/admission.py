"""Admission: a job enters the backlog, or the caller is told (429) when to come back.

One Lua script per decision (scheduler/backlog.py ADMIT) checks the key's rate (GCRA) and the
backlog limits, global and per key, and counts the job in; nothing is enqueued when refused. The
decision runs in the Enqueuer's batch (scheduler/queue.py): the jobs of a burst are admitted in one
pipelined round trip from its thread, not one asyncio Redis call per request (a tenth of the API's
CPU per accepted job on 2 cores, `bench.service_vs_vllm --intake-api-only`).

Retry-After: the rate limiter's exact wait, or for a full backlog how long the workers take to
drain the excess at their measured speed (1 s to 10 min).
A job of the batch tier is admitted only into spare capacity (Verdict.NO_SPARE otherwise,
Retry-After 1 s): the jobs waiting and those the workers claimed must leave one of its slots free
(the workers' slots less the reserve, plus a look-ahead of jobs that wait in the engines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import HTTPException

from api.auth import ApiKey
from host.settings import LimitSettings
from scheduler import backlog, keys
from scheduler.backlog import Limits, Verdict
from scheduler.queue import Admit

_WHY = {
    Verdict.TOO_MANY_JOBS: "the server has {value} jobs waiting (limit {limit})",
    Verdict.TOO_MANY_TOKENS: "the server has {value} tokens waiting (limit {limit})",
    Verdict.KEY_TOO_MANY_JOBS: "this key has {value} jobs waiting (limit {limit})",
    Verdict.KEY_TOO_MANY_TOKENS: "this key has {value} tokens waiting (limit {limit})",
}


def limits_for(caller: ApiKey, cfg: LimitSettings) -> Limits:
    own = caller.limits
    return Limits(
        max_jobs=cfg.max_queued_jobs,
        max_tokens=cfg.max_queued_tokens,
        key_max_jobs=own.max_queued_jobs or cfg.per_key_max_queued_jobs,
        key_max_tokens=own.max_queued_tokens or cfg.per_key_max_queued_tokens,
        rate_per_s=own.rate_per_s or cfg.per_key_rate_per_s,
        burst=own.burst or cfg.per_key_burst,
    )


@dataclass(frozen=True)
class Spare:
    """The capacity a job of the batch tier may fill: the fresh workers (their running hashes are
    counted), their batch slots less the reserve (scheduler.batch_reserve), and the look-ahead:
    jobs beyond those slots that wait in the engines behind every other job
    (scheduler.batch_lookahead), so that a row a batch job frees is taken at the engine's next step.
    The jobs of every tier count against slots + lookahead: interactive work leaves the batch less."""

    workers: list[str]
    slots: int
    lookahead: int = 0

    @property
    def limit(self) -> int:
        return self.slots + self.lookahead if self.slots else 0


class Refused(HTTPException):
    """A 429 from admission; `verdict` says which limit."""

    def __init__(self, verdict: Verdict, detail: str, retry_after: int) -> None:
        super().__init__(429, detail, headers={"Retry-After": str(retry_after)})
        self.verdict = verdict


class Admission:
    def __init__(self, client: aioredis.Redis, cfg: LimitSettings) -> None:
        self.cfg = cfg
        self._release = client.register_script(backlog.RELEASE)

    def gate(
        self, job_id: str, tokens: int, caller: ApiKey, drain_tokens_per_s: float, spare: Spare | None = None
    ) -> Admit:
        """The admission of one job, for the Enqueuer to decide in its batch. `tokens`: prompt +
        max_tokens; `drain_tokens_per_s`: the workers' measured speed, for the Retry-After of a
        full backlog; `spare`: for a job of the batch tier, the capacity it may take. Its refusal
        is a Refused (429 with Retry-After)."""
        limits = limits_for(caller, self.cfg)
        names = [*backlog.RELEASE_KEYS, keys.rate(caller.id)]
        if spare is not None:
            names += [keys.running(w) for w in spare.workers]

        def refusal(reply: list[int]) -> Refused | None:
            return _refusal(reply, limits, tokens, drain_tokens_per_s, spare)

        slots = spare.limit if spare is not None else -1
        return Admit(keys=names, args=[job_id, tokens, caller.id, *limits.argv(), slots], refusal=refusal)

    async def release(self, job_id: str) -> None:
        """The job will not be enqueued after all (an enqueue failure)."""
        await self._release(keys=backlog.RELEASE_KEYS, args=[job_id])


def _refusal(
    reply: list[int], limits: Limits, tokens: int, drain_tokens_per_s: float, spare: Spare | None
) -> Refused | None:
    """What ADMIT's reply means: None (admitted) or the 429 that says which limit and when to retry."""
    verdict = Verdict(int(reply[0]))
    if verdict is Verdict.ADMITTED:
        return None
    if verdict is Verdict.NO_SPARE:
        assert spare is not None
        detail = (
            f"no spare capacity for the batch tier: the workers' jobs fill its {spare.limit} slots "
            f"({spare.slots} spare + {spare.lookahead} waiting in the engines; {reply[1]} claimed or "
            "waiting; scheduler.batch_reserve is kept for other jobs)"
        )
        return Refused(verdict, f"{detail}; retry in 1 s", 1)
    if verdict is Verdict.RATE_LIMITED:
        wait = int(reply[1]) / 1000
        detail = f"rate limit: {limits.rate_per_s:g} submissions per second (burst {limits.burst})"
    else:
        value = int(reply[1])
        limit = {
            Verdict.TOO_MANY_JOBS: limits.max_jobs,
            Verdict.TOO_MANY_TOKENS: limits.max_tokens,
            Verdict.KEY_TOO_MANY_JOBS: limits.key_max_jobs,
            Verdict.KEY_TOO_MANY_TOKENS: limits.key_max_tokens,
        }[verdict]
        detail = "backlog full: " + _WHY[verdict].format(value=value, limit=limit)
        excess = value + (1 if verdict in (Verdict.TOO_MANY_JOBS, Verdict.KEY_TOO_MANY_JOBS) else tokens)
        excess -= limit
        per_unit = tokens if verdict in (Verdict.TOO_MANY_JOBS, Verdict.KEY_TOO_MANY_JOBS) else 1
        wait = excess * per_unit / max(drain_tokens_per_s, 1.0)
    retry_after = min(max(math.ceil(wait), 1), 600)
    return Refused(verdict, f"{detail}; retry in {retry_after} s", retry_after)
