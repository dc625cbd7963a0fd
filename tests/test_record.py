"""scheduler/record.py owns the job record: read from the source, no other file writes a status as
a Lua literal, and each status its scripts use is rendered as the job hash stores it."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import redis

from localmoe.redis_server import RedisServer
from scheduler import keys, record
from scheduler.jobs import Job, JobSpec, JobStatus, job_to_hash
from scheduler.stream import FEED_KEYS
from tests.conftest import scratch_db
from workers.relay import RELAY

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("api", "scheduler", "workers", "moe_core", "moe_build", "host", "localmoe", "bench")

# A status as a hash field's JSON inside a string: '"queued"', "'\"queued\"'", '\"queued\"'...
STATUSES = "|".join(s.value for s in JobStatus)
STATUS_LITERAL = re.compile(r"""['"]\\?"(""" + STATUSES + r""")\\?"['"]""")

SCRIPTS = {
    "CLAIM": record.CLAIM,
    "RESUME": record.RESUME,
    "FINALIZE_LUA": record.FINALIZE_LUA,
    "CANCEL": record.CANCEL,
    "REQUEUE": record.REQUEUE,
    "RELAY": RELAY,
}


def test_no_status_typed_by_hand_outside_the_record() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in SOURCES
        if (ROOT / package).is_dir()
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "scheduler" / "record.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if STATUS_LITERAL.search(line)
    ]
    assert not found, found


def test_statuses_in_the_scripts_are_as_the_hash_stores_them() -> None:
    used = {
        JobStatus.QUEUED: ("CLAIM", "CANCEL", "REQUEUE"),
        JobStatus.RUNNING: ("CLAIM", "FINALIZE_LUA", "CANCEL", "REQUEUE", "RELAY"),
        JobStatus.FAILED: ("REQUEUE",),
        JobStatus.CANCELLED: ("CANCEL", "CLAIM"),
    }
    for status, scripts in used.items():
        stored = job_to_hash(Job(spec=JobSpec(prompt="x"), status=status))["status"]
        assert stored == json.dumps(status.value)
        assert record.lua_json(status) == f"'{stored}'"
        for name in scripts:
            assert record.lua_json(status) in SCRIPTS[name], (status, name)
    # succeeded is written by finalize from the relay's fields (record.finalize_operands), not Lua
    assert record.lua_json(JobStatus.SUCCEEDED) not in "".join(SCRIPTS.values())
    assert record.lua_json(True) == "'true'" and record.lua_json("abort") == "'\"abort\"'"


def test_finalize_writes_the_terminal_fields_as_the_hash_stores_them() -> None:
    job = Job(spec=JobSpec(prompt="x"), status=JobStatus.SUCCEEDED, worker="w1", output="hi")
    job.finish_reason, job.timings.finished_at = "stop", 12.5
    keys, args = record.finalize_operands(job, attempt=3, hook="")
    assert keys[0].endswith(job.id) and keys[2].endswith("w1:running")
    attempt, done, hook, k, *pairs = args
    assert (attempt, hook, int(k)) == ("3", "", len(pairs) // 2)
    fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
    stored = job_to_hash(job)
    assert {f: stored[f] for f in fields} == fields  # every field as job_to_hash writes it
    assert json.loads(done)["status"] == "succeeded"


class _Script:
    """Stands in for a registered script: records its keys and args, returns `reply`."""

    def __init__(self, reply: object) -> None:
        self.reply = reply
        self.keys: list[str] = []
        self.args: list[object] = []

    def __call__(self, keys: list[str], args: list[object]) -> object:
        self.keys, self.args = keys, args
        return self.reply


def test_scripts_that_feed_get_the_feed_keys_last() -> None:
    """FEED_LUA's `publish` takes the feed's keys from the last two KEYS of its script."""
    resume = _Script(["0", "ab", "2", "", "1", "c", "1", "stop"])
    assert record.resume(resume, "j1", 2) == {0: ("ab", 2, None), 1: ("c", 1, "stop")}  # type: ignore[arg-type]
    requeue = _Script("requeued")
    assert record.requeue(requeue, "j1", "w1", "inc 1", 3, 60, 'a "quoted" name') == "requeued"  # type: ignore[arg-type]
    assert json.loads(str(requeue.args[-1])) == 'a "quoted" name'
    cancel = _Script(None)

    async def reply(keys: list[str], args: list[object]) -> str:
        cancel(keys, args)
        return "requested"

    assert asyncio.run(record.cancel(reply, "j1", 60)) is record.CancelOutcome.REQUESTED  # type: ignore[arg-type]
    for script in (resume, requeue, cancel):
        assert script.keys[-2:] == FEED_KEYS
    assert "local function publish()" in RELAY and "\npublish()\n" in RELAY


def test_a_caller_that_keeps_trim_times_trims_each_listing_once_a_second_and_never_leaves_one_without_ttl(
    redis_server: RedisServer,
) -> None:
    """The Enqueuer writes many batches a second: it trims and renews a listing's ttl at most once
    per TRIM_EVERY_S, but a listing it has not touched lately (a new key's) gets both at once."""
    with scratch_db(redis_server, 3) as rclient:
        _trims(rclient)


def _trims(rclient: redis.Redis) -> None:
    trimmed: dict[str, float] = {}
    stale = time.time() - 7200  # an entry whose record expired an hour ago
    rclient.zadd(keys.ALL_JOBS, {"gone": stale})

    def write(owner: str) -> None:
        pipe = rclient.pipeline(transaction=False)
        job = Job(spec=JobSpec(prompt="x"), owner=owner)
        record.stage_create(pipe, [job], 3600, trimmed=trimmed)
        pipe.execute()

    write("k1")
    assert rclient.zscore(keys.ALL_JOBS, "gone") is None  # trimmed on first sight
    assert 0 < rclient.ttl(keys.owner_jobs("k1")) <= 3600
    rclient.zadd(keys.ALL_JOBS, {"gone": stale})
    write("k1")
    assert rclient.zscore(keys.ALL_JOBS, "gone") == stale  # not again within the second
    write("k2")  # a listing not seen before: its ttl at once
    assert 0 < rclient.ttl(keys.owner_jobs("k2")) <= 3600
    trimmed[keys.ALL_JOBS] -= record.TRIM_EVERY_S
    write("k2")
    assert rclient.zscore(keys.ALL_JOBS, "gone") is None
