"""Typed messages between a worker's two processes, sent as JSON over one duplex pipe.

consumer process (Celery)              engine process (engine, loop, relay, heartbeats)
  Submit([Claimed(job, attempt, resume)...]) ─▶  (the jobs of one Celery message)
  ConsumerReady               ─────▶   (heartbeats say ready from now on)
  Shutdown                    ─────▶   (exits; so does it when the pipe closes)
                              ◀─────   EngineReady(info)    once loaded and warmed up
                              ◀─────   Finished(job_id, status)   after the terminal write
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

from scheduler.jobs import Job, JobStatus
from scheduler.registry import WorkerInfo


class Claimed(BaseModel):
    """A job this worker claimed: its attempt, and what earlier attempts streamed."""

    job: Job
    attempt: int
    resume_text: str = ""  # what earlier attempts streamed: this one continues after it
    resume_tokens: int = 0  # the tokens that text took


class Submit(BaseModel):
    kind: Literal["submit"] = "submit"
    jobs: list[Claimed]


class ConsumerReady(BaseModel):
    kind: Literal["consumer_ready"] = "consumer_ready"


class Shutdown(BaseModel):
    kind: Literal["shutdown"] = "shutdown"


class EngineReady(BaseModel):
    kind: Literal["engine_ready"] = "engine_ready"
    info: WorkerInfo


class Finished(BaseModel):
    kind: Literal["finished"] = "finished"
    job_id: str
    status: JobStatus
    completion_tokens: int


Message = Annotated[Submit | ConsumerReady | Shutdown | EngineReady | Finished, Field(discriminator="kind")]
MESSAGE: TypeAdapter[Submit | ConsumerReady | Shutdown | EngineReady | Finished] = TypeAdapter(Message)
