"""The `localmoe` command's pieces that need no running service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localmoe.up import visible_gpus, worker_plan
from moe_build.checkpoint import is_checkpoint
from moe_core.loader import inspect_model
from scheduler.queue import make_celery


@pytest.mark.slow  # a `localmoe model init` process per architecture, 8 s each
@pytest.mark.parametrize(
    ("arch", "model_type"), [("qwen2_moe", "qwen2_moe"), ("olmoe", "olmoe"), ("qwen3_moe", "qwen3_moe")]
)
def test_model_init_builds_each_arch(tmp_path: Path, arch: str, model_type: str) -> None:
    out = tmp_path / arch
    run = subprocess.run(
        [sys.executable, "-m", "localmoe", "model", "init", "--arch", arch, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "training tokenizer" in run.stdout + run.stderr  # progress is shown
    assert is_checkpoint(out)
    info = inspect_model(out)
    assert (info.arch, info.num_experts, info.experts_per_token) == (model_type, 8, 2)
    again = subprocess.run(
        [sys.executable, "-m", "localmoe", "model", "init", "--arch", arch, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "already holds a model" in again.stdout + again.stderr


def test_one_worker_per_gpu_each_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert worker_plan(visible_gpus()) == [("gpu0", "0"), ("gpu1", "1"), ("gpu2", "2"), ("gpu3", "3")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert worker_plan(visible_gpus()) == [("cpu0", "")]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert worker_plan(visible_gpus()) == [("cpu0", "")]  # no NVIDIA driver on this machine


def test_celery_is_json_only_and_acks_late() -> None:
    conf = make_celery("redis://127.0.0.1:1/0").conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1


def test_bad_config_fails_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "LOCALMOE_ENGINE__MAX_BATCH_SIZE": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "localmoe", "submit", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "max_batch_size" in run.stderr
    missing = {**os.environ, "LOCALMOE_CONFIG": str(tmp_path / "nope.yaml")}
    run = subprocess.run(
        [sys.executable, "-m", "localmoe", "submit", "hi"],
        env=missing,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "nope.yaml" in run.stderr
