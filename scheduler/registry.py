"""The worker registry: each worker's heartbeat record in Redis, read by the API and the router.

A worker writes its record (WorkerInfo, JSON, expiring) and its score in the WORKERS sorted set
every HEARTBEAT_S; readers treat a record older than STALE_AFTER_S (three missed beats) as gone.
"""

from __future__ import annotations

from typing import Any

import redis
from pydantic import BaseModel, Field, computed_field

from host.gpus import GpuStats
from host.settings import Offload
from scheduler import keys

HEARTBEAT_S = 1.0  # a worker beats this often
STALE_AFTER_S = 3 * HEARTBEAT_S  # three missed beats and the worker counts as gone
RECORD_TTL_S = 10  # the heartbeat key outlives a few missed beats, then Redis drops it
LEASE_S = 10  # a worker silent this long has lost its jobs: the reaper runs them elsewhere


class WorkerInfo(BaseModel):
    name: str
    pid: int
    queues: list[str]
    engine: str
    engine_reason: str = Field("", description="Why this engine: the automatic choice, or a fallback.")
    offload: Offload = Field(
        "none",
        description="Where the serving engine keeps the weights that do not fit engine.gpu_memory_budget_gb: "
        "none (all on the GPU), vllm_cpu (vLLM's cpu_offload_gb: pinned CPU memory the GPU reads at "
        "every step), zero3 (DeepSpeed ZeRO-3: every weight streamed from CPU memory or NVMe).",
    )
    cpu_offload_gb: float = Field(0.0, description="vllm_cpu: GiB of weights per GPU in CPU memory.")
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
    steps: int = Field(0, description="Engine steps (forward passes) since the worker started.")
    tokens_generated: int = 0
    tokens_per_s: float = 0.0
    failovers: int = Field(0, description="Engine switches since the worker started.")
    tokens_in_flight: int = Field(
        0, description="Tokens its running jobs may still generate (max_tokens left)."
    )
    cost_in_flight: float = Field(
        0.0,
        description="The work its held jobs still need, in the router's cost units (decode tokens): the "
        "tokens they may still generate, plus prefill_weight for each prompt token not yet prefilled "
        "(a job with no token yet).",
    )
    batch_occupancy: float = Field(0.0, description="running / capacity.")
    kv_usage: float | None = Field(
        None, description="Share of the KV cache in use (engines that manage one)."
    )
    prefix_caching: bool = Field(
        False,
        description="The engine reuses the KV of a prompt prefix it computed recently (vLLM's automatic "
        "prefix caching): the router counts the prefix it probably holds as needing no prefill.",
    )
    kv_block_size: int | None = Field(
        None, description="Tokens per KV-cache block (engines that manage blocks)."
    )
    kv_blocks: int | None = Field(None, description="KV-cache blocks the engine holds.")
    prompt_tokens: int = Field(0, description="Prompt tokens of the requests the engine has prefilled.")
    cached_tokens: int = Field(0, description="Of those, found in its prefix cache (no prefill).")
    prefix_hit_rate: float | None = Field(
        None,
        description="cached_tokens / prompt_tokens over the last minute or so (EWMA over heartbeats); "
        "None until the engine with a prefix cache prefilled anything.",
    )
    expert_cache_hit_rate: float | None = Field(
        None,
        description="engine.offload experts: the share of the experts its MoE layers needed that were "
        "on the GPU already, over the last minute or so (EWMA over heartbeats); None without the cache.",
    )
    expert_cache_needed: int = Field(0, description="Experts the MoE layers' forwards needed so far.")
    expert_cache_hits: int = Field(0, description="Of those, on the GPU already.")
    expert_cache_fetched_bytes: int = Field(
        0, description="Expert weights copied from CPU memory to the GPU so far (needed or prefetched)."
    )
    expert_cache_in_place_bytes: int = Field(
        0,
        description="Expert weights a kernel read from CPU memory where they are, so far (the vLLM "
        "engine's cache computes the experts a step lacks in place).",
    )
    step_rate: float = Field(
        0.0, description="Engine steps per second while busy (EWMA): one token per running job per step."
    )
    busy_tokens_per_s: float = Field(0.0, description="Tokens per second while busy (EWMA).")
    peak_cost_per_s: float = Field(
        0.0,
        description="The most work per busy second it has done lately, in the router's cost units (tokens "
        "generated plus prefill_weight for each prompt token computed): the largest of its heartbeats' "
        "figures, each beat's old peak decaying by 2 %. The router drains the prompts ahead of a new "
        "job no faster than this; 0 until measured.",
    )
    expert_tokens: dict[str, list[list[int]]] = Field(
        default_factory=dict,
        description="Per modality, [layer][expert] tokens routed there (expert telemetry).",
    )
    experts_per_token: int = Field(1, description="Routed experts each token goes to (top-k).")
    shared_experts: int = Field(
        0, description="Experts every token of a MoE layer goes through besides its routed ones."
    )
    modality_mix: dict[str, float] = Field(
        default_factory=dict,
        description="Expert-load profile: each modality's share of the tokens this worker's experts "
        "saw recently (EWMA over heartbeats; sums to 1 when any were seen).",
    )
    gpus: list[GpuStats] = Field(default_factory=list, description="NVML telemetry; empty without a GPU.")

    @computed_field(  # type: ignore[prop-decorator]
        description="Per modality, [layer] tokens the shared experts processed (each token once per "
        "shared expert; not in expert_tokens, which counts routed choices only)."
    )
    @property
    def shared_expert_tokens(self) -> dict[str, list[int]]:
        return shared_tokens(self.expert_tokens, self.experts_per_token, self.shared_experts)

    def fresh(self, now: float) -> bool:
        return now - self.heartbeat_at <= STALE_AFTER_S


