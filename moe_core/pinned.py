"""Host buffers for a step's small copies to the device, kept between steps.

A copy from pinned host memory is queued on the stream and the host goes on; from pageable memory
the host waits for the driver to stage it. But allocating pinned memory at every step costs more
than either: on an H100, vLLM's per-step pinned allocation of a structured step's masks held its
engine thread ~2.3 ms a step (BENCHMARKS.md, "Structured outputs"). `PinnedTurns` allocates once
and hands out its buffers in turn; each is handed out again only after the copies queued out of
it have run (an event recorded when they were queued, waited on before the buffer is rewritten:
with two buffers that is two steps later, long done in practice, so the wait costs nothing but
makes the reuse safe).
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedTurns:
    """`turns` host buffers [capacity, *row] of one dtype, handed out in turn (`take`); on CUDA
    pinned, each with the event of the copies out of it (`queued`). On the CPU one plain buffer:
    copies from it are done when they return. The capacity grows to the largest take."""

    def __init__(self, row: tuple[int, ...], dtype: torch.dtype, cuda: bool, turns: int = 2) -> None:
        self.row, self.dtype, self.cuda = row, dtype, cuda
        self.turns = turns if cuda else 1
        self.buffers: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event] = []  # CUDA: one per buffer (a never-recorded one: no wait)
        self.turn = -1  # the buffer last taken

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[0] if self.buffers else 0

    def _allocate(self, rows: int) -> None:
        for event in self.events:
            event.synchronize()  # no queued copy still reads a buffer given back
        capacity = max(rows, 2 * self.capacity)
        shape = (capacity, *self.row)
        self.buffers = [torch.empty(shape, dtype=self.dtype, pin_memory=self.cuda) for _ in range(self.turns)]
        if self.cuda:
            self.events = [torch.cuda.Event() for _ in range(self.turns)]  # type: ignore[no-untyped-call]

    def take(self, rows: int) -> torch.Tensor:
        """The next buffer's first `rows` rows, free to write: no copy queued out of it is pending."""
        if rows > self.capacity or not self.buffers:
            self._allocate(max(rows, 1))
        self.turn = (self.turn + 1) % self.turns
        if self.cuda:
            self.events[self.turn].synchronize()
        return self.buffers[self.turn][:rows]

    def queued(self) -> None:
        """The copies out of the buffer last taken are queued on the current stream."""
        if self.cuda:
            self.events[self.turn].record()

    def send(self, rows: np.ndarray | list[int], out: torch.Tensor) -> torch.Tensor:
        """`rows` ([n, *row]) into `out` (n rows, on the device) by way of the next buffer: on CUDA
        the copy is queued on the current stream, not waited for; returns `out`."""
        host = self.take(len(rows))
        host.numpy()[:] = rows
        out.copy_(host, non_blocking=self.cuda)
        self.queued()
        return out
