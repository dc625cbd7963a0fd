"""DeepSpeedEngine on tiny random MoE checkpoints (CPU, float32, DeepSpeed's CPU accelerator, gloo).

It is TorchEngine's continuous batching over a DeepSpeed-wrapped model, so its greedy tokens must
equal transformers generate(), as TorchEngine's do (same helpers as tests/test_torch_engine.py).
Tensor parallelism across processes: tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Chosen once, at deepspeed's first import; a CPU test must not get the CUDA accelerator on a GPU box.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip(
    "deepspeed", reason="deepspeed is not installed (the optional extra: pip install -e '.[deepspeed]')"
)

from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402

from moe_build.checkpoint import build_checkpoint  # noqa: E402
from moe_core.deepspeed import DeepSpeedEngine, Offload, available  # noqa: E402
from moe_core.engine import GenerationRequest, SamplingParams  # noqa: E402
from moe_core.tensor_parallel import TensorParallelEngine  # noqa: E402
from moe_core.torch_engine import TorchEngine  # noqa: E402
from tests.parity import (  # noqa: E402
    ARCH_PARAMS,
    LOGITS_OPTIONS,
    adjusted_reference,
    assert_logprobs_close,
    assert_n_sequences,
    assert_obeys,
    reference_prompt_logprobs,
    structured_requests,
)
from tests.test_torch_engine import (  # noqa: E402
    LATE_PROMPTS,
    NEW_TOKENS,
    PROMPTS,
    Result,
    _assert_matches,
    _collect,
    _greedy,
    _reference,
    _run,
)


@pytest.fixture(scope="module", params=ARCH_PARAMS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch: str = request.param
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / arch, arch=arch, progress=False)


@pytest.fixture(scope="module")
def references(checkpoint: Path) -> dict[str, list[int]]:
    """generate() of the plain transformers model, per prompt."""
    plain = TorchEngine(checkpoint)
    plain.load()
    return {prompt: _reference(plain, prompt) for prompt in PROMPTS + LATE_PROMPTS}


def _batched_run_matches(engine: TorchEngine, references: dict[str, list[int]]) -> None:
    """8 prompts at once (the engine holds 8 rows), 4 more joining while they decode."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(_greedy(f"a{i}", prompt))
    results: dict[str, Result] = {}
    for _ in range(3):
        _collect(engine, results)
    for i, prompt in enumerate(LATE_PROMPTS):
        engine.add_request(_greedy(f"b{i}", prompt))
    while engine.has_unfinished():
        _collect(engine, results)
    for i, prompt in enumerate(PROMPTS):
        _assert_matches(engine, results[f"a{i}"], references[prompt], NEW_TOKENS)
    for i, prompt in enumerate(LATE_PROMPTS):
        _assert_matches(engine, results[f"b{i}"], references[prompt], NEW_TOKENS)
    assert engine.stats().max_batch_seen == 8


def test_available() -> None:
    assert available() == (True, f"deepspeed {deepspeed.__version__}")


def test_init_inference_batches_and_matches_generate(
    checkpoint: Path, references: dict[str, list[int]]
) -> None:
    engine = DeepSpeedEngine(checkpoint, device="cpu", dtype="auto", max_batch_size=8)
    engine.load()
    assert engine.name == "deepspeed"
    assert isinstance(engine.model, deepspeed.InferenceEngine)  # every forward goes through it
    assert engine.max_context == engine.model.module.config.max_position_embeddings
    _batched_run_matches(engine, references)


def test_zero3_cpu_offload_batches_and_matches_generate(
    checkpoint: Path, references: dict[str, list[int]]
) -> None:
    engine = DeepSpeedEngine(checkpoint, device="cpu", dtype="auto", max_batch_size=8, offload="cpu")
    engine.load()
    assert engine.name == "deepspeed"
    ds_engine = engine.model.ds_engine  # the model itself runs, with ZeRO-3's hooks
    assert ds_engine.module is engine.model
    assert ds_engine.zero_optimization_stage() == 3
    assert ds_engine.zero_offload_param().device == "cpu"
    _batched_run_matches(engine, references)
    # Between steps every parameter is a ZeRO-3 partition in CPU memory; all but the small ones that
    # ZeRO keeps gathered (norms, routers) hold no data in the model itself.
    threshold = ds_engine.zero_param_persistence_threshold()
    params = list(engine.model.parameters())
    assert all(p.ds_tensor is not None and p.ds_tensor.device.type == "cpu" for p in params)
    large = [p for p in params if p.ds_numel >= threshold]
    assert large and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in large)


