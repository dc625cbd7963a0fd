"""The fused-MoE tuner's CPU-runnable part: the model's expert shape, the search, the file.

The kernel timer itself needs CUDA and vLLM (its GPU run is in BENCHMARKS.md); here the search runs
over cost landscapes whose optimum is known, through the same `tune()` the GPU path calls. That
vLLM reads the written file is checked in tests/test_vllm_engine.py, where vLLM is installed.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from moe_build import moe_tuning
from moe_build.checkpoint import ARCHS, build_checkpoint
from moe_build.moe_tuning import SPACE, Config, MoeShape
from moe_core import moe_configs

SHAPE = MoeShape(experts=8, intermediate=5632, hidden=2048, top_k=2, dtype="bfloat16")


def vllm_like_default(m: int) -> Config:
    """The shape of vLLM's get_default_config for bf16 (small tiles for small M)."""
    return {
        "BLOCK_SIZE_M": 16 if m <= 32 else 64,
        "BLOCK_SIZE_N": 64 if m <= 64 else 128,
        "BLOCK_SIZE_K": 128 if m <= 64 else 64,
        "GROUP_SIZE_M": 1,
        "SPLIT_K": 1,
        "num_warps": 4,
        "num_stages": 4 if m <= 32 else 3,
    }


def bowl(target: Config, broken: set[tuple[str, int]] = frozenset()) -> moe_tuning.Memo:  # type: ignore[assignment]
    """A separable cost with its minimum at `target` (1 s there); configs holding a (key, value)
    of `broken` do not run (inf), like a tile that exceeds shared memory."""

    def cost(config: Config) -> float:
        if any((k, v) in broken for k, v in config.items()):
            return math.inf
        return 1.0 + sum((math.log2(config[k]) - math.log2(target[k])) ** 2 for k in target)

    return moe_tuning.Memo(cost)


@pytest.mark.slow  # a checkpoint per architecture
def test_moe_shape_of_each_architecture(tmp_path: Path) -> None:
    shapes = {
        arch: moe_configs.moe_shape(build_checkpoint(tmp_path / arch, arch=arch, progress=False))
        for arch in ARCHS
    }
    # the tiny checkpoints: hidden 128, 8 experts, top-2; qwen2_moe's routed experts use
    # moe_intermediate_size (128), not the dense intermediate_size (256)
    assert shapes["mixtral"] == MoeShape(8, 256, 128, 2, "bfloat16")
    assert shapes["qwen2_moe"] == MoeShape(8, 128, 128, 2, "bfloat16")
    assert shapes["olmoe"] == MoeShape(8, 256, 128, 2, "bfloat16")
    for arch in ("qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"):  # moe_intermediate_size, too
        assert shapes[arch] == MoeShape(8, 128, 128, 2, "bfloat16"), arch
    for arch in ("phimoe", "granitemoe", "gpt_oss"):
        assert shapes[arch] == MoeShape(8, 256, 128, 2, "bfloat16"), arch
    mixtral = tmp_path / "mixtral"
    assert moe_configs.moe_shape(mixtral, tensor_parallel_size=2).intermediate == 128  # TP splits N
    ep = moe_configs.moe_shape(mixtral, tensor_parallel_size=4, enable_expert_parallel=True)
    assert (ep.experts, ep.intermediate) == (2, 256)  # EP splits the experts, N stays whole
    with pytest.raises(ValueError, match="split"):
        moe_configs.moe_shape(mixtral, tensor_parallel_size=3)
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text('{"hidden_size": 64, "intermediate_size": 128}')
    with pytest.raises(ValueError, match="mixture-of-experts"):
        moe_configs.moe_shape(tmp_path / "dense")


def test_kernel_warm_up_sizes_meet_every_config_in_each_residue() -> None:
    """The vLLM engine warms its fused-MoE kernels with one step of each of these sizes: each run
    of sizes sharing a config starts 16 consecutive sizes (every divisibility by 16 Triton
    specializes on), up to the most one step holds."""

    def config_of(m: int) -> dict[str, int]:
        return {"BLOCK_SIZE_M": 16 if m <= 32 else 32 if m <= 96 else 64}

    sizes = moe_configs.kernel_batch_sizes(config_of, 200)
    assert sizes == [*range(1, 17), *range(33, 49), *range(97, 113)]
    assert moe_configs.kernel_batch_sizes(config_of, 40) == [*range(1, 17), *range(33, 41)]
    assert {m % 16 for m in sizes if m >= 97} == set(range(16))
    # a config that comes back after another starts a run of its own
    assert moe_configs.kernel_batch_sizes(lambda m: {"A": int(20 <= m < 40)}, 45) == [
        *range(1, 17),
        *range(20, 36),
        *range(40, 46),
    ]


def test_candidates_prune_what_cannot_help() -> None:
    one = moe_tuning.candidates(1, SHAPE)
    assert one["BLOCK_SIZE_M"] == (16,)  # 2 rows at most per expert: the smallest tile
    assert one["GROUP_SIZE_M"] == (1,)  # one tile of rows per expert: nothing to group
    assert one["BLOCK_SIZE_N"] == SPACE["BLOCK_SIZE_N"]
    mid = moe_tuning.candidates(24, SHAPE)  # 48 rows: tiles up to 64
    assert mid["BLOCK_SIZE_M"] == (16, 32, 64)
    assert moe_tuning.candidates(4096, SHAPE) == SPACE