def decode_workers(records: list[Any], now: float, fresh_only: bool = True) -> list[WorkerInfo]:
    """Heartbeat records as MGET returns them (None where one expired) → the workers, the fresh
    ones only unless told otherwise."""
    workers = [WorkerInfo.model_validate_json(r) for r in records if r]
    return [w for w in workers if w.fresh(now) or not fresh_only]


def read_workers(client: redis.Redis, now: float) -> list[WorkerInfo]:
    """The fresh workers' records (synchronous client: the router's thread; the API's routes read
    through api/store.py)."""
    names = client.zrangebyscore(keys.WORKERS, now - STALE_AFTER_S, "+inf")
    if not names:
        return []
    return decode_workers(client.mget([keys.worker(n) for n in names]), now)  # type: ignore[arg-type]


def queued_costs(client: redis.Redis, names: list[str]) -> dict[str, float]:
    """Per worker, the summed cost of the jobs routed to its own queue and not yet claimed."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hvals(keys.queued(name))
    return {n: sum(float(v) for v in vals) for n, vals in zip(names, pipe.execute(), strict=True)}


def layer_totals(expert_tokens: dict[str, list[list[int]]]) -> dict[str, int]:
    """Per modality, tokens routed in the first MoE layer (each token once per top-k choice)."""
    return {tag: sum(layers[0]) if layers else 0 for tag, layers in expert_tokens.items()}


def shared_tokens(
    expert_tokens: dict[str, list[list[int]]], experts_per_token: int, shared_experts: int
) -> dict[str, list[int]]:
    """Per modality, per MoE layer, the tokens its shared experts processed: every token the layer
    routed (its routed choices ÷ top-k) once per shared expert. {} for a model without any."""
    if shared_experts <= 0:
        return {}
    k = max(experts_per_token, 1)
    return {
        tag: [sum(counts) // k * shared_experts for counts in layers] for tag, layers in expert_tokens.items()
    }


def update_mix(
    mix: dict[str, float], before: dict[str, int], after: dict[str, int], alpha: float = 0.3
) -> dict[str, float]:
    """EWMA of each modality's share of the tokens seen between two heartbeats; unchanged when
    none were seen (an idle worker keeps its profile)."""
    delta = {tag: after.get(tag, 0) - before.get(tag, 0) for tag in after}
    total = sum(max(0, d) for d in delta.values())
    if total <= 0:
        return mix
    share = {tag: max(0, d) / total for tag, d in delta.items()}
    if not mix:
        return share
    tags = set(mix) | set(share)
    return {t: (1 - alpha) * mix.get(t, 0.0) + alpha * share.get(t, 0.0) for t in tags}