def test_logits_options_and_structured_outputs_as_the_torch_engine(checkpoint: Path) -> None:
    """Penalties, logit_bias, min_tokens, stop_token_ids, structured outputs: TorchEngine's batcher
    does them; through DeepSpeed's forward they give transformers' answer with the same options,
    and every constrained answer obeys its constraint."""
    engine = DeepSpeedEngine(checkpoint, device="cpu", dtype="auto", max_batch_size=8)
    engine.load()
    eos = {engine.tokenizer.eos_token_id}
    requests, expected = [], {}
    for i, options in enumerate(LOGITS_OPTIONS):
        prompt = PROMPTS[i % len(PROMPTS)]
        requests.append(GenerationRequest(f"o{i}", prompt, SamplingParams(max_tokens=NEW_TOKENS, **options)))  # type: ignore[arg-type]
        module = engine.model.module  # the transformers model inside DeepSpeed's wrapper
        expected[f"o{i}"] = adjusted_reference(module, engine.tokenizer, prompt, NEW_TOKENS, eos, **options)
    constrained = structured_requests()
    results = _run(engine, requests + constrained)
    assert {r: results[r].token_ids for r in expected} == expected
    for request in constrained:
        assert request.params.structured is not None
        assert_obeys(request.params.structured, results[request.request_id].text)
    assert_n_sequences(lambda requests: {r: x.token_ids for r, x in _run(engine, requests).items()})


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_prompt_logprobs_through_deepspeed(checkpoint: Path, offload: str) -> None:
    """Scoring the prompt asks DeepSpeed's forward (init_inference, or ZeRO-3 with its weights in
    CPU memory) for every position's logits: the same as a plain forward over the prompt."""
    engine = DeepSpeedEngine(checkpoint, device="cpu", dtype="auto", max_batch_size=8, offload=offload)
    engine.load()
    reference = TorchEngine(checkpoint)
    reference.load()
    prompt = PROMPTS[2]
    want = reference_prompt_logprobs(reference.model, reference.tokenizer, prompt, 2)
    results = _run(engine, [GenerationRequest("s", prompt, SamplingParams(max_tokens=2, prompt_logprobs=2))])
    assert_logprobs_close(results["s"].prompt_logprobs, want)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_bfloat16_keeps_float32_buffers_and_matches_the_torch_engine(
    checkpoint: Path, offload: Offload
) -> None:
    """init_inference casts the whole module to its dtype; the rotary inv_freq must stay float32."""
    plain = TorchEngine(checkpoint, dtype="bfloat16")
    plain.load()
    engine = DeepSpeedEngine(checkpoint, device="cpu", dtype="bfloat16", offload=offload)
    engine.load()
    model = engine.model.module if offload == "none" else engine.model
    assert next(model.parameters()).dtype == torch.bfloat16
    buffer_dtypes = {name: buffer.dtype for name, buffer in model.named_buffers()}
    assert buffer_dtypes == {name: buffer.dtype for name, buffer in plain.model.named_buffers()}
    assert torch.float32 in buffer_dtypes.values()
    prompts = PROMPTS + LATE_PROMPTS  # one batch: bf16 tokens depend on the batch's shapes
    want = _run(plain, [_greedy(f"p{i}", p) for i, p in enumerate(prompts)])
    got = _run(engine, [_greedy(f"p{i}", p) for i, p in enumerate(prompts)])
    assert {k: r.token_ids for k, r in got.items()} == {k: r.token_ids for k, r in want.items()}


def test_bad_configurations_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs nvme_path"):
        DeepSpeedEngine(tmp_path, device="cpu", offload="nvme")
    with pytest.raises(ValueError, match="unknown offload"):
        DeepSpeedEngine(tmp_path, device="cpu", offload="disk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        DeepSpeedEngine(tmp_path, device="cpu", tensor_parallel_size=2, offload="cpu")
    with pytest.raises(ValueError, match="rank i on cuda:i"):
        DeepSpeedEngine(tmp_path, device="cuda:1", tensor_parallel_size=2)


def test_tensor_parallelism_starts_its_own_ranks_outside_a_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No launcher (WORLD_SIZE unset or 1): a TensorParallelEngine, which spawns its ranks at load
    (tests/test_tensor_parallel.py); in a launcher's world each rank gets its own TorchEngine."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    engine = DeepSpeedEngine(tmp_path, device="cpu", tensor_parallel_size=2)
    assert isinstance(engine, TensorParallelEngine) and engine.name == "deepspeed"
    assert engine.follower_pids == []  # nothing starts before load()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert isinstance(DeepSpeedEngine(tmp_path, device="cpu", tensor_parallel_size=2), TorchEngine)
    with pytest.raises(ValueError, match="tensor_parallel_size 4 needs 4 processes"):
        DeepSpeedEngine(tmp_path, device="cpu", tensor_parallel_size=4)
