"""Prometheus exporters of the worker processes: a worker's runtime process, the webhook worker.

A worker's series, every one labelled worker="<name>", come from two places:
- observed as things happen: queue time when the runtime process takes a job (`started`), and per
  relay batch (one call per batch of engine steps, on the relay thread) TTFT, inter-token
  latency, batch sizes and tokens (`delivered`), end-to-end latency and finish reasons
  (`finished`). The engine's process never touches a metric;
- read at scrape time from the heartbeat record (WorkerInfo, refreshed every second): requests
  running and waiting, occupancy, KV cache, speed, failovers, expert telemetry, NVML.
The exporter is prometheus_client's HTTP server thread; a port it cannot bind is logged, and the
worker serves on without it (metrics never stop inference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from host.gpus import CLOCK_REASONS
from host.settings import MetricsSettings
from moe_core.engine import Delta, FinishReason
from scheduler.registry import WorkerInfo
from scheduler.webhooks import Outcome

if TYPE_CHECKING:
    from scheduler.jobs import Job


class HoldsJob(Protocol):
    """What the relay holds per job (workers/relay.py Held), as far as metrics read it: metrics
    sit below the relay and do not import it."""

    job: Job


log = logging.getLogger(__name__)

# vLLM's buckets for the same histograms (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # engine.max_batch_size is at most 1024

disable_created_metrics()  # no `_created` twin of every counter and histogram series
_CLOCK_BITS = {name: bit for bit, name in CLOCK_REASONS.items()}


class WorkerMetrics:
    """One worker's metrics. info: the heartbeat record the runtime refreshes in place (read at
    scrape time); expert_tokens: export the per-expert counters (their series can be many)."""

    def __init__(self, info: WorkerInfo, expert_tokens: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.name = info.name
        w, r = ["worker"], self.registry
        self.ttft = Histogram(
            "localmoe_time_to_first_token_seconds",
            "From the job's acceptance by the API to its first tokens reaching Redis.",
            w, buckets=TTFT_BUCKETS, registry=r,
        ).labels(self.name)  # fmt: skip
        self.itl = Histogram(
            "localmoe_inter_token_latency_seconds",
            "Between two deliveries of a job's tokens to Redis, divided by the tokens delivered.",
            w, buckets=ITL_BUCKETS, registry=r,
        ).labels(self.name)  # fmt: skip
        self.e2e = Histogram(
            "localmoe_e2e_request_latency_seconds",
            "From the job's acceptance by the API to its terminal state.",
            w, buckets=REQUEST_BUCKETS, registry=r,
        ).labels(self.name)  # fmt: skip
        self.queue_time = Histogram(
            "localmoe_request_queue_time_seconds",
            "From the job's acceptance by the API to this worker's engine taking it.",
            w, buckets=REQUEST_BUCKETS, registry=r,
        ).labels(self.name)  # fmt: skip
        self.batch_size = Histogram(
            "localmoe_batch_size",
            "Jobs that advanced in one engine step.",
            w,
            buckets=BATCH_BUCKETS,
            registry=r,
        ).labels(self.name)
        self.generation_tokens = Counter(
            "localmoe_generation_tokens", "Tokens generated.", w, registry=r
        ).labels(self.name)
        self.prompt_tokens = Counter(
            "localmoe_prompt_tokens", "Prompt tokens of the jobs finished.", w, registry=r
        ).labels(self.name)
        self.cached_tokens = Counter(
            "localmoe_prompt_cached_tokens",
            "Prompt tokens of the jobs finished that the engine's prefix cache held (no prefill).",
            w,
            registry=r,
        ).labels(self.name)
        success = Counter(
            "localmoe_request_success",
            "Jobs finished, by finish reason.",
            ["worker", "finish_reason"],
            registry=r,
        )
        self.finished_by = {reason.value: success.labels(self.name, reason.value) for reason in FinishReason}
        self.registry.register(_HeartbeatCollector(info, expert_tokens))
        self._delivered_at: dict[str, float] = {}  # job id → its last delivery (relay thread only)

    def started(self, job: Job) -> None:
        """The runtime process took the job (moments after the worker claimed it)."""
        if job.timings.queued_at is not None:
            self.queue_time.observe(max(0.0, time.time() - job.timings.queued_at))

    def delivered(
        self,
        steps: list[list[Delta]],
        held: Mapping[str, HoldsJob],
        sequences: Mapping[str, tuple[HoldsJob, object]],
    ) -> None:
        """One relay batch: the deltas of the engine steps it writes together, of the jobs the relay
        holds (by job id; `sequences`: by request id, the sequences of jobs with n > 1). A job's
        tokens in the batch reach Redis together: one TTFT or one ITL observation."""
        now = time.time()
        tokens: dict[str, int] = {}  # job id → tokens in this batch
        for step in steps:
            self.batch_size.observe(len(step))
            for delta in step:
                if delta.token_ids and delta.request_id in held:
                    tokens[delta.request_id] = tokens.get(delta.request_id, 0) + len(delta.token_ids)
                elif delta.token_ids and (found := sequences.get(delta.request_id)) is not None:
                    job_id = found[0].job.id
                    tokens[job_id] = tokens.get(job_id, 0) + len(delta.token_ids)
        if not tokens:
            return
        self.generation_tokens.inc(sum(tokens.values()))
        for job_id, n in tokens.items():
            last = self._delivered_at.get(job_id)
            self._delivered_at[job_id] = now
            if last is not None:
                self.itl.observe((now - last) / n)
            elif (queued_at := held[job_id].job.timings.queued_at) is not None:
                self.ttft.observe(max(0.0, now - queued_at))

    def finished(self, jobs: list[Job]) -> None:
        """Terminal states of one relay batch (a failure without a finish reason counts as error)."""
        for job in jobs:
            self._delivered_at.pop(job.id, None)
            self.finished_by[job.finish_reason or FinishReason.ERROR.value].inc()
            self.prompt_tokens.inc(job.usage.prompt_tokens)
            self.cached_tokens.inc(job.usage.cached_tokens)
            t = job.timings
            if t.queued_at is not None and t.finished_at is not None:
                self.e2e.observe(max(0.0, t.finished_at - t.queued_at))

    def serve(self, host: str, port: int) -> bool:
        return _serve(self.registry, host, port, f"worker {self.name}")


class _HeartbeatCollector(Collector):
    """The heartbeat record as gauges and counters, read when Prometheus scrapes. Every family is
    declared even without samples (no GPU, no KV cache), so dashboards see the name."""

    def __init__(self, info: WorkerInfo, expert_tokens: bool) -> None:
        self.info = info
        self.expert_tokens = expert_tokens

    def collect(self) -> Iterator[Metric]:
        info, w = self.info, [self.info.name]

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            if value is not None:
                family.add_metric(w, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["worker"])
            family.add_metric(w, value)
            return family

        yield gauge("localmoe_num_requests_running", "Jobs in the engine's batch.", info.running)
        yield gauge(
            "localmoe_num_requests_waiting", "Jobs added to the engine, not yet prefilled.", info.waiting
        )
        yield gauge("localmoe_batch_occupancy_ratio", "Running jobs / batch capacity.", info.batch_occupancy)
        yield gauge("localmoe_kv_cache_usage_ratio", "Share of the KV cache in use (vLLM).", info.kv_usage)
        yield gauge(
            "localmoe_prefix_cache_hit_ratio",
            "Share of prefilled prompt tokens found in the engine's prefix cache (recent).",
            info.prefix_hit_rate,
        )
        yield gauge(
            "localmoe_expert_cache_hit_ratio",
            "Share of the experts the MoE layers needed that were on the GPU already (recent; "
            "engine.offload experts).",
            info.expert_cache_hit_rate,
        )
        yield counter(
            "localmoe_expert_cache_fetched_bytes",
            "Expert weights copied from CPU memory to the GPU (engine.offload experts).",
            info.expert_cache_fetched_bytes,
        )
        yield counter(
            "localmoe_expert_cache_in_place_bytes",
            "Expert weights a kernel read from CPU memory in place (engine.offload experts on vLLM).",
            info.expert_cache_in_place_bytes,
        )
        yield gauge(
            "localmoe_output_tokens_per_second", "Tokens generated per second (1 s)", info.tokens_per_s
        )
        yield counter("localmoe_engine_failovers", "Engine switches.", info.failovers)
        engine = GaugeMetricFamily(
            "localmoe_engine_info", "The engine serving now.", labels=["worker", "engine", "device", "model"]
        )
        engine.add_metric([*w, info.engine, info.device, info.model], 1)
        yield engine
        yield self._experts()
        yield self._shared_experts()
        yield from self._gpus()

    def _experts(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "localmoe_expert_tokens",
            "Tokens routed to each expert of each MoE layer (once per top-k choice), by job modality.",
            labels=["worker", "layer", "expert", "modality"],
        )
        if not self.expert_tokens:
            return family
        for modality, layers in self.info.expert_tokens.items():  # [layer][expert]
            for layer, counts in enumerate(layers):
                for expert, count in enumerate(counts):
                    family.add_metric([self.info.name, str(layer), str(expert), modality], count)
        return family

    def _shared_experts(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "localmoe_shared_expert_tokens",
            "Tokens each MoE layer's shared experts processed (once per shared expert), by job "
            "modality; apart from localmoe_expert_tokens, which counts routed choices.",
            labels=["worker", "layer", "modality"],
        )
        for modality, layers in self.info.shared_expert_tokens.items():  # [layer]
            for layer, count in enumerate(layers):
                family.add_metric([self.info.name, str(layer), modality], count)
        return family

    def _gpus(self) -> Iterator[GaugeMetricFamily]:
        gpus = self.info.gpus
        fields: list[tuple[str, str, list[float | None]]] = [
            ("utilization_ratio", "Share of the last sample period a kernel ran.",
             [None if g.utilization_pct is None else g.utilization_pct / 100 for g in gpus]),
            ("memory_used_bytes", "Device memory in use.", [g.memory_used_bytes for g in gpus]),
            ("memory_total_bytes", "Device memory.", [g.memory_total_bytes for g in gpus]),
            ("temperature_celsius", "GPU temperature.", [g.temperature_c for g in gpus]),
            ("power_watts", "Power draw.", [g.power_w for g in gpus]),
            ("throttle_reasons", "NVML clocks-event reasons bitmask (gpu_idle left out); 0: none.",
             [None if g.throttle_reasons is None else _clock_mask(g.throttle_reasons) for g in gpus]),
        ]  # fmt: skip
        for field, doc, values in fields:
            family = GaugeMetricFamily(f"localmoe_gpu_{field}", doc, labels=["worker", "gpu"])
            for gpu, value in zip(gpus, values, strict=True):
                if value is not None:
                    family.add_metric([self.info.name, str(gpu.index)], value)
            yield family


def _clock_mask(reasons: list[str]) -> int:
    """decode_clock_reasons' names back to NVML's bits ("unknown_0x800" included)."""
    mask = 0
    for name in reasons:
        mask |= _CLOCK_BITS.get(name) or int(name.removeprefix("unknown_"), 16)
    return mask


def serve_worker_metrics(info: WorkerInfo, cfg: MetricsSettings) -> WorkerMetrics | None:
    """A worker's metrics and its exporter on cfg.host:cfg.worker_port; None when the port is 0."""
    if cfg.worker_port == 0:
        return None
    metrics = WorkerMetrics(info, cfg.expert_tokens)
    metrics.serve(cfg.host, cfg.worker_port)
    return metrics


# --- the webhook worker ------------------------------------------------------------------------

WEBHOOK_REGISTRY = CollectorRegistry(auto_describe=True)
WEBHOOK_DELIVERIES = Counter(
    "localmoe_webhook_deliveries",
    "Webhook delivery attempts, by outcome.",
    ["outcome"],
    registry=WEBHOOK_REGISTRY,
)
for _outcome in get_args(Outcome):  # each outcome exported from the start, at 0
    WEBHOOK_DELIVERIES.labels(_outcome)


def serve_webhook_metrics(cfg: MetricsSettings) -> None:
    if cfg.webhook_port != 0:
        _serve(WEBHOOK_REGISTRY, cfg.host, cfg.webhook_port, "webhook worker")


def _serve(registry: CollectorRegistry, host: str, port: int, what: str) -> bool:
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as e:  # a port in use must not stop a worker: it serves on without metrics
        log.error("%s: no Prometheus exporter on %s:%d (%s)", what, host, port, e)
        return False
    log.info("%s: Prometheus metrics on http://%s:%d/metrics", what, host, port)
    return True
