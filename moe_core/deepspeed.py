"""The DeepSpeed backend's entry point: `DeepSpeedEngine(...)`.

One rank's engine (moe_core/deepspeed_engine.py: the torch batcher over `init_inference` or
ZeRO-3 offload), or, for tensor_parallel_size N > 1 outside a launcher's world, a
`TensorParallelEngine` (moe_core/tensor_parallel.py) that starts the other N - 1 ranks itself. It
sits above both modules, so neither imports the other's caller: tensor_parallel builds on
deepspeed_engine's rank engine, and nothing below points back up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, overload

from moe_core.deepspeed_engine import OFFLOADS, Offload, available, rank_engine, tp_error
from moe_core.tensor_parallel import TensorParallelEngine
from moe_core.torch_engine import TorchEngine

__all__ = ["DeepSpeedEngine", "Offload", "available"]


@overload
def DeepSpeedEngine(
    model_dir: Path,
    *,
    device: str,
    dtype: str = ...,
    max_batch_size: int = ...,
    tensor_parallel_size: Literal[1] = ...,
    offload: Offload = ...,
    nvme_path: Path | None = ...,
) -> TorchEngine: ...


@overload
def DeepSpeedEngine(
    model_dir: Path,
    *,
    device: str,
    dtype: str = ...,
    max_batch_size: int = ...,
    tensor_parallel_size: int,
    offload: Offload = ...,
    nvme_path: Path | None = ...,
) -> TorchEngine | TensorParallelEngine: ...


def DeepSpeedEngine(
    model_dir: Path,
    *,
    device: str,
    dtype: str = "auto",
    max_batch_size: int = 64,
    tensor_parallel_size: int = 1,
    offload: Offload = "none",
    nvme_path: Path | None = None,
) -> TorchEngine | TensorParallelEngine:
    """An engine named "deepspeed" whose model runs under DeepSpeed (moe_core/deepspeed_engine.py).

    device: "cpu", "cuda" or "cuda:N" — where the forward runs (with a launcher, cuda:LOCAL_RANK).
    dtype: as for TorchEngine ("auto" is bfloat16 on CUDA, float32 on CPU), also under offload.
    tensor_parallel_size: N > 1 outside a launcher's world gives a TensorParallelEngine (N processes).
    offload: "none" (init_inference, tensor parallel) or where ZeRO-3 keeps the parameters.
    nvme_path: a folder on a fast local disk, required by offload "nvme".
    """
    if offload not in OFFLOADS:
        raise ValueError(f"unknown offload {offload!r}; expected one of {', '.join(OFFLOADS)}")
    if offload == "nvme" and nvme_path is None:
        raise ValueError("offload 'nvme' needs nvme_path: a folder on a fast local disk")
    if tensor_parallel_size < 1:
        raise ValueError("tensor_parallel_size must be >= 1")
    if tensor_parallel_size > 1 and offload != "none":
        raise ValueError("ZeRO-3 offload runs in one process: it needs tensor_parallel_size 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel_size > 1 and world_size == 1:  # no launcher: start the ranks ourselves
        return TensorParallelEngine(
            model_dir,
            device=device,
            dtype=dtype,
            max_batch_size=max_batch_size,
            tensor_parallel_size=tensor_parallel_size,
        )
    if tensor_parallel_size > world_size:
        raise ValueError(tp_error(tensor_parallel_size, world_size))
    return rank_engine(
        model_dir,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        tensor_parallel_size=tensor_parallel_size,
        offload=offload,
        nvme_path=nvme_path,
    )
