"""How fast a GPU reads expert weights that live in pinned host memory (issue 24's batch-1 gap).

The expert cache (moe_core/vllm_expert_cache.py) first computed a missing expert in place: vLLM's
fused-MoE kernel ran a second time over a UVA view of the pinned host copy, reading PCIe as it
computed. Whether that way of reading, or the link, limits batch 1 is what this measures (on an
H100: the link; in place 46.5 GB/s, the gather of moe_core/expert_gather.py 50.5, the copy engine
54.5). It times, on one GPU, experts of the reference model's shape (w13 [2I, H], w2 [H, I], bf16;
69 MB an expert):

  copy      the copy engine: one expert host → device (`copy_` of pinned memory), GB/s
  gather    `triton_gather`: the cache's Triton kernel reading the experts a row map names from
            the host memory's mapped address into device rows (an expert mapped to -1: nothing), GB/s
  moe_uva   vLLM's fused-MoE kernel at batch 1, top-k of k experts, computing over the UVA view
            (the cache's in-place call), ms and the GB/s of the expert bytes it read
  moe_gpu   the same over device memory (what the compute costs with no PCIe in it)
  gather+moe  gather then moe over the slots: what the gather path would cost a layer

    python -m bench.uva_read [--experts 8] [--hidden 2048] [--intermediate 5632] [--topk 2] [--reps 20]
        [--no-vllm: copy and gather only, where vLLM is not installed] [--out FILE]

The timings need CUDA (the gather kernel is tested on the CPU under Triton's interpreter).
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from moe_core.expert_gather import triton_gather


def _timed(fn: Any, reps: int) -> float:
    """Median ms of `fn` over reps, CUDA events around each (after two untimed calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class _Mapped:
    """Pinned host memory as a Triton kernel argument, without vLLM: under CUDA's unified
    addressing its host address is the address the device reads it at (what vLLM's UVA view
    wraps)."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host, self.dtype = host, host.dtype

    def data_ptr(self) -> int:
        return int(self.host.data_ptr())

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.host[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-vllm", action="store_true", help="copy and gather only (no fused-MoE timings)")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the timings need CUDA (the gather kernel alone is tested on the CPU)")
    E, H, inter, k = args.experts, args.hidden, args.intermediate, args.topk
    dev = torch.device("cuda")
    host13 = torch.randn(E, 2 * inter, H, dtype=torch.bfloat16).mul_(0.02).pin_memory()
    host2 = torch.randn(E, H, inter, dtype=torch.bfloat16).mul_(0.02).pin_memory()
    slots13 = torch.empty(k, 2 * inter, H, dtype=torch.bfloat16, device=dev)
    slots2 = torch.empty(k, H, inter, dtype=torch.bfloat16, device=dev)
    rows = torch.full((E,), -1, dtype=torch.int32, device=dev)  # expert j < k → slot j, the others none
    rows[:k] = torch.arange(k, dtype=torch.int32, device=dev)
    expert_gb = (host13[0].numel() + host2[0].numel()) * 2 / 1e9
    # what the gather reads: the host memory at its mapped address (the one vLLM's UVA view holds)
    src13: Any = _Mapped(host13)
    src2: Any = _Mapped(host2)

    def copy() -> None:
        slots13[0].copy_(host13[0], non_blocking=True)
        slots2[0].copy_(host2[0], non_blocking=True)

    def gather() -> None:
        triton_gather(src13, slots13, rows)
        triton_gather(src2, slots2, rows)

    timings = {  # name → (ms, GB read)
        "copy": (_timed(copy, args.reps), expert_gb),
        "gather": (_timed(gather, args.reps), k * expert_gb),
    }
    if not args.no_vllm:
        timings |= _fused_moe_rows(args, host13, host2, slots13, slots2, rows, gather, k * expert_gb)
    gather()  # the slots hold what the host copy does
    torch.cuda.synchronize()
    assert torch.equal(slots13.cpu(), host13[:k]) and torch.equal(slots2.cpu(), host2[:k])
    results: dict[str, Any] = {"expert_gb": round(expert_gb, 4), "topk": k}
    for name, (ms, gb) in timings.items():
        results[name] = {"ms": round(ms, 3), "gb_per_s": round(gb / ms * 1000, 1)}
        print(f"  {name:10s} {ms:8.3f} ms  {gb * 1000:7.1f} MB  {gb / ms * 1000:6.1f} GB/s", flush=True)
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def _fused_moe_rows(
    args: argparse.Namespace,
    host13: torch.Tensor,
    host2: torch.Tensor,
    slots13: torch.Tensor,
    slots2: torch.Tensor,
    rows: torch.Tensor,
    gather: Any,
    read: float,
) -> dict[str, tuple[float, float]]:
    """vLLM's fused-MoE kernel over its UVA views (the cache's in-place call) and over device
    memory, and gather then compute, checked against in place; `rows`: the gather's map, which is
    also the kernel's expert map over the slots (expert j < k in slot j, the others -1); `read`:
    the GB the k experts hold."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

    E, k, dev = host13.shape[0], args.topk, slots13.device
    view13, view2 = get_accelerator_view_from_cpu_tensor(host13), get_accelerator_view_from_cpu_tensor(host2)
    gpu13, gpu2 = host13.to(dev), host2.to(dev)
    x = torch.randn(1, host13.shape[2], dtype=torch.bfloat16, device=dev)
    ids = torch.arange(k, dtype=torch.int32, device=dev).view(1, k)  # experts 0..k-1
    weights = torch.full((1, k), 1.0 / k, dtype=torch.float32, device=dev)
    with set_current_vllm_config(VllmConfig()):

        def moe(w13: torch.Tensor, w2: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
            out: torch.Tensor = fused_experts(
                x, w13, w2, weights, ids, global_num_experts=E, expert_map=expert_map
            )
            return out

        def gather_then_moe() -> None:
            gather()
            moe(slots13, slots2, rows)

        timings = {
            "moe_uva": (_timed(lambda: moe(view13, view2), args.reps), read),
            "moe_gpu": (_timed(lambda: moe(gpu13, gpu2), args.reps), read),
            "gather+moe": (_timed(gather_then_moe, args.reps), read),
        }
        gather()  # the gather path computes what the in-place call does
        torch.testing.assert_close(moe(slots13, slots2, rows), moe(view13, view2), atol=1e-2, rtol=1.6e-2)
    return timings


if __name__ == "__main__":
    main()
