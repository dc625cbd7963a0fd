"""The scheduler's routing rules, against a real Redis holding registry records as workers write
them (scheduler/registry.py), and its decisions on jobs as the API builds them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from host.gpus import GpuStats
from host.settings import SchedulerSettings, Settings
from localmoe.redis_server import RedisServer
from scheduler import keys
from scheduler.jobs import Job, JobSpec, Modality
from scheduler.prefix import PrefixIndex, Sent, block_hashes, unpack
from scheduler.queue import Enqueuer, make_celery
from scheduler.registry import STALE_AFTER_S, WorkerInfo, read_workers, update_mix
from scheduler.routing import PromptCounter, Scheduler, job_cost
from tests.conftest import scratch_db


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A database of its own (2): the session's service lives in database 0."""
    with scratch_db(redis_server, 2) as c:
        yield c


def beat(client: redis.Redis, name: str, *, age_s: float = 0.0, **fields: Any) -> WorkerInfo:
    """Write a heartbeat record for `name`, as its worker would (fields override the defaults)."""
    at = time.time() - age_s
    values: dict[str, Any] = {
        "name": name,
        "pid": 1,
        "queues": [keys.SHARED_QUEUE, keys.worker_queue(name)],
        "engine": "torch",
        "device": "cpu",
        "model": "m",
        "max_context": 2048,
        "capacity": 8,
        "ready": True,
        "started_at": at,
        "heartbeat_at": at,
        "step_rate": 20.0,
    }
    info = WorkerInfo(**(values | fields))
    client.set(keys.worker(name), info.model_dump_json())
    client.zadd(keys.WORKERS, {name: at})
    return info


def job(max_tokens: int = 64, modality: Modality = Modality.TEXT, prompt_tokens: int = 32) -> Job:
    j = Job(spec=JobSpec(prompt="x", max_tokens=max_tokens), modality=modality)
    j.cost = job_cost(prompt_tokens, max_tokens, SchedulerSettings().prefill_weight)
    return j


def scheduler(client: redis.Redis, **cfg: Any) -> Scheduler:
    s = Scheduler(client, SchedulerSettings(**cfg))
    s.refresh()
    return s


def gpu(**fields: Any) -> GpuStats:
    base: dict[str, Any] = {"index": 0, "name": "NVIDIA L40S", "uuid": "GPU-0"}
    return GpuStats(**(base | fields))


def test_no_fresh_worker_falls_back_to_the_shared_queue(client: redis.Redis) -> None:
    route = scheduler(client).route(job())
    assert route.queue == keys.SHARED_QUEUE and "no fresh worker" in route.reason
    beat(client, "old", age_s=STALE_AFTER_S + 1)  # three missed beats: gone
    assert read_workers(client, time.time()) == []
    route = scheduler(client).route(job())
    assert route.queue == keys.SHARED_QUEUE and route.worker is None
    beat(client, "cold", ready=False)  # still loading its engine
    assert scheduler(client).route(job()).queue == keys.SHARED_QUEUE


def test_a_fresh_worker_gets_its_own_queue_and_the_reason(client: redis.Redis) -> None:
    beat(client, "a", age_s=STALE_AFTER_S - 1)  # two missed beats: still counts
    route = scheduler(client).route(job())
    assert route.queue == keys.worker_queue("a") and route.worker == "a"
    assert route.reason.startswith("a: earliest expected completion")


def test_the_faster_worker_wins_when_both_are_idle(client: redis.Redis) -> None:
    beat(client, "fast", step_rate=40.0)
    beat(client, "slow", step_rate=10.0)
    route = scheduler(client).route(job())
    assert route.worker == "fast" and "slow" in route.reason  # the alternative's estimate is shown


def test_work_ahead_sends_jobs_to_the_idle_worker(client: redis.Redis) -> None:
    beat(client, "busy", step_rate=40.0, tokens_in_flight=8 * 2000, running=8)
    beat(client, "idle", step_rate=20.0)
    assert scheduler(client).route(job()).worker == "idle"
    # the queue counts too: jobs routed to `idle` and not yet claimed
    beat(client, "busy", step_rate=40.0)
    client.hset(keys.queued("busy"), mapping={f"j{i}": 2000 for i in range(8)})
    assert scheduler(client).route(job()).worker == "idle"
    client.delete(keys.queued("busy"))
    assert scheduler(client).route(job()).worker == "busy"  # claimed: faster again


