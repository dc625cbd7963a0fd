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

Tensor parallelism (tensor_parallel_size N > 1): one process per rank, each with the whole
TorchEngine; `init_inference` shards the model across them (AutoTP, below) and every forward
all-reduces across the ranks, so all ranks must run the same `step()`s on the same batch.

* Without a launcher (WORLD_SIZE unset or 1, e.g. a worker): `DeepSpeedEngine(..., tensor_parallel_size=N)`
  (moe_core/deepspeed.py, the backend's entry point) returns a `TensorParallelEngine`
  (moe_core/tensor_parallel.py): this process is rank 0 and serves; it spawns ranks 1..N-1, which
  mirror its `add_request` / `abort` calls and steps, each running this module's `rank_engine`.
* With a launcher (`deepspeed --num_gpus N`, `torchrun --nproc-per-node N`, which set the variables
  above to a world of N): every rank gets the plain TorchEngine, as before; keeping the ranks in step
  is then the caller's business.

On CPU the ranks all-reduce over gloo: DeepSpeed's shared-memory all-reduce op is switched off (it
would compile C++ for ~60 s when the group forms; without it `inference_all_reduce` falls back to
torch.distributed.all_reduce).

What is split (DeepSpeed 0.19.8, transformers 5; measured on the tiny Mixtral at TP=2, and logged
at every load). AutoTP replaces `nn.Linear` layers only: attention q/k/v_proj become column-split
`LinearLayer`s (heads divided between the ranks), o_proj a row-split `LinearAllreduce`, lm_head a
row-split `LmHeadLinearAllreduce` (the vocabulary logits are all-reduced, so every rank holds all of
them and samples the same token). Transformers 5 keeps each layer's experts as fused 3-D parameters
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), which AutoTP would copy whole onto every rank —
on a Mixtral, where experts are ~96 % of the weights, TP would then save almost no memory. So
`shard_fused_experts` splits them first, Megatron-style (each rank keeps 1/N of every expert's
intermediate units and all-reduces its partial output): a TP=2 rank of the tiny Mixtral holds 2.46 M of
its 4.4 M parameters (4.04 M with AutoTP alone); the router, norms and embedding stay whole. Qwen2-MoE
also gets its shared expert's Linear layers split by AutoTP; greedy tokens equal transformers' at
TP=2 for both. OLMoE does not work under AutoTP: its q_norm/k_norm normalise over all heads, which
a rank no longer holds (load fails in the warm-up forward with a size mismatch).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from moe_core.loader import resolve_dtype
from moe_core.torch_engine import TorchEngine

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

Offload = Literal["none", "cpu", "nvme"]
OFFLOADS = ("none", "cpu", "nvme")


def available() -> tuple[bool, str]:
    """Whether deepspeed imports here, and what it is (or why not)."""
    try:
        import deepspeed
    except ImportError:
        return False, "deepspeed is not installed (pip install 'localmoe[deepspeed]')"
    except Exception as exc:  # deepspeed probes accelerators and compilers at import
        return False, f"deepspeed does not import: {type(exc).__name__}: {exc}"
    return True, f"deepspeed {deepspeed.__version__}"


def rank_engine(
    model_dir: Path,
    *,
    device: str,
    dtype: str,
    max_batch_size: int,
    tensor_parallel_size: int,
    offload: Offload = "none",
    nvme_path: Path | None = None,
    timeout: timedelta | None = None,
    before_join: Callable[[], None] | None = None,
) -> TorchEngine:
    """This process's TorchEngine over a DeepSpeed-wrapped model (one rank of a tensor-parallel
    group when tensor_parallel_size > 1). Arguments are checked by DeepSpeedEngine.

    timeout: bounds every collective of this process's groups (the world, and the tensor-parallel
    group that the forward's all-reduces use); None keeps DeepSpeed's and torch's defaults.
        before_join: called once the model is loaded, just before this process joins the process group
    (TensorParallelEngine: followers report it; the leader waits for it, watching them live).
    """
    torch_dtype = resolve_dtype(device, dtype)
    prepare = functools.partial(
        _prepare,
        device=device,
        dtype=torch_dtype,
        tp_size=tensor_parallel_size,
        offload=offload,
        nvme_path=nvme_path,
        timeout=timeout,
        before_join=before_join,
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


def tp_error(tp_size: int, world_size: int) -> str:
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
    timeout: timedelta | None = None,
    before_join: Callable[[], None] | None = None,
) -> torch.nn.Module:
    """TorchEngine's `prepare`: join the process group, then wrap the loaded model."""
    if before_join is not None:
        before_join()
    deepspeed = _init_distributed(device, timeout)
    world_size = deepspeed.comm.get_world_size()
    if tp_size > world_size:
        raise ValueError(tp_error(tp_size, world_size))
    log.info(
        "deepspeed on %s: world size %d, tensor parallel %d, offload %s", device, world_size, tp_size, offload
    )
    if offload == "none":
        buffers = dict(model.named_buffers())
        whole = sum(p.numel() for p in model.parameters())
        if tp_size > 1:
            _bounded_tp_group(tp_size, timeout)  # made here so that the experts' all-reduce uses it too
            shard_fused_experts(model, deepspeed.comm.get_rank(), tp_size, _tp_group())
        # An InferenceEngine: its forward(**kwargs) calls the (tensor-parallel) model's.
        inference: torch.nn.Module = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False
        )
        _restore_buffer_dtypes(model, buffers)
        if tp_size > 1:
            _log_sharding(model, whole, deepspeed.comm.get_rank())
        return inference
    return _zero3_inference(deepspeed, model, dtype, offload, nvme_path)


