"""The DeepSpeed engine: the PyTorch engine's continuous batching over a DeepSpeed-wrapped model.

There is no second batcher. `TorchEngine` batches by calling the model's forward with a DynamicCache
(one left-padded prefill of the admitted prompts, then one [B, 1] decode step over every running
request); DeepSpeed only changes what that forward runs on:

* offload "none": `deepspeed.init_inference` (no kernel injection, so any transformers architecture
  works and greedy tokens equal transformers'), with tensor parallelism of `tensor_parallel_size`;
* offload "cpu" / "nvme": ZeRO stage-3 inference ("ZeRO-Inference") for a model larger than the GPU:
  every parameter lives in CPU memory (or in files under `nvme_path`) and each layer's parameters are
  gathered onto the GPU just before that layer runs and released after the forward. Every decode
  step streams the whole model (all experts: they are one fused tensor per layer) over PCIe once, so
  a large batch is what makes it pay: all running requests share each transfer. Within one forward
  ZeRO keeps up to `stage3_max_live_parameters` (default 1e9 elements, 2 GB in bf16) gathered: an
  H200 held 0 bytes of a 1.17 GB bf16 model between steps and all of it at the peak; capped at 1e7 the
  peak was 0.15 GB (one layer) at about the same speed. "nvme" needs libaio (libaio-dev) and builds
  DeepSpeed's async_io op on first use (a C++ compiler; 3.5 min on a 2-core CPU, then cached).

Distributed set-up. DeepSpeed always runs inside a torch.distributed group. A single process needs
no launcher: `load()` fills in MASTER_ADDR, MASTER_PORT (a free port), RANK, WORLD_SIZE and LOCAL_RANK
where they are not set and joins a group of one (gloo on CPU, nccl on CUDA).

Tensor parallelism (tensor_parallel_size > 1) needs one process per GPU, started by a launcher
(`deepspeed --num_gpus N ...` or `torchrun --nproc-per-node N ...`, which set the variables above).
Not built yet; a worker doing it would: build and load this engine in every rank; let rank 0 alone
take jobs and, before each `step()`, broadcast that step's `add_request` / `abort` calls to the other
ranks (`torch.distributed.broadcast_object_list`), with an explicit seed for every sampled request so
that all ranks pick the same tokens; call `step()` in every rank (the forward's all-reduces pair
ranks up, so every rank must run the same steps on the same batch); publish deltas from rank 0 only.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from moe_core.loader import resolve_dtype
from moe_core.torch_engine import TorchEngine

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

Offload = Literal["none", "cpu", "nvme"]
_OFFLOADS = ("none", "cpu", "nvme")


def available() -> tuple[bool, str]:
    """Whether deepspeed imports here, and what it is (or why not)."""
    try:
        import deepspeed
    except ImportError:
        return False, "deepspeed is not installed (pip install 'localmoe[deepspeed]')"
    except Exception as exc:  # deepspeed probes accelerators and compilers at import
        return False, f"deepspeed does not import: {type(exc).__name__}: {exc}"
    return True, f"deepspeed {deepspeed.__version__}"


def DeepSpeedEngine(
    model_dir: Path,
    *,
    device: str,
    dtype: str = "auto",
    max_batch_size: int = 64,
    tensor_parallel_size: int = 1,
    offload: Offload = "none",
    nvme_path: Path | None = None,
) -> TorchEngine:
    """A TorchEngine named "deepspeed" whose model runs under DeepSpeed (see the module docstring).

    device: "cpu", "cuda" or "cuda:N" — where the forward runs (with a launcher, cuda:LOCAL_RANK).
    dtype: as for TorchEngine ("auto" is bfloat16 on CUDA, float32 on CPU), also under offload.
    offload: "none" (init_inference, tensor parallel) or where ZeRO-3 keeps the parameters.
    nvme_path: a folder on a fast local disk, required by offload "nvme".
    """
    if offload not in _OFFLOADS:
        raise ValueError(f"unknown offload {offload!r}; expected one of {', '.join(_OFFLOADS)}")
    if offload == "nvme" and nvme_path is None:
        raise ValueError("offload 'nvme' needs nvme_path: a folder on a fast local disk")
    if tensor_parallel_size < 1:
        raise ValueError("tensor_parallel_size must be >= 1")
    if tensor_parallel_size > 1 and offload != "none":
        raise ValueError("ZeRO-3 offload runs in one process: it needs tensor_parallel_size 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel_size > world_size:
        raise ValueError(_tp_error(tensor_parallel_size, world_size))
    torch_dtype = resolve_dtype(device, dtype)
    prepare = functools.partial(
        _prepare,
        device=device,
        dtype=torch_dtype,
        tp_size=tensor_parallel_size,
        offload=offload,
        nvme_path=nvme_path,
    )
    # Tensor parallelism and offload split the model before it reaches the GPU: load it into CPU memory.
    load_device = device if tensor_parallel_size == 1 and offload == "none" else "cpu"
    return TorchEngine(
        model_dir,
        device=load_device,
        dtype=str(torch_dtype).removeprefix("torch."),
        max_batch_size=max_batch_size,
        prepare=prepare,
        name="deepspeed",
    )


def _tp_error(tp_size: int, world_size: int) -> str:
    return (
        f"tensor_parallel_size {tp_size} needs {tp_size} processes (one per GPU) started by a launcher "
        f"(deepspeed --num_gpus {tp_size}, torchrun --nproc-per-node {tp_size}); this one runs in a "
        f"world of {world_size}"
    )


def _prepare(
    model: PreTrainedModel,
    *,
    device: str,
    dtype: torch.dtype,
    tp_size: int,
    offload: Offload,
    nvme_path: Path | None,
) -> torch.nn.Module:
    """TorchEngine's `prepare`: join the process group, then wrap the loaded model."""
    deepspeed = _init_distributed(device)
    world_size = deepspeed.comm.get_world_size()
    if tp_size > world_size:
        raise ValueError(_tp_error(tp_size, world_size))
    log.info(
        "deepspeed on %s: world size %d, tensor parallel %d, offload %s", device, world_size, tp_size, offload
    )
    if offload == "none":
        buffers = dict(model.named_buffers())
        # An InferenceEngine: its forward(**kwargs) calls the (tensor-parallel) model's.
        inference: torch.nn.Module = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False
        )
        _restore_buffer_dtypes(model, buffers)
        return inference
    return _zero3_inference(deepspeed, model, dtype, offload, nvme_path)