def test_a_worker_still_prefilling_long_prompts_is_not_taken_for_free(client: redis.Redis) -> None:
    """On an H100 at 40 arrivals a second of 2-6k-token prompts, auto sent all 180 jobs to one of
    two workers: its estimate drained only the decode tokens left, by every row of a 256-row batch,
    which stayed inside the affinity margin of the job's own time, and the tie went to the worker
    with the modality. The prompts still to prefill, no faster than the work rate it measured,
    say otherwise."""
    code = job(max_tokens=128, modality=Modality.CODE, prompt_tokens=4000)
    held = {"step_rate": 20.0, "capacity": 256, "modality_mix": {"code": 1.0}, "running": 100}
    beat(client, "idle", step_rate=0.0, capacity=256)  # unmeasured: counted at the other's rate
    beat(client, "busy", tokens_in_flight=12_800, **held)  # decode tokens left only: a near tie
    assert scheduler(client).route(code).worker == "busy"
    beat(client, "busy", tokens_in_flight=12_800, cost_in_flight=37_800, **held)  # 100 prompts to prefill
    assert scheduler(client).route(code).worker == "idle"
    # ten prompts left to prefill: within the margin at the batch's decode rate, not at the rate measured
    # 40 prompts to prefill: within the margin at the batch's decode rate (12,000 / 5,120 s), not
    # at the rate the worker measured (10,000 of prefill / 2,000 a second)
    beat(client, "busy", tokens_in_flight=2_000, cost_in_flight=12_000, **held)
    assert scheduler(client).route(code).worker == "busy"
    beat(client, "busy", tokens_in_flight=2_000, cost_in_flight=12_000, peak_cost_per_s=2_000.0, **held)
    route = scheduler(client).route(code)
    assert route.worker == "idle" and "busy 23.9" in route.reason  # 5 s + 378 / 20
    beat(client, "busy", tokens_in_flight=2_000, cost_in_flight=2_500, peak_cost_per_s=2_000.0, **held)
    assert scheduler(client).route(code).worker == "busy"  # two prompts: a quarter second


def test_a_burst_spreads_before_the_next_heartbeat(client: redis.Redis) -> None:
    beat(client, "a", step_rate=30.0)
    beat(client, "b", step_rate=10.0)
    s = scheduler(client)
    counts = Counter(s.route(job(max_tokens=256)).worker for _ in range(60))
    assert counts["a"] > counts["b"] > 0  # speed-weighted, not all on the fastest


def test_close_costs_go_to_the_worker_already_running_the_modality(client: redis.Redis) -> None:
    beat(client, "coder", step_rate=20.0, modality_mix={"code": 0.9, "text": 0.1})
    beat(client, "writer", step_rate=21.0, modality_mix={"code": 0.1, "text": 0.9})
    s = scheduler(client)
    code = s.route(job(modality=Modality.CODE))
    assert code.worker == "coder" and "code share 0.90" in code.reason
    s = scheduler(client)
    assert s.route(job(modality=Modality.TEXT)).worker == "writer"
    # beyond the margin, speed wins over affinity
    beat(client, "writer", step_rate=40.0, modality_mix={"text": 1.0})
    assert scheduler(client).route(job(modality=Modality.CODE)).worker == "writer"
    assert scheduler(client, affinity_margin=0.0).route(job(modality=Modality.CODE)).worker == "writer"


@pytest.mark.parametrize(
    ("unhealthy", "why"),
    [
        ({"gpus": [gpu(temperature_c=92.0)]}, "GPU 0 at 92 C"),
        (
            {"gpus": [gpu(memory_used_bytes=47_900_000_000, memory_total_bytes=48_000_000_000)]},
            "GPU 0 memory 100% used",
        ),
        ({"kv_usage": 0.99}, "KV cache 99% used"),
    ],
)
def test_unhealthy_workers_are_avoided(client: redis.Redis, unhealthy: dict[str, Any], why: str) -> None:
    beat(client, "sick", step_rate=80.0, **unhealthy)
    beat(
        client,
        "well",
        step_rate=10.0,
        gpus=[gpu(temperature_c=60.0, memory_used_bytes=1, memory_total_bytes=2)],
    )
    route = scheduler(client).route(job())
    assert route.worker == "well" and f"avoided sick ({why}" in route.reason
    client.delete(keys.worker("well"))
    client.zrem(keys.WORKERS, "well")
    route = scheduler(client).route(job())  # nobody healthy: the shared queue
    assert route.queue == keys.SHARED_QUEUE and "no healthy worker" in route.reason and why in route.reason


def test_the_temperature_limit_is_configurable(client: redis.Redis) -> None:
    beat(client, "warm", step_rate=80.0, gpus=[gpu(temperature_c=80.0)])
    beat(client, "cool", step_rate=10.0)
    assert scheduler(client).route(job()).worker == "warm"
    assert scheduler(client, max_temperature_c=75).route(job()).worker == "cool"


