"""Which API process runs which batch: the runs of this process, their leases, and taking over
the batches whose run died.

A batch is made holding a lease for the run that the process accepting it starts
(keys.batch_lease: the run's id, expiring `batches.lease_s` after its last renewal). The run renews
it every third of that while it lives; a run that finds its lease gone (it was paused past it,
or Redis lost it) stops, since another may hold the batch now. An API process that stops gives
its leases back (the jobs of the lines in flight run on). Every API process looks through the
open batches at start and every half lease: one that no run holds (its process died, or stopped)
it takes and runs from where it was (batch_runner.py resumes from the batch's status and ledger).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Annotated

from fastapi import Depends, Request

from api.auth import ApiKey
from api.deps import Services
from api.openai import batch_runner
from api.openai.batch_store import BatchRecord
from api.stream_hub import RESTARTING

log = logging.getLogger(__name__)

STALE_PIN_S = 3600.0  # a pinned input no open batch names is removed after this long


def new_run_id() -> str:
    """A run's id, the lease's value: "<host>:<pid>:<random>", so an operator (or a test) can
    tell which process holds a batch."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class BatchRuns:
    """This API process's batch runs. `services`: the process's (settings, stores)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.runs: dict[str, asyncio.Task[None]] = {}  # batch id → its run with its lease

    @property
    def lease_s(self) -> float:
        return self.services.settings.batches.lease_s

    def max_batches(self, caller: ApiKey) -> int:
        """How many batches not yet ended the key may have."""
        return caller.limits.max_batches or self.services.settings.batches.per_key_max_batches

    async def create(self, record: BatchRecord, caller: ApiKey) -> int | None:
        """The new batch, held and run by this process, unless its key has as many batches not
        yet ended as it may. → None when made, else how many it has."""
        self.services.files.pin(record.input_file_id, record.id)  # before it is listed
        run_id = new_run_id()
        ttl_s = self.services.settings.limits.file_ttl_s
        most = self.max_batches(caller)
        refused = await self.services.batches.create(record, ttl_s, run_id, self.lease_s, most)
        if refused is not None:
            self.services.files.unpin(record.id)
            return refused
        self._start(record, caller, run_id)
        return None

    def _start(self, batch: BatchRecord, caller: ApiKey, run_id: str) -> None:
        task = asyncio.create_task(self._hold(batch, caller, run_id), name=f"batch {batch.id}")
        self.runs[batch.id] = task
        task.add_done_callback(lambda _: self.runs.pop(batch.id, None))

    async def _hold(self, batch: BatchRecord, caller: ApiKey, run_id: str) -> None:
        """The run, while this process holds its lease; the lease given back when it ends."""
        path = self.services.files.pinned(batch.id)
        run = asyncio.create_task(batch_runner.run(self.services, caller, batch, path))
        renewed = time.monotonic()
        try:
            while True:
                await asyncio.wait({run}, timeout=self.lease_s / 3)
                if run.done():
                    break
                try:
                    if not await self.services.batches.renew(batch.id, run_id, self.lease_s):
                        log.warning("batch %s: its lease was lost; another run takes it over", batch.id)
                        break
                    renewed = time.monotonic()
                except RESTARTING:
                    if time.monotonic() - renewed > self.lease_s:
                        log.warning("batch %s: its lease could not be renewed; stopping its run", batch.id)
                        break
        finally:  # also when this process stops (cancelled once: what follows may await)
            run.cancel()
            await asyncio.wait({run})
            with contextlib.suppress(*RESTARTING):
                await self.services.batches.release(batch.id, run_id)  # taken over at once
        if not run.cancelled() and (e := run.exception()) is not None:
            log.error("batch %s: its run failed", batch.id, exc_info=e)

    async def take_over(self) -> None:
        """Runs every open batch that no run holds (and that this process can take first)."""
        store = self.services.batches
        for batch_id in await store.unheld():
            if batch_id in self.runs:  # this process's own run, its lease lapsed: it stops itself
                continue
            batch = await store.record(batch_id)
            if batch is None:
                await store.forget(batch_id)
                continue
            caller = await self.services.keys.by_id(batch.owner)
            if caller is None:
                log.error("batch %s: its API key %s does not exist; it cannot run", batch_id, batch.owner)
                continue
            run_id = new_run_id()
            if not await store.take(batch_id, run_id, self.lease_s):
                continue
            log.info("batch %s: taking it over", batch_id)
            self._start(batch, caller, run_id)

    async def watch_forever(self) -> None:
        """take_over at once, then every half lease (the API process's lifespan runs it)."""
        while True:
            try:
                await self.take_over()
                self.services.files.drop_pins(await self.services.batches.open_ids(), STALE_PIN_S)
            except Exception:  # Redis restarting: the next round catches up
                log.warning("looking for batches to take over failed", exc_info=True)
            await asyncio.sleep(self.lease_s / 2)

    async def stop(self) -> None:
        """Stops every run of this process and gives its lease back."""
        runs = list(self.runs.values())
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)


async def get_batch_runs(request: Request) -> BatchRuns:
    runs: BatchRuns = request.app.state.batch_runs
    return runs


BatchRunsDep = Annotated[BatchRuns, Depends(get_batch_runs)]
