"""Build the worker's engine from settings: choose the backend, construct it, load it, and fall
back along the choice's list when loading fails."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from host.settings import EngineSettings, Offload
from moe_core.choice import GIB, Backend, Budget, Choice, choose
from moe_core.engine import Engine
from moe_core.failover import FailoverEngine
from moe_core.loader import inspect_model
from scheduler.jobs import Priority

log = logging.getLogger(__name__)


def offload_of(backend: Backend, choice: Choice | None, cfg: EngineSettings) -> Offload:
    """How `backend` holds the weights when it serves for this choice (None: everything on the
    GPU): vLLM offloads what the choice counted or keeps the routed experts in CPU memory (its
    expert cache); DeepSpeed runs ZeRO-3 for a model that does not fit, as a fallback too, or
    wherever engine.deepspeed.offload says; torch keeps routed experts in CPU memory where the
    choice says so (its expert cache), else offloads nothing."""
    if backend == "vllm":
        if choice is not None and choice.offload == "experts":
            return "experts"
        return "vllm_cpu" if choice is not None and choice.cpu_offload_gb > 0 else "none"
    if backend == "deepspeed":
        overflows = choice is not None and choice.offload != "none"
        return "zero3" if overflows or cfg.deepspeed.offload != "none" else "none"
    return "experts" if choice is not None and choice.offload == "experts" else "none"


def budget_of(cfg: EngineSettings) -> Budget:
    """The memory plan's view of the settings: the budget is per GPU, the weights spread over the
    engine's tensor-parallel GPUs."""
    tp = cfg.deepspeed if cfg.backend == "deepspeed" else cfg.vllm
    return Budget(
        gpu_bytes=int(cfg.gpu_memory_budget_gb * 1e9),
        gpus=1 if cfg.backend == "torch" else tp.tensor_parallel_size,
        max_batch_size=cfg.max_batch_size,
        max_num_batched_tokens=cfg.vllm.max_num_batched_tokens,
        act_bytes=4 if cfg.dtype == "float32" else 2,
    )


def construct(
    backend: Backend,
    model_dir: Path,
    device: str,
    cfg: EngineSettings,
    choice: Choice | None = None,
    batch_rows: int | None = None,
) -> Engine:
    """choice: the one that named this backend or a fallback of it (None: all weights on the GPU);
    batch_rows: the rows the batch tier's jobs may hold in a vLLM engine (the others preempt them)."""
    offload = offload_of(backend, choice, cfg)
    # the batch tier's rows beside urgent work: (rows, hold_s), None: all it has
    yielding = None if cfg.batch_yield_rows is None else (cfg.batch_yield_rows, cfg.batch_yield_hold_s)
    if backend == "vllm":
        from moe_core.vllm_engine import VllmEngine

        v = cfg.vllm
        moved = choice if choice is not None and offload == "vllm_cpu" else None
        cached = choice if choice is not None and offload == "experts" else None
        planned = moved or cached  # a choice that planned vLLM's KV cache
        # the KV cache size asked for replaces the plan's
        asked = int(v.kv_cache_memory_gb * GIB) if v.kv_cache_memory_gb is not None else None
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
            structured_masks=v.structured_masks,
            enable_prefix_caching=v.enable_prefix_caching,
            # a checkpoint quantized already is read as its config says: vLLM refuses a second method
            quantization=v.quantization if inspect_model(model_dir).quantization is None else None,
            cpu_offload_gb=moved.cpu_offload_gb if moved else 0.0,
            kv_cache_memory_bytes=asked or (planned.kv_cache_bytes if planned else None),
            batch_rows=batch_rows,
            batch_rank=Priority.BATCH.rank,
            batch_preemption=v.batch_preemption,
            batch_yield=yielding,
            expert_cache=cached.resident_fraction if cached else None,
            expert_cache_misses=cfg.expert_cache.misses,
            expert_cache_admission=cfg.expert_cache.admission,
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
            offload="cpu" if offload == "zero3" and d.offload == "none" else d.offload,
            nvme_path=d.nvme_path,
        )
    from moe_core.torch_engine import TorchEngine

    return TorchEngine(
        model_dir,
        device=device,
        dtype=cfg.dtype,
        max_batch_size=cfg.max_batch_size,
        expert_cache=choice.resident_fraction if choice is not None and offload == "experts" else None,
        batch_yield=None if yielding is None else (Priority.BATCH.rank, *yielding),
    )


def start_engine(
    model_dir: Path, device: str, cfg: EngineSettings, batch_rows: int | None = None
) -> tuple[Engine, Choice]:
    """Choose and load. The engine returned fails over along the choice's list: at load, and at
    run time when its steps keep failing (moe_core/failover.py). batch_rows: see construct."""
    model = inspect_model(model_dir)
    choice = choose(
        cfg.backend,
        model,
        device,
        budget_of(cfg),
        quantize=cfg.vllm.quantization,
        offload=cfg.offload,
        resident_fraction=cfg.expert_cache.resident_fraction,
        misses=cfg.expert_cache.misses,
    )
    log.info("engine choice: %s, offload %s (%s)", choice.backend, choice.offload, choice.reason)
    order = (choice.backend, *choice.fallbacks)
    builders = [
        (b, functools.partial(construct, b, model_dir, device, cfg, choice, batch_rows)) for b in order
    ]
    engine = FailoverEngine(builders, max_failures=cfg.max_step_failures, cooldown_s=cfg.failover_cooldown_s)
    engine.load()
    return engine, choice