def _restore_buffer_dtypes(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back buffers that init_inference cast to its dtype along with the weights.

    transformers keeps some in float32 (rotary inv_freq); in bfloat16 the rounded frequencies change
    the greedy tokens (measured: 8 of 12 equal to transformers' on a tiny Mixtral, 12 of 12 restored).
    """
    for name, buffer in list(model.named_buffers()):
        original = originals.get(name)
        if original is not None and original.dtype != buffer.dtype:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, original.to(buffer.device))


def _zero3_inference(
    deepspeed: Any, model: PreTrainedModel, dtype: torch.dtype, offload: Offload, nvme_path: Path | None
) -> torch.nn.Module:
    """ZeRO-Inference: turn the CPU-resident model's parameters into offloaded ZeRO-3 partitions.

    Returns the model itself: the documented ZeRO-Inference call is `ds_engine.module(...)`, whose
    forward hooks gather each layer's parameters onto the device and release them after it.
    """
    from deepspeed.accelerator import get_accelerator

    on_gpu = get_accelerator().device_name() != "cpu"
    offload_param: dict[str, Any] = {"device": offload, "pin_memory": on_gpu}
    if offload == "nvme":
        assert nvme_path is not None
        Path(nvme_path).mkdir(parents=True, exist_ok=True)
        offload_param["nvme_path"] = str(nvme_path)
    config = {
        "train_micro_batch_size_per_gpu": 1,  # required by the config, unused without training
        "zero_optimization": {"stage": 3, "offload_param": offload_param},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    # Partition first, one parameter at a time: deepspeed.initialize moves a model that is not yet
    # partitioned to the GPU whole, which a model larger than the GPU cannot survive.
    deepspeed.zero.Init(module=model, config_dict_or_path=config)
    compute = torch.device(get_accelerator().current_device_name())
    for submodule in model.modules():  # buffers (rotary inv_freq, ...) are not partitioned
        for name, buffer in submodule.named_buffers(recurse=False):
            setattr(submodule, name, buffer.to(compute))
    ds_engine = deepspeed.initialize(model=model, config=config)[0]
    # The model must keep its DeepSpeedEngine alive, whose destructor removes the hooks; a plain
    # attribute, not a registered submodule (the engine holds the model: modules() would loop).
    object.__setattr__(model, "ds_engine", ds_engine)
    return model.eval()


def _init_distributed(device: str) -> Any:
    """Join (or create) the process group DeepSpeed needs; returns the deepspeed module."""
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at deepspeed's first import
    # Without a launcher: a group of one, this process.
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", str(torch.device(device).index or 0)),
    ):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if (accelerator == "cpu") != on_cpu:
        raise RuntimeError(
            f"DeepSpeed runs on its {accelerator!r} accelerator but the engine's device is {device!r}"
            " (DS_ACCELERATOR selects the accelerator before deepspeed is first imported)"
        )
    if on_cpu and int(os.environ["WORLD_SIZE"]) == 1:
        # On CPU, joining the group compiles a shared-memory all-reduce kernel (~60 s, needs a C++
        # compiler) that a group of one never uses. DeepSpeed keeps this probe's answers editable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()
    local_rank = int(os.environ["LOCAL_RANK"])
    if not on_cpu:
        index = torch.device(device).index
        if index is not None and index != local_rank:
            raise ValueError(f"device {device!r} is not this process's GPU (LOCAL_RANK {local_rank})")
        get_accelerator().set_device(local_rank)
    return deepspeed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
