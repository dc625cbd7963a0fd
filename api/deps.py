"""Dependencies shared by the routes: the process's services and the job a path names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request

from api.admission import Admission
from api.auth import Caller, KeyStore
from api.openai.batch_store import BatchStore
from api.openai.file_store import FileStore
from api.store import JobStore
from host.config_store import ConfigWatcher
from host.settings import Settings
from scheduler.jobs import Job
from scheduler.notify import Notifier
from scheduler.queue import Enqueuer
from scheduler.routing import PromptCounter, Scheduler

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Services:
    settings: Settings  # the live settings: base_settings with the config store's overrides
    base_settings: Settings  # as started (YAML and environment)
    config_watcher: ConfigWatcher
    store: JobStore
    files: FileStore
    batches: BatchStore
    keys: KeyStore
    admission: Admission
    enqueuer: Enqueuer
    notifier: Notifier
    counter: PromptCounter
    scheduler: Scheduler

    def reconfigure(self, settings: Settings, _version: object = None) -> None:
        """A new config version: every part that keeps settings takes the new ones."""
        self.settings = settings
        self.scheduler.cfg = settings.scheduler
        self.admission.cfg = settings.limits
        self.store.ttl_s = self.enqueuer.ttl_s = settings.limits.job_ttl_s


async def get_services(request: Request) -> Services:  # async: a sync dependency costs a thread hop
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def existing_job(services: ServicesDep, caller: Caller, job_id: Annotated[str, Path()]) -> Job:
    """The job, if the caller may see it: its own, or any for an admin. Another key's job is
    "not found" too: its existence is not the caller's business."""
    job = await services.store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is not None and not caller.admin and job.owner != caller.id:
        job = None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or its results have expired)")
    return job


JobDep = Annotated[Job, Depends(existing_job)]
