"""A batch outlives the API process running it: leases, the per-line ledger, taking over.

The store's scripts against a real Redis; then a real service of the module's own (Redis, a
worker, API processes with a 1 s lease): the API running a batch is stopped part way (SIGTERM:
it gives its lease back), another takes the batch over and is killed part way (SIGKILL: its
lease lapses), a third takes it over; every custom_id ends exactly once in the result files,
with one job per line (a line whose job was in flight is answered by that job, found again,
not sent twice)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis

from api import jobs
from api.admission import Admission, Refused, Spare
from api.auth import ApiKey, Scope, create_key
from api.deps import Services
from api.jobs import forget_idempotency, idempotent_job_id
from api.openai import batch_runner
from api.openai.batch_input import BatchRequestLine
from api.openai.batch_store import BatchRecord, BatchStore, new_batch_id
from api.openai.protocol import BatchStatus
from host.settings import LimitSettings, SchedulerSettings
from localmoe.redis_server import RedisServer
from scheduler import backlog, keys, record
from scheduler.backlog import Verdict
from scheduler.jobs import Job, JobSpec, Priority, job_to_hash
from scheduler.queue import make_celery
from tests.conftest import TERMINAL, Stack, _stop, bearer, private_stack, scratch_db, start_api, wait_for
from tests.test_batches import CHAT, body, lines_of, upload, wait

S = BatchStatus
LEASE_S = "1"
SLOTS = 16  # the stack's worker's; the batch tier: 14 spare (scheduler.batch_reserve 0.125) + LOOKAHEAD
LOOKAHEAD = math.ceil(SLOTS * SchedulerSettings().batch_lookahead)  # batch jobs waiting beyond them


def test_the_ledger_takes_each_line_once_and_nothing_after_the_end(redis_server: RedisServer) -> None:
    async def scenario(url: str) -> None:
        client = aioredis.from_url(url, decode_responses=True)
        store = BatchStore(client)
        now = int(time.time())
        batch = BatchRecord(
            id=new_batch_id(),
            owner="k",
            endpoint=CHAT,
            input_file_id="file-x",
            created_at=now,
            expires_at=now + 60,
        )
        assert await store.create(batch, 600, "run-a", lease_s=5, max_open=1) is None
        assert not await store.take(batch.id, "run-b", 5)  # made held
        assert await store.unheld() == []
        assert not await store.write_line(batch.id, "a", b"{}", ok=True)  # validating: no lines yet
        assert await store.move(batch.id, S.IN_PROGRESS)
        assert await store.write_line(batch.id, "a", b'{"first": 1}', ok=True)
        assert not await store.write_line(batch.id, "a", b'{"second": 1}', ok=False)  # a second run's
        assert await store.write_line(batch.id, "b", b"{}", ok=False)
        assert await store.lines(batch.id, ["a", "b", "c"]) == ['{"first": 1}', "{}", None]
        assert await store.written(batch.id) == {"a", "b"}
        got = await store.get("k", batch.id)
        assert got is not None and (got.request_counts.completed, got.request_counts.failed) == (1, 1)

        assert not await store.renew(batch.id, "run-b", 5)  # not b's
        assert await store.renew(batch.id, "run-a", 5)
        await store.release(batch.id, "run-b")  # not b's: nothing happens
        assert await store.unheld() == []
        await store.release(batch.id, "run-a")
        assert await store.unheld() == [batch.id]
        assert await store.take(batch.id, "run-b", 5) and not await store.take(batch.id, "run-c", 5)

        assert await store.move(batch.id, S.FINALIZING) and await store.move(batch.id, S.COMPLETED)
        assert await store.open_ids() == set() and await store.written(batch.id) == set()  # ledger gone
        assert not await store.write_line(batch.id, "c", b"{}", ok=True)  # a run that lost its lease
        assert not await client.exists(keys.batch_lines(batch.id))
        await client.aclose()

    with scratch_db(redis_server, 2):
        asyncio.run(scenario(_url(redis_server, 2)))


def test_a_keys_batches_and_lines_in_flight_are_counted_across_its_batches(redis_server: RedisServer) -> None:
    async def scenario(url: str) -> None:
        client = aioredis.from_url(url, decode_responses=True)
        store = BatchStore(client)
        now = int(time.time())

        def batch() -> BatchRecord:
            return BatchRecord(
                id=new_batch_id(),
                owner="k",
                endpoint=CHAT,
                input_file_id="f",
                created_at=now,
                expires_at=now + 60,
            )

        a, b, c = batch(), batch(), batch()
        assert await store.create(a, 600, "r", 5, max_open=2) is None
        assert await store.create(b, 600, "r", 5, max_open=2) is None
        assert await store.create(c, 600, "r", 5, max_open=2) == 2  # refused: two not ended
        assert await store.record(c.id) is None and await store.open_ids() == {a.id, b.id}

        assert await store.take_line("k", a.id, 3) and await store.take_line("k", b.id, 3)
        assert await store.take_line("k", a.id, 3) and not await store.take_line("k", b.id, 3)
        await store.line_done("k", b.id)
        assert await store.take_line("k", b.id, 3) and not await store.take_line("k", a.id, 3)
        await store.clear_lines("k", a.id)  # a run taking `a` over: its dead run's lines count no more
        assert await store.take_line("k", a.id, 3) and await store.take_line("k", a.id, 3)
        assert not await store.take_line("k", a.id, 3)

        assert await store.move(a.id, S.FAILED)  # ended: its lines and its place are free
        assert await store.take_line("k", b.id, 3) and await store.take_line("k", b.id, 3)
        assert await store.create(c, 600, "r", 5, max_open=2) is None
        await client.aclose()

    with scratch_db(redis_server, 2):
        asyncio.run(scenario(_url(redis_server, 2)))


def test_a_lines_key_is_freed_only_by_its_own_claim_or_once_abandoned(redis_server: RedisServer) -> None:
    """Two runs of a batch may overlap for a moment (one stalled past its lease while another took
    the batch over). A line's Idempotency-Key that names no job yet may be the other run's
    acceptance under way: a run leaves it until it is ABANDONED_S old, and a refusal frees the
    key only while it is still its own claim. (Freeing either at once had a line submitted twice.)"""

    async def scenario(url: str) -> None:
        client = aioredis.from_url(url, decode_responses=True)
        limits = LimitSettings()
        services = cast(
            Services,
            SimpleNamespace(store=SimpleNamespace(client=client), settings=SimpleNamespace(limits=limits)),
        )
        caller = ApiKey(id="k", name="k", created_at=0)
        batch = BatchRecord(
            id=new_batch_id(), owner="k", endpoint=CHAT, input_file_id="f", created_at=0, expires_at=60
        )
        line = BatchRequestLine.model_validate({"custom_id": "c", "method": "POST", "url": CHAT, "body": {}})
        key = batch_runner.line_key(batch.id, "c")
        spec = JobSpec(prompt="def f(x):")
        assert await jobs._claim_idempotency(services, caller, key, spec, "job-a") is None  # run A's
        assert not await forget_idempotency(services, caller, key, "job-b")  # run B's refusal: not B's
        assert await idempotent_job_id(services, caller, key) == "job-a"

        await batch_runner._unclaim(services, caller, batch, line, key, "no job yet")  # run B meets it
        assert await idempotent_job_id(services, caller, key) == "job-a"  # A may be making its job
        name = keys.idempotency(caller.id, hashlib.sha256(key.encode()).hexdigest())
        await client.expire(name, limits.idempotency_ttl_s - batch_runner.ABANDONED_S - 1)  # taken long ago
        await batch_runner._unclaim(services, caller, batch, line, key, "no job yet")
        assert await idempotent_job_id(services, caller, key) is None  # A died taking it: sent again

        assert await jobs._claim_idempotency(services, caller, key, spec, "job-b") is None
        assert await forget_idempotency(services, caller, key, "job-b")  # B's own, refused
        assert await idempotent_job_id(services, caller, key) is None

        # A's claim forgotten between B's SET NX and its GET: B takes the key (before, B read no
        # claim as another body: a 409 and the line set aside)
        assert await jobs._claim_idempotency(services, caller, key, spec, "job-a") is None
        between = cast(
            Services,
            SimpleNamespace(
                store=SimpleNamespace(client=_ForgetsBetween(client)), settings=services.settings
            ),
        )
        assert await jobs._claim_idempotency(between, caller, key, spec, "job-b") is None
        assert await idempotent_job_id(services, caller, key) == "job-b"
        await client.aclose()

    with scratch_db(redis_server, 2):
        asyncio.run(scenario(_url(redis_server, 2)))


class _ForgetsBetween:
    """A fault injector at the Redis seam: the first GET finds the key deleted just before it (as
    another run's forget landing between a claim's SET NX and its GET)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client, self.armed = client, True

    async def set(self, *args: object, **kwargs: object) -> object:
        return await self.client.set(*args, **kwargs)  # type: ignore[arg-type]

    async def get(self, name: str) -> object:
        if self.armed:
            self.armed = False
            await self.client.delete(name)
        return await self.client.get(name)