def _bounded_tp_group(tp_size: int, timeout: timedelta | None) -> None:
    """Give init_inference a tensor-parallel group whose collectives time out after `timeout`
    (None: torch's default).

    InferenceEngine caches its group in the class attribute `inference_mp_group` and creates it
    with torch's default timeout (30 min for gloo, 10 for nccl) when unset; a follower that hangs
    would stall the leader's forward that long. Collective: every rank calls it, in the same order.
    """
    from deepspeed.inference.engine import InferenceEngine

    if not hasattr(InferenceEngine, "inference_mp_group"):
        log.warning("this DeepSpeed has no InferenceEngine.inference_mp_group: default collective timeout")
        return
    InferenceEngine.inference_mp_group = torch.distributed.new_group(list(range(tp_size)), timeout=timeout)


def _tp_group() -> Any:
    """The group AutoTP's all-reduces use (None: the world, which is the TP group when not bounded)."""
    from deepspeed.inference.engine import InferenceEngine

    return getattr(InferenceEngine, "inference_mp_group", None)


def shard_fused_experts(model: torch.nn.Module, rank: int, world: int, group: Any = None) -> int:
    """Split every fused-experts module's intermediate dimension across the `world` ranks; returns how
    many modules were split.

    AutoTP only splits nn.Linear layers, and transformers 5 keeps a layer's experts as two fused 3-D
    parameters (Mixtral, Qwen2-MoE: gate_up_proj [E, 2I, H] — gate rows then up rows — and down_proj
    [E, H, I]), so it would copy all experts whole onto every rank. Split Megatron-style instead, for
    every expert at once: rank r keeps gate and up rows [r·I/N, (r+1)·I/N) → gate_up_proj [E, 2I/N, H],
    and the same columns of down_proj → [E, H, I/N]; its output is then a partial sum over its share
    of the intermediate units, and a forward hook all-reduces it. Every rank runs the router and
    every expert a token picks (no load imbalance, unlike placing whole experts per rank). Modules with
    expert biases or another layout are left whole (logged)."""
    count = 0
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter)):
            continue
        if gate_up.dim() != 3 or down.dim() != 3:
            continue
        experts, two_i, hidden = gate_up.shape
        inner = two_i // 2
        biased = any(getattr(module, b, None) is not None for b in ("gate_up_proj_bias", "down_proj_bias"))
        if biased or two_i % 2 or tuple(down.shape) != (experts, hidden, inner) or inner % world:
            log.warning(
                "%s: fused experts of shape %s / %s left whole on every rank", name, gate_up.shape, down.shape
            )
            continue
        n = inner // world
        lo, hi = rank * n, (rank + 1) * n
        with torch.no_grad():
            local = torch.cat([gate_up[:, lo:hi], gate_up[:, inner + lo : inner + hi]], dim=1)
            module.gate_up_proj = torch.nn.Parameter(local.contiguous(), requires_grad=False)
            module.down_proj = torch.nn.Parameter(down[:, :, lo:hi].contiguous(), requires_grad=False)
        if hasattr(module, "intermediate_dim"):
            module.intermediate_dim = n

        def all_reduce(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            torch.distributed.all_reduce(output, group=group)
            return output

        module.register_forward_hook(all_reduce)
        count += 1
    return count


def forget_tp_group() -> None:
    """Drop InferenceEngine's cached group (before its process group is destroyed), so a later
    init_inference in this process makes one in its new group."""
    from deepspeed.inference.engine import InferenceEngine

    if hasattr(InferenceEngine, "inference_mp_group"):
        InferenceEngine.inference_mp_group = None


def _log_sharding(model: torch.nn.Module, whole: int, rank: int) -> None:
    """Log what AutoTP replaced (DeepSpeed's sharded layer classes) and this rank's share."""
    replaced = Counter(
        type(m).__name__ for m in model.modules() if type(m).__module__.startswith("deepspeed.")
    )
    held = sum(p.numel() for p in model.parameters())
    log.info(
        "tensor parallel rank %d: AutoTP layers %s, fused experts split by shard_fused_experts; holds "
        "%.2f M of the model's %.2f M parameters (router, norms, embedding are replicated on every rank)",
        rank,
        dict(replaced) or "none",
        held / 1e6,
        whole / 1e6,
    )


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
    model.eval()
    return model


def _init_distributed(device: str, timeout: timedelta | None = None) -> Any:
    """Join (or create) the process group DeepSpeed needs; returns the deepspeed module.

    timeout: the group's collective (and rendezvous) timeout; None: DeepSpeed's default."""
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
        os.environ["MASTER_PORT"] = str(free_port())

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if (accelerator == "cpu") != on_cpu:
        raise RuntimeError(
            f"DeepSpeed runs on its {accelerator!r} accelerator but the engine's device is {device!r}"
            " (DS_ACCELERATOR selects the accelerator before deepspeed is first imported)"
        )
    if on_cpu:
        # On CPU, joining the group compiles a shared-memory all-reduce kernel (~60 s, needs a C++
        # compiler). A group of one never uses it; without it a larger group's inference all-reduce
        # falls back to torch.distributed.all_reduce over gloo. DeepSpeed keeps this probe's
        # answers editable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if timeout is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(timeout=timeout)
    local_rank = int(os.environ["LOCAL_RANK"])
    if not on_cpu:
        index = torch.device(device).index
        if index is not None and index != local_rank:
            raise ValueError(f"device {device!r} is not this process's GPU (LOCAL_RANK {local_rank})")
        get_accelerator().set_device(local_rank)
    return deepspeed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