def test_baseline_policies(client: redis.Redis) -> None:
    beat(client, "a")
    beat(client, "b", step_rate=1.0)
    assert scheduler(client, policy="shared").route(job()).queue == keys.SHARED_QUEUE
    s = scheduler(client, policy="round_robin")
    assert [s.route(job()).worker for _ in range(4)] == ["a", "b", "a", "b"]


def test_job_cost_and_modality_mix() -> None:
    assert job_cost(prompt_tokens=160, max_tokens=100, prefill_weight=0.0625) == 110
    mix = update_mix({}, {}, {"code": 30, "text": 10})
    assert mix == {"code": 0.75, "text": 0.25}
    assert update_mix(mix, {"code": 30, "text": 10}, {"code": 30, "text": 10}) == mix  # idle: kept
    later = update_mix(mix, {"code": 30, "text": 10}, {"code": 30, "text": 50})  # only text since
    assert later["text"] > mix["text"] and abs(sum(later.values()) - 1) < 1e-9


# --- prefix-cache-aware routing (scheduler/prefix.py) ---------------------------------------------


def prompt_job(prompt_tokens: int, max_tokens: int = 64) -> Job:
    j = job(max_tokens=max_tokens, prompt_tokens=prompt_tokens)
    j.usage.prompt_tokens = prompt_tokens
    return j


REPO = list(range(1000, 3000))  # 2,000 token ids: a long shared context
START = 1_700_000_000.0  # the workers' started_at: a new one would mean a restarted engine


def test_block_hashes_are_chained_prefixes() -> None:
    a = block_hashes([*REPO[:100], 1, 2, 3], block_size=16, max_blocks=512)
    assert len(a) == 6  # full blocks only: 103 tokens → 6 blocks of 16
    b = block_hashes([*REPO[:40], 7, *REPO[41:100]], block_size=16, max_blocks=512)
    assert b[:2] == a[:2] and not set(b[2:]) & set(a)  # one token differs in block 2: all later ones too
    assert block_hashes(REPO, 16, max_blocks=4) == block_hashes(REPO[:64], 16, 512)
    assert block_hashes(REPO[:15], 16, 512) == []


def test_a_repeated_prefix_goes_back_to_the_worker_that_holds_it(client: redis.Redis) -> None:
    beat(client, "a", started_at=START, prefix_caching=True, kv_block_size=16)
    beat(client, "b", started_at=START, prefix_caching=True, kv_block_size=16, tokens_in_flight=400)
    s = scheduler(client)
    blocks = block_hashes(REPO, 16, 512)
    first = s.route(prompt_job(2000), blocks)
    assert first.worker == "a" and "prefix 0 of 2000 prompt tokens cached here" in first.reason
    assert first.sent is not None and list(first.sent.hashes) == blocks
    beat(
        client, "a", started_at=START, prefix_caching=True, kv_block_size=16, tokens_in_flight=800
    )  # busier now
    s.refresh()
    again = s.route(prompt_job(2000), blocks)
    assert again.worker == "a" and again.cached_tokens == 2000
    assert "prefix 2000 of 2000 prompt tokens cached here" in again.reason
    without = scheduler(client, prefix_routing=False).route(prompt_job(2000), blocks)
    assert without.worker == "b" and without.sent is None and "prefix" not in without.reason
    # a prompt sharing only the first 100 tokens: 96 of them (6 whole blocks) count
    other = block_hashes([*REPO[:100], *range(5000, 6900)], 16, 512)
    assert s.route(prompt_job(2000), other).cached_tokens in (0, 96)


def test_only_engines_that_cache_prefixes_get_the_credit_in_their_blocks(client: redis.Redis) -> None:
    beat(
        client, "plain", started_at=START, tokens_in_flight=100
    )  # prefix_caching false: a torch engine without one
    beat(client, "big", started_at=START, prefix_caching=True, kv_block_size=128, tokens_in_flight=200)
    s = scheduler(client)
    blocks = block_hashes(REPO[:1000], 16, 512)
    s.prefixes.touch("plain", blocks, time.time())
    s.prefixes.touch("big", blocks[:20], time.time())  # 320 tokens sent: 2 whole blocks of 128
    route = s.route(prompt_job(1000), blocks)
    assert route.worker == "big" and route.cached_tokens == 256


def test_the_index_is_shared_through_redis(client: redis.Redis) -> None:
    beat(client, "a", started_at=START, prefix_caching=True)
    beat(client, "b", started_at=START, prefix_caching=True)
    one, two = scheduler(client), scheduler(client)
    blocks = block_hashes(REPO, 16, 512)
    route = one.route(prompt_job(2000), blocks)
    assert route.sent is not None
    pipe = client.pipeline(transaction=False)
    one.prefixes.stage(pipe, [route.sent])  # as the Enqueuer does, with the jobs' records
    pipe.execute()
    assert two.route(prompt_job(2000), blocks).cached_tokens == 0  # not read yet
    two.refresh()
    assert two.prefixes.matched(route.sent.worker, blocks) == len(blocks)
    one.refresh()  # its own entry is skipped, not applied twice
    # a worker that restarted holds nothing
    beat(client, route.sent.worker, prefix_caching=True, started_at=time.time() + 1)
    two.refresh()
    assert two.prefixes.matched(route.sent.worker, blocks) == 0