def _url(redis_server: RedisServer, db: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def stack(service_env: dict[str, str]) -> Iterator[Stack]:
    """A service of its own: no other API process takes its batches over; its worker small
    (SLOTS) and slowed (a step every 0.02 s or more), so that a batch of 120 short lines lasts long
    enough to be stopped twice."""
    settings = {
        "LOCALMOE_BATCHES__LEASE_S": LEASE_S,
        "LOCALMOE_ENGINE__MAX_BATCH_SIZE": str(SLOTS),
        "LOCALMOE_ENGINE__STEP_DELAY_S": "0.02",
    }
    with private_stack(service_env, worker=True, **settings) as s:
        yield s


@pytest.fixture
def others(stack: Stack) -> Iterator[Callable[[], tuple[subprocess.Popen[bytes], str]]]:
    """Starts more API processes on the stack; they are stopped at the test's end."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], str]:
        proc, url = start_api(stack.env, stack.admin_key)
        started.append(proc)
        return proc, url

    yield start
    for proc in started:
        if proc.poll() is None:
            _stop(proc)


def holder(stack: Stack, batch_id: str) -> int | None:
    """The pid of the process whose run holds the batch (keys.batch_lease: host:pid:random)."""
    run_id = stack.client.get(keys.batch_lease(batch_id))
    return int(str(run_id).split(":")[1]) if run_id else None


def done_part_way(client: openai.OpenAI, batch_id: str, at_least: int) -> int:
    """Waits until `at_least` lines are done; → how many are (fewer than all: still part way)."""
    seen = [0, 0]

    def enough() -> bool:
        counts = client.batches.retrieve(batch_id).request_counts
        assert counts is not None
        seen[:] = [counts.completed + counts.failed, counts.total]
        return seen[0] >= at_least

    wait_for(enough, 60, f"{at_least} lines of the batch")
    assert seen[0] < seen[1], "the batch ended before its run was stopped: make it longer"
    return seen[0]


def chat_lines(prefix: str, n: int, max_tokens: Callable[[int], int]) -> list[dict[str, object]]:
    """n chat lines, custom_id prefix + i, line i asking max_tokens(i) tokens (EOS ignored)."""
    return [
        {
            "custom_id": f"{prefix}{i}",
            "method": "POST",
            "url": CHAT,
            "body": body(i, max_tokens=max_tokens(i), ignore_eos=True),
        }
        for i in range(n)
    ]


def client_of(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_batch_goes_on_in_another_api_process_each_line_once(
    stack: Stack, others: Callable[[], tuple[subprocess.Popen[bytes], str]]
) -> None:
    key = create_key(stack.client, "batch runs", Scope.USER).secret  # its jobs are the batch's alone
    # long enough to be stopped twice part way with the look-ahead's 30 lines in flight
    lines = chat_lines("d", 120, lambda i: 12 + i % 16)
    second, second_url = others()
    with client_of(stack.api, key) as c:
        made = c.batches.create(input_file_id=upload(c, lines), endpoint=CHAT, completion_window="24h")
        assert holder(stack, made.id) == stack.api_proc.pid
        done = done_part_way(c, made.id, 30)
    stack.api_proc.send_signal(signal.SIGTERM)  # gives its lease back: taken over at the next look
    # as the third below: quick on an idle box, once in the full suite on 2 cores not within 10 s
    wait_for(lambda: holder(stack, made.id) == second.pid, 30, "the second API to take the batch over")

    third, third_url = others()
    with client_of(second_url, key) as c:
        done_part_way(c, made.id, done + 30)
    second.kill()  # its lease lapses a second later; its lines' jobs run on
    # within a second and a half on an idle box; once in the full suite on 2 cores, not within 10 s.
    # With every line left already in flight (the look-ahead), the third may take the batch over and
    # end it between two looks: ended, with no other API process alive, it was the third's
    with client_of(third_url, key) as c:

        def taken_over() -> bool:
            return holder(stack, made.id) == third.pid or c.batches.retrieve(made.id).status == "completed"

        wait_for(taken_over, 30, "the third API to take the batch over")

    with client_of(third_url, key) as c:
        finished = wait(c, made.id, timeout=120)
        assert finished.status == "completed"
        counts = finished.request_counts
        assert counts is not None and (counts.total, counts.completed, counts.failed) == (120, 120, 0)
        assert finished.error_file_id is None
        output = lines_of(c, finished.output_file_id)
    assert [x["custom_id"] for x in output] == [x["custom_id"] for x in lines]  # each once, in order
    tokens = [x["response"]["body"]["usage"]["completion_tokens"] for x in output]
    assert tokens == [x["body"]["max_tokens"] for x in lines]  # type: ignore[index]
    with httpx.Client(base_url=third_url, headers=bearer(key), timeout=30) as http:
        jobs = http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]
    assert len(jobs) == 120  # one job a line: none sent again after either stop
    assert all(j["priority"] == "batch" for j in jobs)
    assert {j["id"] for j in jobs} == {x["response"]["request_id"] for x in output}


def test_the_batch_tier_takes_only_spare_capacity(redis_server: RedisServer) -> None:
    async def scenario(url: str) -> None:
        client = aioredis.from_url(url, decode_responses=True)
        admission = Admission(client, LimitSettings())
        script = client.register_script(backlog.ADMIT)  # as the Enqueuer runs a gate
        caller = ApiKey(id="k", name="k", created_at=0)

        async def admit(job_id: str, spare: Spare | None = None) -> None:
            gate = admission.gate(job_id, 10, caller, 0, spare)
            if (refused := gate.refusal(await script(keys=gate.keys, args=gate.args))) is not None:
                raise refused

        spare = Spare(["w1", "w2"], slots=4)
        await client.hset(keys.running("w1"), mapping={"a": "1 1", "b": "1 1"})  # claimed: running or waiting
        await client.hset(keys.running("w2"), mapping={"c": "1 1"})
        await admit("j1", spare)  # 3 busy: one slot spare
        with pytest.raises(Refused) as refused:
            await admit("j2", spare)  # j1 waits for a worker: none spare
        assert refused.value.verdict is Verdict.NO_SPARE and refused.value.headers == {"Retry-After": "1"}
        assert "4 slots" in refused.value.detail
        await admit("j3")  # any other job: admitted past the slots
        await client.hdel(keys.running("w1"), "a")
        with pytest.raises(Refused):
            await admit("j4", spare)  # 2 claimed, 2 waiting
        await admission.release("j3")
        await admit("j4", spare)
        ahead = Spare(["w1", "w2"], slots=4, lookahead=2)  # 2 more, to wait in the engines
        await admit("j5", ahead)
        await admit("j6", ahead)
        with pytest.raises(Refused) as refused:
            await admit("j7", ahead)
        assert "6 slots (4 spare + 2 waiting in the engines; 6 claimed or waiting" in refused.value.detail
        with pytest.raises(Refused):
            await admit("j8", Spare([], slots=0, lookahead=2))  # no worker: no capacity
        await client.aclose()

    with scratch_db(redis_server, 2):
        asyncio.run(scenario(_url(redis_server, 2)))


def test_an_interactive_burst_is_claimed_at_once_while_batch_tier_jobs_hold_their_slots(
    stack: Stack, others: Callable[[], tuple[subprocess.Popen[bytes], str]]
) -> None:
    """The batch tier's 14 spare slots full of long jobs, then 4 interactive ones: more than the 2
    reserved slots. Each is claimed at once (a task thread free for it: workers/main.py
    TASK_THREADS_PER_SLOT), not after a running job ends, and the engine runs it first (two batch
    rows preempted): the burst ends while the batch-tier jobs still run."""
    key = create_key(stack.client, "burst", Scope.USER).secret
    _, api = others()

    def busy() -> int:  # what admission counts against the batch tier: waiting and claimed jobs
        waiting = int(stack.client.hget(keys.QUEUED_COUNT, "*") or 0)
        return waiting + sum(stack.client.hlen(k) for k in stack.client.scan_iter(keys.running("*")))

    # the module's earlier tests may leave jobs running, and the API processes they kill a backlog
    # count with no job (admitted, never written: the reaper releases it at its second sweep)
    wait_for(lambda: busy() == 0, 240, "the jobs of the tests before to end")
    with httpx.Client(base_url=api, headers=bearer(key), timeout=30) as http:

        def submit(prompt: str, max_tokens: int, priority: str) -> str:
            spec = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
            made = http.post("/v1/jobs", json=spec)
            assert made.status_code == 202, made.text
            return str(made.json()["id"])

        def jobs(ids: list[str]) -> list[dict[str, Any]]:
            return [http.get(f"/v1/jobs/{i}").json() for i in ids]

        batch = [submit(f"def line{i}():", 200, "batch") for i in range(SLOTS - 2)]
        wait_for(lambda: all(j["status"] == "running" for j in jobs(batch)), 20, "the spare slots full")
        burst = [submit(f"class Burst{i}:", 60, "normal") for i in range(4)]
        wait_for(lambda: all(j["status"] == "succeeded" for j in jobs(burst)), 60, "the burst")
        interactive = jobs(burst)
        assert all(j["status"] == "running" for j in jobs(batch))  # the burst went first
        for i in batch:
            http.delete(f"/v1/jobs/{i}")
        wait_for(lambda: all(j["status"] == "cancelled" for j in jobs(batch)), 30, "the batch cancelled")
    claimed = [j["timings"]["started_at"] - j["timings"]["queued_at"] for j in interactive]
    # A burst job that waited for a thread would start only when the first of the others ended:
    # 60 steps of at least 0.02 s
    assert max(claimed) < 0.6, claimed
    assert all(j["usage"]["completion_tokens"] == 60 for j in interactive)


def test_batch_tier_messages_hold_no_task_thread(
    stack: Stack, others: Callable[[], tuple[subprocess.Popen[bytes], str]]
) -> None:
    """A worker died and its batch-tier jobs came back one message each on the shared queue (as
    the reaper sends them): more than the worker's task threads (2 per slot). Every one is claimed
    (the batch tier's messages return at once: workers/runtime_proc.py), and interactive jobs sent
    next are claimed at once too, not when a task thread's line ends."""
    client = stack.client

    def busy() -> int:
        waiting = int(client.hget(keys.QUEUED_COUNT, "*") or 0)
        return waiting + sum(client.hlen(k) for k in client.scan_iter(keys.running("*")))

    def status(job_id: str) -> str:
        return str(json.loads(client.hget(keys.job(job_id), "status") or '""'))

    wait_for(lambda: busy() == 0, 240, "the jobs of the tests before to end")
    _, api = others()  # the stack's own may have been stopped by another test
    lines = [
        Job(
            spec=JobSpec(prompt=f"def line{i}():", max_tokens=150, ignore_eos=True),
            queue=keys.SHARED_QUEUE,
            priority=Priority.BATCH,
        )
        for i in range(2 * SLOTS + 8)
    ]
    app = make_celery(stack.env["LOCALMOE_REDIS_URL"])
    with httpx.Client(base_url=api, headers=bearer(stack.admin_key), timeout=30) as http:
        try:
            for job in lines:
                client.hset(keys.job(job.id), mapping=job_to_hash(job))  # type: ignore[arg-type]
                app.send_task(keys.RUN_JOBS_TASK, args=[[job.model_dump(mode="json")]],
                              queue=keys.SHARED_QUEUE, priority=Priority.BATCH.rank)  # fmt: skip
            # as many lines claimed as the worker has task threads: holding them, the lines would
            # leave the burst (and 8 lines) in Redis until a line ends (150 steps of at least 0.02 s)
            wait_for(
                lambda: sum(status(j.id) == "running" for j in lines) >= 2 * SLOTS, 20, "the lines claimed"
            )
            burst = [
                http.post(
                    "/v1/jobs", json={"prompt": f"class Burst{i}:", "max_tokens": 20, "ignore_eos": True}
                )
                for i in range(4)
            ]
            assert all(r.status_code == 202 for r in burst), [r.text for r in burst]
            ids = [str(r.json()["id"]) for r in burst]
            wait_for(lambda: all(status(i) == "succeeded" for i in ids), 60, "the interactive jobs")
            interactive = [http.get(f"/v1/jobs/{i}").json() for i in ids]
            started = [http.get(f"/v1/jobs/{j.id}").json()["timings"]["started_at"] for j in lines]
        finally:
            app.close()
            for job in lines:  # the tests after this one find the worker empty
                http.delete(f"/v1/jobs/{job.id}")
            wait_for(lambda: all(status(j.id) in TERMINAL for j in lines), 30, "the lines cancelled")
    claimed = [j["timings"]["started_at"] - j["timings"]["queued_at"] for j in interactive]
    assert max(claimed) < 0.6, claimed
    assert None not in started and max(started) < min(j["timings"]["started_at"] for j in interactive)


def test_a_batch_waits_for_interactive_jobs_then_fills_the_spare_slots(
    stack: Stack, others: Callable[[], tuple[subprocess.Popen[bytes], str]]
) -> None:
    user = create_key(stack.client, "interactive", Scope.USER).secret
    key = create_key(stack.client, "batch tier", Scope.USER).secret
    _, api = others()  # the stack's own may have been stopped by another test
    with httpx.Client(base_url=api, headers=bearer(user), timeout=30) as http:
        ids = [
            http.post(
                "/v1/jobs", json={"prompt": f"def g{i}():", "max_tokens": 120, "ignore_eos": True}
            ).json()["id"]
            for i in range(SLOTS)
        ]
        wait_for(
            lambda: all(http.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids),
            20,
            "a full worker",
        )
        lines = chat_lines("t", 16, lambda _: 16)
        with client_of(api, key) as c:
            made = c.batches.create(input_file_id=upload(c, lines), endpoint=CHAT, completion_window="24h")
            assert wait(c, made.id).request_counts.completed == 16  # type: ignore[union-attr]
        interactive = [http.get(f"/v1/jobs/{i}").json() for i in ids]
    with httpx.Client(base_url=api, headers=bearer(key), timeout=30) as http:
        batch = http.get("/v1/jobs", params={"limit": 50}).json()["jobs"]
    assert len(batch) == 16 and {j["priority"] for j in batch} == {"batch"}
    first_free = min(j["timings"]["finished_at"] for j in interactive)
    # While the worker was full, only the look-ahead was admitted: the 14 spare slots and the
    # look-ahead's more (scheduler.batch_lookahead of 16) less the 16 interactive jobs; they waited
    # in the engine
    early = [j for j in batch if j["timings"]["queued_at"] < first_free]
    assert 1 <= len(early) <= SLOTS - 2 + LOOKAHEAD - SLOTS
    assert min(j["timings"]["first_token_at"] for j in batch) >= first_free  # no row before a job ended

    spans = [(j["timings"]["first_token_at"], j["timings"]["finished_at"]) for j in batch]
    together = max(sum(s <= start < f for s, f in spans) for start, _ in spans)
    assert SLOTS // 2 <= together <= SLOTS  # the batch alone fills the engine's rows


def test_a_batch_cancelled_after_its_run_died_cancels_that_runs_jobs(
    stack: Stack, others: Callable[[], tuple[subprocess.Popen[bytes], str]]
) -> None:
    key = create_key(stack.client, "cancel after death", Scope.USER).secret
    first, first_url = others()
    _, second_url = others()
    lines = chat_lines("k", 20, lambda _: 500)
    with (
        client_of(first_url, key) as c,
        httpx.Client(base_url=second_url, headers=bearer(key), timeout=30) as http,
    ):
        made = c.batches.create(input_file_id=upload(c, lines), endpoint=CHAT, completion_window="24h")

        def running() -> list[dict[str, object]]:
            jobs: list[dict[str, object]] = http.get("/v1/jobs", params={"limit": 50}).json()["jobs"]
            return [j for j in jobs if j["status"] == "running"]

        wait_for(lambda: len(running()) >= 4, 30, "the batch's jobs to run")
        first.kill()  # its lines' jobs run on, nobody waiting for them
        first.wait(30)
        assert http.post(f"/v1/batches/{made.id}/cancel").json()["status"] == "cancelling"
        with client_of(second_url, key) as c2:
            done = wait(c2, made.id, timeout=60)  # the second API takes it over, cancelling
            seen = lines_of(c2, done.output_file_id) + lines_of(c2, done.error_file_id)
        assert done.status == "cancelled"
        assert sorted(x["custom_id"] for x in seen) == sorted(x["custom_id"] for x in lines)  # each once
        assert {x["error"]["code"] for x in seen if x["response"] is None} == {"batch_cancelled"}

        def jobs() -> list[dict[str, object]]:
            return http.get("/v1/jobs", params={"limit": 50}).json()["jobs"]  # type: ignore[no-any-return]

        wait_for(
            lambda: all(j["status"] in ("succeeded", "cancelled") for j in jobs()), 10, "every job to end"
        )
        assert len(jobs()) <= 20 and any(j["status"] == "cancelled" for j in jobs())  # the dead run's


def test_a_batch_goes_on_through_a_redis_restart_each_line_once(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    env = {
        **service_env,
        "LOCALMOE_REDIS_URL": server.url,
        "LOCALMOE_ENGINE__MAX_BATCH_SIZE": str(SLOTS),
        "LOCALMOE_ENGINE__STEP_DELAY_S": "0.02",
    }
    client = redis.Redis.from_url(server.url, decode_responses=True)
    key = create_key(client, "restart", Scope.USER).secret
    worker = subprocess.Popen([sys.executable, "-m", "localmoe", "worker", "--name", "phoenix"], env=env)
    api: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: client.get(keys.worker("phoenix")) is not None, 120, "the worker")
        api, url = start_api(env, key)
        lines = chat_lines("r", 80, lambda i: 8 + i % 16)
        with client_of(url, key) as c:
            made = c.batches.create(input_file_id=upload(c, lines), endpoint=CHAT, completion_window="24h")
            done_part_way(c, made.id, 20)
            server.stop()  # every client loses its connection; the AOF keeps the ledger and leases
            time.sleep(1)
            server.start()
            # A message the consumer popped as Redis stopped is gone with its connection; its job
            # stays queued and the reaper sends it again after record.WAITING_CHECK_S, so the wait
            # covers that path too (a full-suite run once saw this batch still running at 120 s).
            finished = wait(c, made.id, timeout=record.WAITING_CHECK_S + 90)
            output = lines_of(c, finished.output_file_id)
        assert finished.status == "completed" and finished.error_file_id is None
        counts = finished.request_counts
        assert counts is not None and (counts.total, counts.completed, counts.failed) == (80, 80, 0)
        assert [x["custom_id"] for x in output] == [x["custom_id"] for x in lines]  # each once, in order
        tokens = [x["response"]["body"]["usage"]["completion_tokens"] for x in output]
        assert tokens == [x["body"]["max_tokens"] for x in lines]  # type: ignore[index]
    finally:
        if api is not None:
            _stop(api)
        _stop(worker)
        client.close()
        server.stop()


def test_a_batch_past_its_window_expires_with_the_lines_done_so_far(
    stack: Stack, others: Callable[[], tuple[subprocess.Popen[bytes], str]]
) -> None:
    """The window is 24 h: the test moves the stored batch's expires_at to now part way through and
    kills the API running it; the one that takes it over finds the window passed. Every line ends
    exactly once: those that ran in the output file, the rest never run (batch_expired)."""
    key = create_key(stack.client, "expiry", Scope.USER).secret
    first, first_url = others()
    _, second_url = others()
    lines = chat_lines("e", 120, lambda i: 4 + i % 16)
    with client_of(first_url, key) as c:
        made = c.batches.create(input_file_id=upload(c, lines), endpoint=CHAT, completion_window="24h")
        done_before = done_part_way(c, made.id, 10)
    raw = stack.client.hget(keys.batch(made.id), "record")
    assert isinstance(raw, str)
    stored = BatchRecord.model_validate_json(raw)
    stored.expires_at = int(time.time())
    stack.client.hset(keys.batch(made.id), "record", stored.model_dump_json())
    first.kill()  # its run's copy of the record still says 24 h
    first.wait(30)
    with client_of(second_url, key) as c2:
        end = wait(c2, made.id, timeout=60)
        ran = lines_of(c2, end.output_file_id) if end.output_file_id else []
        never = lines_of(c2, end.error_file_id) if end.error_file_id else []
    assert end.status == "expired"
    assert sorted(x["custom_id"] for x in ran + never) == sorted(x["custom_id"] for x in lines)  # once each
    assert len(ran) >= done_before and never  # what was done stays done; the rest never ran
    assert all(x["response"]["status_code"] == 200 for x in ran)
    assert {x["error"]["code"] for x in never} == {"batch_expired"}
    counts = end.request_counts
    assert counts is not None and (counts.total, counts.completed) == (120, len(ran))