def test_descend_finds_the_optimum_and_times_each_config_once() -> None:
    target = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1}
    target |= {"num_warps": 8, "num_stages": 3}
    memo = bowl(target)
    best, best_s = moe_tuning.descend(memo, moe_tuning._searchable(vllm_like_default(1)), SPACE)
    assert best == target and best_s == 1.0
    # one sweep over every value of every key, a second that confirms: no config timed twice
    assert len(memo.times) <= 1 + sum(len(v) - 1 for v in SPACE.values()) * 2


def test_descend_skips_configs_that_do_not_run() -> None:
    target = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1}
    target |= {"num_warps": 4, "num_stages": 5}
    memo = bowl(target, broken={("num_stages", 5)})
    best, best_s = moe_tuning.descend(memo, moe_tuning._searchable(vllm_like_default(1)), SPACE)
    assert best["num_stages"] != 5 and math.isfinite(best_s)
    assert best_s == min(t for t in memo.times.values())


def test_tune_searches_some_batch_sizes_and_keeps_vllms_default_elsewhere() -> None:
    def target(m: int) -> Config:
        return {
            "BLOCK_SIZE_M": 16 if m < 64 else 64,
            "BLOCK_SIZE_N": 32 if m < 8 else 128,
            "BLOCK_SIZE_K": 256 if m < 64 else 64,
            "GROUP_SIZE_M": 1 if m < 64 else 16,
            "num_warps": 4 if m < 64 else 8,
            "num_stages": 3,
        }

    lines: list[str] = []
    result = moe_tuning.tune(
        SHAPE,
        [1, 4, 512],
        default_config=vllm_like_default,
        measure_for=lambda m: bowl(target(m)),
        progress=lines.append,
    )
    assert set(result.configs) == set(moe_tuning.BATCH_SIZES)
    for m in (1, 4, 512):
        assert result.configs[m] == target(m)
    for m in set(moe_tuning.BATCH_SIZES) - {1, 4, 512}:
        assert result.configs[m] == moe_tuning._searchable(vllm_like_default(m))
    assert [t.m for t in result.tuned] == [1, 4, 512]
    assert all(t.best_s == 1.0 and t.speedup > 1 for t in result.tuned)
    assert len(lines) == 3 and lines[0].startswith("[1/3] M=1: default")


def test_tune_keeps_the_default_when_nothing_beats_it() -> None:
    result = moe_tuning.tune(
        SHAPE,
        [2],
        default_config=vllm_like_default,
        measure_for=lambda m: bowl(moe_tuning._searchable(vllm_like_default(m))),
        file_batch_sizes=[2],
    )
    assert result.configs == {2: moe_tuning._searchable(vllm_like_default(2))}
    assert result.tuned[0].speedup == 1.0


def test_tune_refuses_when_the_default_does_not_run() -> None:
    with pytest.raises(RuntimeError, match="default config does not run"):
        moe_tuning.tune(
            SHAPE,
            [1],
            default_config=vllm_like_default,
            measure_for=lambda m: moe_tuning.Memo(lambda c: math.inf),
        )


def test_written_file_reads_back(tmp_path: Path) -> None:
    configs = {1: {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32}, 4096: {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128}}
    path = moe_tuning.write_configs(tmp_path / "new", "E=8,N=5632,device_name=X.json", configs, "3.6.0")
    assert path.parent == tmp_path / "new" and not list(path.parent.glob("*.tmp"))
    assert '"triton_version": "3.6.0"' in path.read_text()
    assert moe_tuning.read_configs(path) == configs


def test_tuned_config_dir_defaults_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from host.settings import Settings

    monkeypatch.setenv("LOCALMOE_HOME", str(tmp_path))
    assert Settings().engine.vllm.tuned_config_dir == tmp_path / "moe-configs"
    monkeypatch.setenv("LOCALMOE_ENGINE__VLLM__TUNED_CONFIG_DIR", str(tmp_path / "elsewhere"))
    assert Settings().engine.vllm.tuned_config_dir == tmp_path / "elsewhere"


def test_cli_says_what_tuning_needs(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the command would tune")
    run = subprocess.run(
        [sys.executable, "-m", "localmoe", "tune-moe", "--model-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "needs a CUDA GPU with vLLM" in run.stderr


def test_tune_stops_at_its_time_budget() -> None:
    lines: list[str] = []
    result = moe_tuning.tune(
        SHAPE,
        [1, 2, 4],
        default_config=vllm_like_default,
        measure_for=lambda m: bowl({**moe_tuning._searchable(vllm_like_default(m)), "num_warps": 8}),
        time_budget_s=0.0,
        progress=lines.append,
    )
    assert result.tuned == [] and lines == ["time budget of 0s spent: M >= 1 keep vLLM's default"]
    assert result.configs[1] == moe_tuning._searchable(vllm_like_default(1))
