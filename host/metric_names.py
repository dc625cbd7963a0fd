"""Every Prometheus metric LocalMoE exports, by the process that serves it: the names dashboards
and alert rules are written against. A counter is listed as exposed (with `_total`); a histogram
by its family name (`_bucket`, `_sum`, `_count` follow). tests/test_metrics.py checks that each
appears in a scrape, so renaming one here or in the code breaks that test.
"""

from __future__ import annotations

# GET /metrics on the API (an admin key, `Authorization: Bearer <key>`).
API = (
    "localmoe_http_requests_total",  # {route, method, status}; route is the template, or "other"
    "localmoe_http_request_duration_seconds",  # {route, method}
    "localmoe_jobs_submitted_total",  # {modality, priority}
    "localmoe_jobs_rejected_total",  # {reason}: rate_limit, backlog_jobs, backlog_tokens, key_backlog_*
    "localmoe_queue_depth",  # {queue}: messages waiting in a Celery queue, all priorities
    "localmoe_backlog_jobs",  # jobs admitted and not yet claimed by a worker
    "localmoe_backlog_tokens",  # their prompt + max_tokens
    "localmoe_workers",  # {state}: ready, loading
)

# Each worker's exporter (metrics.worker_port + its index); every series has {worker}.
WORKER = (
    "localmoe_time_to_first_token_seconds",
    "localmoe_inter_token_latency_seconds",
    "localmoe_e2e_request_latency_seconds",
    "localmoe_request_queue_time_seconds",
    "localmoe_generation_tokens_total",
    "localmoe_prompt_tokens_total",
    "localmoe_prompt_cached_tokens_total",  # of those, found in the engine's prefix cache
    "localmoe_request_success_total",  # {finish_reason}: stop, length, abort, error
    "localmoe_num_requests_running",
    "localmoe_num_requests_waiting",
    "localmoe_batch_size",
    "localmoe_batch_occupancy_ratio",
    "localmoe_kv_cache_usage_ratio",  # no sample where the engine manages no KV cache (torch)
    "localmoe_prefix_cache_hit_ratio",  # no sample until an engine with a prefix cache prefilled
    "localmoe_expert_cache_hit_ratio",  # engine.offload experts; no sample without the cache
    "localmoe_expert_cache_fetched_bytes_total",  # expert weights copied to the GPU (0 without the cache)
    "localmoe_expert_cache_in_place_bytes_total",  # expert weights read from CPU memory in place (vLLM)
    "localmoe_output_tokens_per_second",
    "localmoe_engine_failovers_total",
    "localmoe_engine_info",  # {engine, device, model} = 1
    "localmoe_expert_tokens_total",  # {layer, expert, modality}: routed choices
    "localmoe_shared_expert_tokens_total",  # {layer, modality}: tokens through the shared experts
)

# Also on each worker's exporter, with samples only where NVML sees a GPU; {worker, gpu}.
WORKER_GPU = (
    "localmoe_gpu_utilization_ratio",
    "localmoe_gpu_memory_used_bytes",
    "localmoe_gpu_memory_total_bytes",
    "localmoe_gpu_temperature_celsius",
    "localmoe_gpu_power_watts",
    "localmoe_gpu_throttle_reasons",  # the NVML clocks-event bitmask (gpu_idle left out)
)

# The webhook worker's exporter (metrics.webhook_port).
WEBHOOK = ("localmoe_webhook_deliveries_total",)  # {outcome}

ALL = API + WORKER + WORKER_GPU + WEBHOOK