def test_a_hot_prefix_spreads_when_one_worker_would_overload(client: redis.Redis) -> None:
    beat(client, "a", started_at=START, prefix_caching=True)
    beat(client, "b", started_at=START, prefix_caching=True)
    s = scheduler(client)
    blocks = block_hashes(REPO, 16, 512)
    counts = Counter(s.route(prompt_job(2000, max_tokens=256), blocks).worker for _ in range(80))
    assert counts["a"] > 10 and counts["b"] > 10, counts
    assert all(s.prefixes.matched(w, blocks) == len(blocks) for w in "ab")  # both hold it now


def test_health_rules_still_exclude_the_worker_holding_the_prefix(client: redis.Redis) -> None:
    beat(client, "full", started_at=START, prefix_caching=True, kv_usage=0.99)
    beat(client, "well", started_at=START, prefix_caching=True)
    s = scheduler(client)
    blocks = block_hashes(REPO, 16, 512)
    s.prefixes.touch("full", blocks, time.time())
    route = s.route(prompt_job(2000), blocks)
    assert route.worker == "well" and "avoided full (KV cache 99% used)" in route.reason


def test_the_index_is_bounded_by_the_kv_cache_and_expires(client: redis.Redis) -> None:
    beat(client, "a", started_at=START, prefix_caching=True, kv_block_size=32, kv_blocks=100)
    s = scheduler(client, prefix_ttl_s=60)  # 100 blocks of 32: 200 of the router's blocks of 16
    old = block_hashes(REPO[:1600], 16, 512)  # 100 blocks
    s.prefixes.touch("a", old, time.time())
    assert s.prefixes.matched("a", old) == 100
    s.prefixes.touch("a", block_hashes([7, *REPO], 16, 512)[:99], time.time())  # 99 others
    assert s.prefixes.matched("a", old) == 100  # 199 blocks: all held
    s.prefixes.touch("a", block_hashes(REPO[:800], 16, 512), time.time())  # the first 50 again
    assert s.prefixes.matched("a", old) == 50  # past the capacity: what was sent last stays
    s.prefixes.touch("a", old[:10], time.time())
    s.prefixes.expire(time.time() + 31)  # every half ttl the older generation goes
    assert s.prefixes.matched("a", old) == 10
    s.prefixes.expire(time.time() + 62)
    assert s.prefixes.matched("a", old) == 0


def test_the_enqueuer_records_the_blocks_with_the_jobs(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The blocks a job was routed with reach the stream in the batch that records the job."""
    url = redis_server.url.rsplit("/", 1)[0] + "/2"  # the `client` fixture's database
    app = make_celery(url)
    index = PrefixIndex(ttl_s=600, default_capacity=1000)
    enqueuer = Enqueuer(app, client, ttl_s=600, prefixes=index)
    blocks = [block_hashes(REPO[i * 100 :], 16, 512) for i in range(3)]

    async def submit_all() -> None:
        jobs = [Job(spec=JobSpec(prompt="x", max_tokens=4), queue=keys.worker_queue("a")) for _ in blocks]
        await asyncio.gather(
            *(enqueuer.submit(j, None, Sent("a", b)) for j, b in zip(jobs, blocks, strict=True))
        )
        assert all(client.exists(keys.job(j.id)) for j in jobs)

    try:
        asyncio.run(asyncio.wait_for(submit_all(), 20))
        entries = PrefixIndex(ttl_s=600, default_capacity=1000).pull(client, time.time())
        assert {(w, o) for w, o, _ in entries} == {("a", index.origin)}
        assert sorted(h for _, _, packed in entries for h in unpack(packed)) == sorted(
            h for b in blocks for h in b
        )
    finally:
        app.close()


def test_intake_hashes_the_prompts_own_tokens(model_dir: Path) -> None:
    """The ids intake routes with are the prompt's (as the engine will count them), whatever else
    the request names (logit_bias, stop_token_ids)."""
    from api.jobs import _admit

    counter = PromptCounter(model_dir)
    services: Any = SimpleNamespace(settings=Settings(), counter=counter)
    spec = JobSpec(prompt="def f(x):\n    return x\n" * 20, stop_token_ids=[3], logit_bias={"5": 1.0})
    ids = _admit(spec, services)
    assert ids == counter.encode(spec.prompt) and len(block_hashes(ids, 16, 512)) == len(ids) // 16 > 0
