"""The expert cache's other miss path on vLLM (engine.expert_cache.misses gather): the experts a
step needs and the GPU does not hold, gathered from pinned host memory into device scratch rows,
then computed there.

The default reads a missing expert in place (vLLM's fused-MoE kernel over a UVA view of host
memory, in the kernel's own tile order). On an H100 that reads 46.5 GB/s at batch 1, this gather
50.5 and the gather then the kernel over device memory 48.5 (the copy engine: 54.5; `python -m
bench.uva_read`), and the cache made the same tokens/s either way (BENCHMARKS.md), so the gather is
the choice only where a GPU's in-place reads prove slower. Both steps are kernels whose launch
reads nothing back to the host, so vLLM's CUDA graphs capture them.

Shapes: a layer of E experts with S device slots has at most E - S experts outside its slots,
plus the slots whose copy is still on its way (their old expert gone, the new one not landed).
The scratch holds `scratch_rows(E, S)` rows, which leaves SPARE_SLOTS copies in flight per layer;
`SlotTable.settle` is given the limit that keeps every miss a row. One scratch serves every layer
of a model: its layers run one after another on one stream.
"""

from __future__ import annotations

from typing import Any

import torch

GATHER_BLOCK = 8192  # elements a program copies: 16 KB of bf16, read as wide sequential loads
SPARE_SLOTS = 2  # copies into a layer's slots that may be on their way at once


def scratch_rows(experts: int, slots: int) -> int:
    """The scratch rows a layer of `experts` with `slots` device slots needs: every expert outside
    its slots, and SPARE_SLOTS slots between two experts."""
    return min(experts, experts - slots + SPARE_SLOTS)


def miss_rows(needed: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    """needed [E] bool (routed to this step), slot_row [E] (its slot, -1 while not resident) →
    [E] int32: each needed expert outside the slots its scratch row (0, 1, ... in expert order),
    -1 for the others. On the device, no host read."""
    miss = needed & (slot_row < 0)
    return torch.where(miss, miss.cumsum(0) - 1, -1).to(torch.int32)


def _kernel() -> Any:
    """The Triton kernel (made on first use: importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    # no annotations on the arguments (Triton compiles what they say): untyped for mypy
    @triton.jit  # type: ignore[untyped-decorator]
    def gather(src, dst, rows, n, k_rows, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        # program (e, c): chunk c of expert e from src [E, n] into dst row rows[e] of [K, n];
        # rows[e] < 0 (or past K): nothing
        e = tl.program_id(0)
        c = tl.program_id(1)
        row = tl.load(rows + e)
        if row >= 0 and row < k_rows:
            offs = c * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            values = tl.load(src + e.to(tl.int64) * n + offs, mask=mask)
            tl.store(dst + row.to(tl.int64) * n + offs, values, mask=mask)

    return gather


_GATHER: Any = None


def gather_experts(src: Any, dst: torch.Tensor, rows: torch.Tensor) -> None:
    """dst[rows[e]] = src[e] for each expert e whose rows[e] ≥ 0; other rows of dst untouched.
    src [E, ...]: on CUDA a UVA view of pinned host memory, dst [K, ...] of the same row shape,
    rows [E] int32 on dst's device. On CUDA `triton_gather`; elsewhere torch's indexing (vLLM's
    CPU build: the experts are in host memory already, and there are no graphs to capture)."""
    assert dst[0].numel() == src[0].numel() and rows.dim() == 1 and src.dtype == dst.dtype
    if dst.device.type == "cuda":
        triton_gather(src, dst, rows)
        return
    take = (rows >= 0).nonzero().squeeze(1)
    dst.index_copy_(0, rows[take].long(), src.index_select(0, take))


def triton_gather(src: Any, dst: torch.Tensor, rows: torch.Tensor) -> None:
    """gather_experts as one Triton kernel that reads nothing back to the host (a CUDA graph
    captures it); src may be anything a Triton kernel reads by address (a UVA view). Runs wherever
    Triton does (its CPU interpreter included)."""
    global _GATHER
    if _GATHER is None:
        _GATHER = _kernel()
    n = src[0].numel()
    grid = (rows.numel(), -(-n // GATHER_BLOCK))
    _GATHER[grid](src, dst, rows, n, dst.shape[0], BLOCK=GATHER_BLOCK)
