"""DeepSpeed tensor parallelism without a launcher (moe_core/tensor_parallel.py): TP=2 on the CPU,
real DeepSpeed over gloo, a real spawned follower process, on a tiny random Mixtral.

Every rank holds half of the attention heads and of lm_head's inputs, so a leader whose follower
ran a different batch (or sampled a different token) would make different tokens.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# Chosen once, at deepspeed's first import; a CPU test must not get the CUDA accelerator on a GPU box.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")

import torch
import torch.distributed as dist

from moe_build.checkpoint import build_checkpoint
from moe_core.deepspeed import DeepSpeedEngine
from moe_core.engine import FinishReason, GenerationRequest, SamplingParams
from moe_core.tensor_parallel import TensorParallelEngine
from moe_core.torch_engine import TorchEngine
from tests.test_torch_engine import (
    NEW_TOKENS,
    PROMPTS,
    Result,
    _assert_matches,
    _collect,
    _greedy,
    _reference,
    _run,
)

pytestmark = pytest.mark.service  # spawns DeepSpeed's follower ranks


def _gone(pid: int) -> bool:
    """The process no longer exists (reaped), or is a zombie nobody will run again."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _tp_engine(checkpoint: Path) -> TensorParallelEngine:
    engine = DeepSpeedEngine(checkpoint, device="cpu", max_batch_size=8, tensor_parallel_size=2)
    assert isinstance(engine, TensorParallelEngine)  # no launcher here: the engine starts rank 1
    engine.load()
    return engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "mixtral", arch="mixtral", progress=False)


@pytest.fixture(scope="module")
def plain(checkpoint: Path) -> TorchEngine:
    engine = TorchEngine(checkpoint, max_batch_size=8)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def references(plain: TorchEngine) -> dict[str, list[int]]:
    return {prompt: _reference(plain, prompt) for prompt in PROMPTS}


@pytest.fixture(scope="module")
def tp(checkpoint: Path) -> Iterator[TensorParallelEngine]:
    engine = _tp_engine(checkpoint)
    yield engine
    engine.close()


