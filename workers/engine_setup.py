"""Build the worker's engine from settings: choose the backend, construct it, load it, and fall
back along the choice's list when loading fails."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from host.settings import EngineSettings
from moe_core.choice import Backend, Choice, choose
from moe_core.engine import Engine
from moe_core.failover import FailoverEngine
from moe_core.loader import inspect_model

log = logging.getLogger(__name__)


def construct(backend: Backend, model_dir: Path, device: str, cfg: EngineSettings, offload: bool) -> Engine:
    if backend == "vllm":
        from moe_core.vllm_engine import VllmEngine

        v = cfg.vllm
        return VllmEngine(
            model_dir,
            device=device,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            tensor_parallel_size=v.tensor_parallel_size,
            enable_expert_parallel=v.enable_expert_parallel,
            gpu_memory_utilization=v.gpu_memory_utilization,
            max_num_batched_tokens=v.max_num_batched_tokens,
            enforce_eager=v.enforce_eager,
            tuned_config_dir=v.tuned_config_dir,
            expert_telemetry=v.expert_telemetry,
            structured_outputs_backend=v.structured_outputs_backend,
            enable_prefix_caching=v.enable_prefix_caching,
            # a checkpoint quantized already is read as its config says: vLLM refuses a second method
            quantization=v.quantization if inspect_model(model_dir).quantization is None else None,
        )
    if backend == "deepspeed":
        from moe_core.deepspeed import DeepSpeedEngine

        d = cfg.deepspeed
        return DeepSpeedEngine(
            model_dir,
            device=device,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            tensor_parallel_size=d.tensor_parallel_size,
            offload="cpu" if offload and d.offload == "none" else d.offload,
            nvme_path=d.nvme_path,
        )
    from moe_core.torch_engine import TorchEngine

    return TorchEngine(model_dir, device=device, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size)


def start_engine(model_dir: Path, device: str, cfg: EngineSettings) -> tuple[Engine, Choice]:
    """Choose and load. The engine returned fails over along the choice's list: at load, and at
    run time when its steps keep failing (moe_core/failover.py)."""
    budget = int(cfg.gpu_memory_budget_gb * 1e9)
    choice = choose(cfg.backend, inspect_model(model_dir), device, budget, quantize=cfg.vllm.quantization)
    log.info("engine choice: %s (%s)", choice.backend, choice.reason)
    order = (choice.backend, *choice.fallbacks)
    builders = [
        (b, functools.partial(construct, b, model_dir, device, cfg, choice.offload and i == 0))
        for i, b in enumerate(order)
    ]
    engine = FailoverEngine(builders, max_failures=cfg.max_step_failures, cooldown_s=cfg.failover_cooldown_s)
    engine.load()
    return engine, choice
