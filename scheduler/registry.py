"""The worker registry: each worker's heartbeat record in Redis, read by the API and the router."""

from __future__ import annotations

from pydantic import BaseModel, Field

HEARTBEAT_S = 1.0  # a worker beats this often
STALE_AFTER_S = 3 * HEARTBEAT_S  # three missed beats and the worker counts as gone
RECORD_TTL_S = 10  # the heartbeat key outlives a few missed beats, then Redis drops it


class WorkerInfo(BaseModel):
    name: str
    pid: int
    queues: list[str]
    engine: str
    engine_reason: str = Field("", description="Why this engine: the automatic choice, or a fallback.")
    device: str
    model: str
    max_context: int
    capacity: int = Field(description="Jobs the engine decodes together (its batch size).")
    ready: bool = Field(description="Engine loaded and warmed up; consuming jobs.")
    started_at: float
    heartbeat_at: float
    running: int = 0
    waiting: int = 0
    max_batch_seen: int = 0
    tokens_generated: int = 0
    tokens_per_s: float = 0.0
    failovers: int = Field(0, description="Engine switches since the worker started.")
    expert_tokens: dict[str, list[list[int]]] = Field(
        default_factory=dict,
        description="Per modality, [layer][expert] tokens routed there (expert telemetry).",
    )

    def fresh(self, now: float) -> bool:
        return now - self.heartbeat_at <= STALE_AFTER_S