def test_loads_two_ranks_and_shards_attention_and_lm_head(
    tp: TensorParallelEngine, plain: TorchEngine
) -> None:
    assert tp.name == "deepspeed"
    assert tp.max_context == plain.max_context
    (pid,) = tp.follower_pids
    assert pid != os.getpid() and not _gone(pid)
    assert dist.get_world_size() == 2 and dist.get_rank() == 0
    model = tp.leader.model.module
    layer = model.model.layers[0]
    kinds = {name: type(module).__name__ for name, module in layer.self_attn.named_children()}
    assert kinds == {"q_proj": "LinearLayer", "k_proj": "LinearLayer", "v_proj": "LinearLayer"} | {
        "o_proj": "LinearAllreduce"
    }
    assert type(model.lm_head).__name__ == "LmHeadLinearAllreduce"
    whole = plain.model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape[0] * 2 == whole.self_attn.q_proj.weight.shape[0]
    # Transformers 5's fused experts are not nn.Linear (AutoTP would copy them whole): every expert's
    # intermediate units are split between the ranks instead (shard_fused_experts).
    experts, full = layer.mlp.experts, whole.mlp.experts
    assert experts.gate_up_proj.shape[1] * 2 == full.gate_up_proj.shape[1]
    assert experts.down_proj.shape[2] * 2 == full.down_proj.shape[2]
    inner = full.down_proj.shape[2]
    assert torch.equal(
        experts.gate_up_proj[:, : inner // 2], full.gate_up_proj[:, : inner // 2]
    )  # rank 0's gate
    assert torch.equal(
        experts.gate_up_proj[:, inner // 2 :], full.gate_up_proj[:, inner : inner + inner // 2]
    )
    held, total = (sum(p.numel() for p in m.parameters()) for m in (model, plain.model))
    assert total * 0.5 < held < total * 0.6  # what is left whole: embedding, router, norms


def test_batched_greedy_matches_generate(tp: TensorParallelEngine, references: dict[str, list[int]]) -> None:
    results = _run(tp, [_greedy(f"p{i}", prompt) for i, prompt in enumerate(PROMPTS)])
    for i, prompt in enumerate(PROMPTS):
        _assert_matches(tp.leader, results[f"p{i}"], references[prompt], NEW_TOKENS)
    assert tp.stats().max_batch_seen == len(PROMPTS)


def test_sampling_matches_one_process(
    tp: TensorParallelEngine, plain: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeded request samples what it samples in one process; an unseeded one gets a seed from the
    leader that every rank uses (with another seed the follower's half of the heads would see other
    tokens, and the leader's tokens would differ from the one-process run)."""
    monkeypatch.setattr("moe_core.tensor_parallel.secrets.randbits", lambda bits: 1234)

    def sampled(request_id: str, seed: int | None) -> GenerationRequest:
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return GenerationRequest(request_id, PROMPTS[3], params)

    got = _run(tp, [sampled("seeded", 7), sampled("unseeded", None)])
    want = _run(plain, [sampled("seeded", 7), sampled("unseeded", 1234)])
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}
    assert all(len(r.token_ids) == 24 for r in got.values())


def test_abort_and_idle_steps(
    tp: TensorParallelEngine, references: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    long = GenerationRequest("long", PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True))
    tp.add_request(long)
    tp.add_request(_greedy("short", PROMPTS[1]))
    results: dict[str, Result] = {}
    for _ in range(4):
        _collect(tp, results)
    tp.abort("long")
    while tp.has_unfinished():
        _collect(tp, results)
    assert results["long"].finish_reason == FinishReason.ABORT
    assert 0 < len(results["long"].token_ids) < 10
    _assert_matches(tp.leader, results["short"], references[PROMPTS[1]], NEW_TOKENS)
    # Idle: no broadcast, no forward (the follower waits), however often the loop steps.
    steps = tp.stats().steps
    started = time.monotonic()
    assert all(tp.step() == [] for _ in range(200))
    assert time.monotonic() - started < 1.0 and tp.stats().steps == steps
    # Keep-alive broadcasts while idle: the follower steps too, still without a forward.
    monkeypatch.setattr("moe_core.tensor_parallel.KEEPALIVE_S", 0.0)
    assert all(tp.step() == [] for _ in range(5))
    assert tp.stats().steps == steps
    # ...and the ranks are still in step afterwards.
    results = _run(tp, [_greedy("after", PROMPTS[2])])
    _assert_matches(tp.leader, results["after"], references[PROMPTS[2]], NEW_TOKENS)


def test_close_stops_the_follower_and_restores_the_process(
    checkpoint: Path, tp: TensorParallelEngine
) -> None:
    (pid,) = tp.follower_pids
    environ = {key: os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    processes = [f.process for f in tp._followers]
    tp.close()
    assert _gone(pid) and not multiprocessing.active_children()
    assert [p.exitcode for p in processes] == [0]  # it left on its own, not terminated
    assert not dist.is_initialized()
    assert os.environ.get("WORLD_SIZE") != "2" and environ["WORLD_SIZE"] == "2"
    tp.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tp.step()


def test_killed_follower_fails_the_step_in_bounded_time(
    checkpoint: Path, references: dict[str, list[int]]
) -> None:
    engine = _tp_engine(checkpoint)
    (pid,) = engine.follower_pids
    try:
        engine.add_request(
            GenerationRequest("r", PROMPTS[0], SamplingParams(max_tokens=1000, ignore_eos=True))
        )
        engine.step()
        # Killed at some point of the leader's stepping: between steps or inside a forward.
        threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="tensor-parallel"):
            while time.monotonic() - started < 30:
                engine.step()
        assert time.monotonic() - started < 30
        with pytest.raises(RuntimeError, match="broken"):  # later steps fail at once
            engine.step()
    finally:
        engine.close()
    assert _gone(pid) and not dist.is_initialized()
    # What FailoverEngine does after its cool-down: load the preferred engine again, here.
    again = _tp_engine(checkpoint)
    try:
        results = _run(again, [_greedy("again", PROMPTS[4])])
        _assert_matches(again.leader, results["again"], references[PROMPTS[4]], NEW_TOKENS)
    finally:
        again.close()
    assert all(_gone(p) for p in again.follower_pids)


def test_qwen2_moe_with_a_shared_expert_matches_generate(tmp_path: Path) -> None:
    """AutoTP splits Qwen2-MoE's shared expert (nn.Linear); shard_fused_experts its routed experts."""
    checkpoint = build_checkpoint(tmp_path / "qwen2_moe", arch="qwen2_moe", progress=False)
    plain = TorchEngine(checkpoint, max_batch_size=8)
    plain.load()
    prompts = PROMPTS[:4]
    references = {prompt: _reference(plain, prompt) for prompt in prompts}
    inner = plain.model.model.layers[0].mlp.experts.down_proj.shape[2]
    plain.close()
    engine = _tp_engine(checkpoint)
    try:
        experts = engine.leader.model.module.model.layers[0].mlp.experts
        assert experts.down_proj.shape[2] * 2 == inner
        results = _run(engine, [_greedy(f"q{i}", prompt) for i, prompt in enumerate(prompts)])
        for i, prompt in enumerate(prompts):
            _assert_matches(engine.leader, results[f"q{i}"], references[prompt], NEW_TOKENS)
    finally:
        engine.close()


LEADER = """
import sys, time
from pathlib import Path
from moe_core.deepspeed import DeepSpeedEngine

if __name__ == "__main__":
    engine = DeepSpeedEngine(Path(sys.argv[1]), device="cpu", tensor_parallel_size=2)
    engine.load()
    print("follower", engine.follower_pids[0], flush=True)
    time.sleep(600)
"""


def test_follower_exits_when_its_leader_dies(checkpoint: Path, tmp_path: Path) -> None:
    script = tmp_path / "leader.py"
    script.write_text(LEADER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("WORLD_SIZE", None)
    leader = subprocess.Popen(
        [sys.executable, str(script), str(checkpoint)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert leader.stdout is not None
        line = ""
        while not line.startswith("follower "):  # DeepSpeed prints to stdout too
            line = leader.stdout.readline()
            assert line, "the leader exited before loading"
        pid = int(line.split()[1])
        assert not _gone(pid)
        leader.kill()
        leader.wait()
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid)
    finally:
        leader.kill()
        leader.wait()


def test_a_worker_serves_through_two_ranks(service_env: dict[str, str], http: httpx.Client) -> None:
    """The whole path: a worker configured with DeepSpeed at tensor_parallel_size 2 (no launcher) takes
    a job through the API and answers what the shared single-process torch worker answers."""
    from tests.conftest import private_stack, wait_done

    body = {"prompt": "def add(a, b):\n", "max_tokens": 16}
    reference = wait_done(http, http.post("/v1/jobs", json=body).json()["id"])
    assert reference["status"] == "succeeded" and reference["engine"] == "torch"
    settings = {
        "LOCALMOE_ENGINE__BACKEND": "deepspeed",
        "LOCALMOE_ENGINE__DEEPSPEED__TENSOR_PARALLEL_SIZE": "2",
    }
    with private_stack(service_env, worker=True, **settings) as stack, stack.http() as client:
        job = wait_done(client, client.post("/v1/jobs", json=body).json()["id"])
    assert job["status"] == "succeeded" and job["engine"] == "deepspeed", job
    assert job["output"] == reference["output"]


def test_a_follower_that_cannot_start_fails_the_load_at_once(checkpoint: Path) -> None:
    """A leader run from stdin: "spawn" cannot re-import a main module that is no file, so rank 1 dies
    at start. The leader must say so at once, not wait out the rendezvous (300 s)."""
    script = (
        "from pathlib import Path\n"
        "from moe_core.deepspeed import DeepSpeedEngine\n"
        f"engine = DeepSpeedEngine(Path({str(checkpoint)!r}), device='cpu', tensor_parallel_size=2)\n"
        "try:\n"
        "    engine.load()\n"
        "except RuntimeError as e:\n"
        "    print('FAILED:', e)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120)
    assert "FAILED: tensor-parallel rank 1" in done.stdout and "exited with code" in done.stdout, done
    assert time.monotonic() - started < 60
