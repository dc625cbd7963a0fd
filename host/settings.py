"""One typed settings object for every LocalMoE process, from YAML and the environment.

Precedence (highest first): LOCALMOE_* environment variables (nested with "__", e.g.
LOCALMOE_ENGINE__MAX_BATCH_SIZE=32), the YAML file named by LOCALMOE_CONFIG (default
configs/default.yaml when present), then the defaults below. Bad values fail at start-up.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from host.allowlist import parse_allowlist

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


# Where the weights that do not fit a worker's memory budget live ("none": they all fit): what a
# worker chose (moe_core/choice.py) and reports in the registry (scheduler/registry.py). Here, on
# the ground floor, because both layers name it.
Offload = Literal["none", "vllm_cpu", "zero3", "experts"]
OffloadSetting = Literal["auto", "none", "vllm_cpu", "experts", "zero3"]  # engine.offload
Misses = Literal["gather", "in_place"]  # engine.expert_cache.misses
Admission = Literal["settle", "device"]  # engine.expert_cache.admission


class VllmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt engine setting stops the start

    tensor_parallel_size: int = Field(1, ge=1)
    enable_expert_parallel: bool = False
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=0.98)
    max_num_batched_tokens: int = Field(16384, ge=256, description="Scheduler token budget per step.")
    enforce_eager: bool = Field(False, description="Skip torch.compile and CUDA graphs (faster start).")
    tuned_config_dir: Path | None = Field(
        None,
        description="Fused-MoE kernel configs written by `localmoe tune-moe`, read by vLLM "
        "(VLLM_TUNED_CONFIG_FOLDER); None: <home>/moe-configs",
    )
    expert_telemetry: bool = Field(
        False,
        description="Count the router's choices per job modality (vLLM's enable_return_routed_experts; "
        "CUDA builds only). Off by default: it cost 28 % of throughput on an H200 (BENCHMARKS.md).",
    )
    quantization: Literal["fp8"] | None = Field(
        None,
        description="Quantize a checkpoint stored in bf16 / fp16 as vLLM loads it (fp8: weights in 8 bits, "
        "native on L40S and H200); a checkpoint already quantized is read as its config says.",
    )
    kv_cache_memory_gb: float | None = Field(
        None,
        gt=0,
        description="vLLM's KV cache per GPU in GiB (vLLM's --kv-cache-memory-bytes), instead of what "
        "gpu_memory_utilization leaves it (or, on vLLM's CPU build, VLLM_CPU_KVCACHE_SPACE); where "
        "engine.offload planned the KV cache, this replaces the plan's. None: vLLM sizes it.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="vLLM's automatic prefix caching: a prompt that starts as an earlier one did reuses its "
        "KV blocks. It costs the engine core CPU per token (5-10 % of throughput on an H200 with prompts "
        "that share nothing, BENCHMARKS.md); off only where prompts never share a prefix.",
    )
    structured_outputs_backend: Literal["guidance", "xgrammar"] = Field(
        "guidance",
        description="vLLM's backend for structured outputs: guidance (llguidance, the library the torch "
        "and DeepSpeed engines use: every spec intake accepts compiles alike) or xgrammar. On vLLM 0.26 "
        "xgrammar was no faster on an H200 and let 5 % of outputs break their schema (raw control "
        "characters in strings, strings past maxLength; BENCHMARKS.md), and it refuses some specs guidance "
        "takes (a pattern beside a length bound).",
    )
    structured_masks: Literal["parallel", "in-turn", "vllm"] = Field(
        "parallel",
        description="How vLLM's engine core makes structured outputs' grammars and masks: parallel (one "
        "grammar compiled per distinct constraint and copied per request, a step's masks in one call over "
        "llguidance's threads, and under async scheduling the next step scheduled while they fill), "
        "in-turn (the same, the next step scheduled at the loop's own turn) or vllm (vLLM's own ways: a "
        "compile per request, a Python call per row and a thread pool above 128 rows). The masks are the "
        "same; they are on the critical path of every structured step.",
    )
    batch_preemption: bool = Field(
        True,
        description="With structured_masks parallel or in-turn (LocalMoE's scheduler in vLLM's engine "
        "core): when every row is taken, a batch-tier job's row is preempted for a more urgent waiting "
        "job (recomputed later from what it made, as the torch engine does), so a batch may use every "
        "row. Off (or with vllm's scheduler): the batch tier is kept out of scheduler.batch_reserve's rows.",
    )


class DeepSpeedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, description="init_inference tensor parallelism.")
    offload: Literal["none", "cpu", "nvme"] = Field(
        "none", description="ZeRO-3 inference: parameters live in CPU memory or on NVMe, streamed per layer."
    )
    nvme_path: Path | None = Field(None, description="Folder on a fast local disk, for offload: nvme.")


class ExpertCacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resident_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="engine.offload experts: the share of each MoE layer's routed experts kept on the "
        "GPU (at least one); None: as many as the memory budget leaves room for",
    )
    misses: Misses = Field(
        "in_place",
        description="How the vLLM engine's cache computes a step's experts that are not on the GPU: "
        "in_place (the MoE kernel reads them from CPU memory over PCIe as it computes) or gather "
        "(copied into device rows by a kernel with wide reads first, then computed there; the rows "
        "take E - slots + 2 experts of GPU memory). On an H100 both read at 47-50 GB/s and made the "
        "same tokens/s (BENCHMARKS.md)",
    )
    admission: Admission = Field(
        "device",
        description="How the vLLM engine's cache decides which experts its slots hold: settle (the "
        "host reads each step's counts a step late and copies the busiest in, on top of the reads "
        "of their misses) or device (on the GPU within the step: a needed expert outside the slots "
        "takes the slot of a less busy one the step does not need, its one read over PCIe also its "
        "admission; 15-19 % fewer experts over the link per batch-1 token on recorded routing, and "
        "on an H100 1.10x settle's batch-1 tokens/s with under 1 ms of host work between steps, "
        "BENCHMARKS.md). The torch engine's cache admits each miss itself",
    )


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "torch", "vllm", "deepspeed"] = Field(
        "auto",
        description="auto: vLLM on a GPU (with weights offloaded to CPU memory where they do not fit "
        "the budget; DeepSpeed ZeRO-3 offload where vLLM cannot run the model), else torch",
    )
    gpu_memory_budget_gb: float = Field(
        40.0,
        gt=0,
        description="What the engine may take of each of its GPUs: weights, KV cache, activations "
        "(40 of an L40S's 48 GB).",
    )
    offload: OffloadSetting = Field(
        "auto",
        description="Where weights that do not fit the budget go. auto: vllm_cpu where vLLM runs the "
        "model, else zero3; none: refuse to start such a model; vllm_cpu: vLLM's cpu_offload_gb (the "
        "GPU reads them from pinned CPU memory at every step); zero3: DeepSpeed ZeRO-3 (every weight "
        "streamed from deepspeed.offload's cpu or nvme); experts: a GPU cache of the routed experts "
        "in use (expert_cache), the rest of them in pinned CPU memory, inside vLLM's fused-MoE layers "
        "where vLLM runs the model, else in the torch engine.",
    )
    expert_cache: ExpertCacheSettings = Field(default_factory=ExpertCacheSettings)
    max_step_failures: int = Field(3, ge=1, description="Failed steps in a row before failing over.")
    failover_cooldown_s: float = Field(300.0, ge=0, description="Then the preferred engine is tried again.")
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    device: str = Field("auto", description="auto (cuda if visible, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(64, ge=1, le=1024, description="Jobs one worker decodes together.")
    batch_yield_rows: int | None = Field(
        0,
        ge=0,
        description="While jobs more urgent than the batch tier are in the engine (and batch_yield_hold_s "
        "after the last of them), batch-tier jobs hold at most this many rows, the others preempted "
        "(recomputed later). 0 (the default): a batch runs only while no other work does, which kept "
        "interactive TTFT p95 within 10 % of its figure alone on an H100 with vLLM (2 rows: +50 %; "
        "BENCHMARKS.md); on a box never without interactive work a batch then waits for a pause, up to "
        "its completion window. None: the batch tier keeps every row it has. A batch alone takes every "
        "row. The torch engine and vLLM's with vllm.batch_preemption (LocalMoE's scheduler in its "
        "engine core); not the DeepSpeed engine.",
    )
    batch_yield_hold_s: float = Field(
        1.0,
        ge=0,
        description="How long after the last urgent job the batch tier still yields (batch_yield_rows).",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of a CPU engine; None: every core but one, left to the "
        "API, Redis and the relay (a 2-core box measured 0.75 of engine speed through the service "
        "with 1 thread, 0.46 with 2: a busy core stalls every torch thread)",
    )

    step_delay_s: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Testing and benchmarks only: sleep this long after every engine step, "
        "making this worker a slower one (bench/scheduler_policies.py)",
    )

    def resolved_cpu_threads(self) -> int:
        return self.cpu_threads or max(1, (os.cpu_count() or 1) - 1)

    @model_validator(mode="after")
    def _offload_fits_backend(self) -> EngineSettings:
        by = {"vllm_cpu": ("vllm",), "zero3": ("deepspeed",), "experts": ("vllm", "torch")}.get(
            self.offload
        )  # who offloads so
        if by is not None and self.backend not in ("auto", *by):
            raise ValueError(
                f"engine.offload {self.offload} is {' or '.join(by)}'s, not engine.backend {self.backend}'s"
            )
        if self.offload == "none" and self.deepspeed.offload != "none":
            raise ValueError(
                f"engine.offload none contradicts engine.deepspeed.offload {self.deepspeed.offload}"
            )
        return self


class SchedulerSettings(BaseModel):
    policy: Literal["auto", "shared", "round_robin"] = Field(
        "auto",
        description="auto: the worker queue with the earliest expected completion (scheduler/routing.py); "
        "shared: one queue every worker takes from; round_robin: worker queues in turn",
    )
    prefill_weight: float = Field(
        0.0625, ge=0, description="A prompt token's cost in decode tokens, in a job's cost estimate."
    )
    affinity_margin: float = Field(
        0.15,
        ge=0,
        description="Workers whose expected completion is within this fraction of the best count as "
        "equal; among them the one already running the job's modality wins.",
    )
    max_temperature_c: float = Field(87.0, description="Hotter GPUs get no new jobs.")
    max_memory_fraction: float = Field(0.98, gt=0, le=1, description="Fuller GPUs get no new jobs.")
    max_kv_usage: float = Field(
        0.95, gt=0, le=1, description="Workers whose KV cache is fuller get no new jobs."
    )
    refresh_s: float = Field(0.25, gt=0, description="How often the API re-reads the worker registry.")
    batch_reserve: float = Field(
        0.125,
        ge=0,
        lt=1,
        description="Jobs of the batch tier (priority batch: a batch's lines) are admitted only into "
        "spare capacity, leaving this share of the workers' batch slots to every other job",
    )
    batch_lookahead: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Jobs of the batch tier admitted beyond the spare slots, as a share of the workers' "
        "batch slots: they wait in the engines behind every other job, and take a row the step a "
        "batch job frees it instead of after a round trip through the API and the queue (1/2 left a "
        "batch alone at 0.85 of the same requests sent at once on a 2-core box, 1 at 0.92; with "
        "engine.batch_yield_rows 0 the lines waiting do not slow interactive work: BENCHMARKS.md)",
    )
    prefix_routing: bool = Field(
        True,
        description="auto also counts the prompt tokens each worker's prefix cache probably holds "
        "(the blocks of prompts recently routed there): they need no prefill (scheduler/prefix.py)",
    )
    prefix_block_size: int = Field(
        16,
        ge=1,
        description="Tokens per hashed prompt block: the engines' KV block size (vLLM's is 16) or a "
        "divisor of it",
    )
    prefix_max_blocks: int = Field(
        512, ge=1, description="Blocks hashed per prompt at most (512 x 16: the first 8,192 tokens)."
    )
    prefix_ttl_s: float = Field(
        600.0, gt=0, description="A block sent to a worker counts as cached there at most this long."
    )
    prefix_blocks_per_worker: int = Field(
        200_000,
        ge=1,
        description="Blocks remembered per worker at most (fewer when its engine says its KV cache "
        "holds fewer), in each API process",
    )


class LimitSettings(BaseModel):
    max_tokens: int = Field(2048, ge=1, description="Largest max_tokens a job may ask for.")
    job_ttl_s: int = Field(86_400, ge=60, description="How long results and streams are kept.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    # Backpressure: jobs admitted and not yet taken by a worker. Past a limit → 429 + Retry-After.
    max_queued_jobs: int = Field(10_000, ge=1, description="Waiting jobs, all keys together.")
    max_queued_tokens: int = Field(
        20_000_000, ge=1, description="Prompt + max_tokens of the waiting jobs, all keys together."
    )
    per_key_max_queued_jobs: int = Field(2_000, ge=1, description="Waiting jobs of one key (default).")
    per_key_max_queued_tokens: int = Field(4_000_000, ge=1, description="Their tokens (default).")
    per_key_rate_per_s: float = Field(100.0, gt=0, description="Submissions per second per key (default).")
    per_key_burst: int = Field(200, ge=1, description="Submissions at once above that rate (default).")
    idempotency_ttl_s: int = Field(86_400, ge=60, description="How long an Idempotency-Key is remembered.")
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Runs of a job whose worker dies under it, before it fails (saying why). A run is an "
        "attempt the engine gave a row (it streamed a token, or the torch engine seated it): a job that "
        "only waited in the engine of a worker that died goes back to the queue without counting one.",
    )
    # Files (POST /v1/files): batch input, kept on disk under files_dir.
    max_file_bytes: int = Field(
        200 << 20, ge=1024, description="Larger uploads get 413 (the route's own limit, not max_body_bytes)."
    )
    max_file_lines: int = Field(50_000, ge=1, description="Requests one batch input file may hold.")
    file_ttl_s: int = Field(
        30 * 86_400, ge=1, description="How long an uploaded file is kept; then it and its bytes are gone."
    )


class BatchSettings(BaseModel):
    lease_s: float = Field(
        30.0,
        ge=1,
        description="A batch's run holds it this long past its last renewal (every third of it); "
        "API processes look every half of it for batches whose run died, and take them over",
    )
    per_key_max_batches: int = Field(
        16, ge=1, description="Batches of one key not yet ended; one more is refused (429) (default)."
    )
    per_key_lines_in_flight: int = Field(
        128,
        ge=1,
        description="Lines of one key's batches running at once, over every API process (default); "
        "more wait, leaving the key's backlog room for its interactive requests",
    )


class WebhookSettings(BaseModel):
    allow: list[str] = Field(
        default_factory=list,
        description='Hosts a job\'s webhook may call: host names ("hooks.corp.example", "*.corp.example"), '
        'IP addresses or CIDRs ("10.20.0.0/16"). Empty: webhooks are off. Loopback, link-local and '
        "cloud-metadata addresses are refused unless an entry names them as an address or CIDR.",
    )
    timeout_s: float = Field(10.0, gt=0, le=60, description="Per delivery attempt (connect + response).")
    max_age_s: float = Field(86_400.0, gt=0, description="Retries stop this long after the first attempt.")
    base_backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles per attempt, jittered.")
    max_backoff_s: float = Field(
        1800.0,
        gt=0,
        lt=3600,
        description="Longest wait between attempts, Retry-After included. Below the broker's 1 h "
        "visibility timeout: a retry held longer would be delivered twice.",
    )
    output_interval_s: float = Field(0.5, ge=0.5, description="output events: at most one per this long.")
    concurrency: int = Field(16, ge=1, le=256, description="Deliveries in flight per webhook worker.")

    @field_validator("allow")
    @classmethod
    def _entries(cls, allow: list[str]) -> list[str]:
        parse_allowlist(allow)  # a malformed entry stops every process at start, with the reason
        return allow


class MetricsSettings(BaseModel):
    """Prometheus exporters. The API serves its metrics at GET /metrics (admin key); each worker's
    runtime process and the webhook worker serve theirs on ports of their own (loopback by default)."""

    host: str = Field("127.0.0.1", description="Address the worker and webhook exporters bind.")
    worker_port: int = Field(
        9101,
        ge=0,
        le=65535,
        description="A worker's exporter port; `localmoe up` gives its i-th worker worker_port + i. 0: off",
    )
    webhook_port: int = Field(9100, ge=0, le=65535, description="The webhook worker's exporter. 0: off")
    expert_tokens: bool = Field(
        True,
        description="Export localmoe_expert_tokens_total: layers × experts × modalities series per "
        "worker (768 for Mixtral 8x7B; turn off for models with hundreds of experts)",
    )


class FlowerSettings(BaseModel):
    """What Flower shows of the jobs (scheduler/task_events.py) and how Flower keeps it
    (localmoe/flower.py). task_events, redact_prompts and prompt_chars are hot (host/config_store.py)."""

    task_events: bool = Field(
        True,
        description="Each job as a task in Flower (received, started, its terminal state), published by "
        "the worker's relay in the write that carries the job's tokens (no Redis round trip of its own)",
    )
    redact_prompts: bool = Field(False, description="Flower shows no prompt text, only its length.")
    prompt_chars: int = Field(64, ge=0, le=4096, description="The prompt's first characters Flower shows.")
    max_tasks: int = Field(
        10_000, ge=100, description="Tasks Flower keeps (in memory and in its state file); oldest go first."
    )
    state_save_interval_s: float = Field(
        60.0, ge=0, description="Flower writes its state file this often (and when it stops); 0: only then."
    )
    niceness: int = Field(
        10,
        ge=0,
        le=19,
        description="Flower's CPU niceness: on busy cores the engines, relays and API go first, and "
        "Flower takes the task events they published a moment later",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOCALMOE_", env_nested_delimiter="__", extra="forbid")

    home: Path = Field(Path("~/.localmoe").expanduser(), description="State: secrets, Redis data, models.")
    files_dir: Path | None = Field(
        None,
        description="Uploaded files (POST /v1/files); None: <home>/files. Every API process must see "
        "the same directory (a shared volume where they run in containers).",
    )
    redis_url: SecretStr | None = Field(None, description="None: `localmoe up` starts its own Redis.")
    model_dir: Path | None = Field(
        None, description="None: the embedded small model (trained; unpacked on first use)."
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="API processes `localmoe up` runs on api_port (SO_REUSEPORT: the kernel spreads "
        "connections over them); 0: one per 2 cores, 1 to 8",
    )
    api_reuse_port: bool = Field(
        False, description="Bind api_port with SO_REUSEPORT, beside other API processes (`up` sets it)"
    )
    api_access_log: bool = Field(False, description="uvicorn's access log line per request (costly at load)")
    instance: str = Field(
        "",
        description="Set by `localmoe up` for its children: its API processes answer /readyz with it "
        "(X-LocalMoE-Instance), so that `up` knows the API it waits for is its own",
    )
    api_url: str | None = Field(None, description="Where the CLI finds the API; default from host/port.")
    api_key: SecretStr | None = Field(
        None, description="The CLI's API key; None: the admin key `localmoe up` kept in home/secrets.json."
    )
    flower_port: int = Field(5555, ge=0, le=65535)
    flower_host: str = Field("127.0.0.1", description="Address Flower binds (0.0.0.0 in a container).")
    flower_user: str = "admin"
    flower_password: SecretStr | None = Field(None, description="None: generated and kept in home.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        self.home = self.home.expanduser()
        if self.engine.vllm.tuned_config_dir is None:
            self.engine.vllm.tuned_config_dir = self.home / "moe-configs"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get("LOCALMOE_CONFIG", DEFAULT_CONFIG))
        if "LOCALMOE_CONFIG" in os.environ and not path.is_file():
            raise FileNotFoundError(f"LOCALMOE_CONFIG names {path}, which does not exist")
        yaml = YamlConfigSettingsSource(settings_cls, yaml_file=path if path.is_file() else None)
        return init_settings, env_settings, yaml

    @property
    def default_model_dir(self) -> Path:
        return self.home / "models" / "localmoe-small"

    @property
    def resolved_model_dir(self) -> Path:
        return self.model_dir or self.default_model_dir

    @property
    def resolved_files_dir(self) -> Path:
        return (self.files_dir or self.home / "files").expanduser()

    @property
    def flower_url(self) -> str:
        host = "127.0.0.1" if self.flower_host in ("0.0.0.0", "::") else self.flower_host
        return f"http://{host}:{self.flower_port}"

    @property
    def resolved_api_url(self) -> str:
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host
        return self.api_url or f"http://{host}:{self.api_port}"

    def resolved_api_processes(self) -> int:
        return self.api_processes or max(1, min(8, (os.cpu_count() or 1) // 2))

    def cli_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        path = self.home / "secrets.json"
        kept: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        return kept.get("api_key")

    def require_redis_url(self) -> str:
        if self.redis_url is None:
            raise RuntimeError("LOCALMOE_REDIS_URL is not set (`localmoe up` sets it for its children)")
        return self.redis_url.get_secret_value()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
