"""The engine's own process, and the runtime's handle on it (`EngineHost`).

The engine process holds the engine and its step loop (workers/engine_loop.py) and nothing else:
no Redis, no job records, no metrics, no webhooks. Measured on the H200 with vLLM, a worker that
ran the relay's Redis writes and the per-token metrics in the engine's process spent 24–30 µs of
that process's CPU per token against 11–16 for the engine alone; near 30k tokens/s that is one
core's worth, one interpreter lock: the relay's turns on it delayed the engine's steps, and the
service ran at 0.76–0.86 of the engine. Here the runtime process does all of that, and the engine
process only packs each step's deltas for the pipe (~0.5 µs each). vLLM's engine core, a child
of this process, is the same split one level down.

Spawned (never forked: CUDA does not survive a fork) by the runtime's main thread, in the runtime's
process group (the consumer ends the whole group); it dies with the runtime (parent-death signal)
and exits when the pipe closes. If it dies, so does the runtime, and so the worker: the broker
hands the unacknowledged jobs to another worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from host.heap import freeze_heap
from host.instance import arm_parent_death_signal, set_process_name
from host.settings import Offload, Settings, get_settings
from moe_core.engine import Delta, EngineStats, FinishReason, GenerationRequest, SamplingParams
from scheduler.jobs import JobSpec
from workers.messages import (
    Abort,
    Add,
    AddMany,
    Configure,
    Experts,
    FromEngine,
    Loaded,
    LoadFailed,
    Refused,
    Seated,
    Stats,
    Stepped,
    Stop,
    ToEngine,
    pack,
    unpack,
)
from workers.relay import Held, Relay, sequence_id

if TYPE_CHECKING:  # the runtime process never imports torch or an engine: only this one does
    from moe_core.choice import Choice
    from moe_core.engine import Engine

log = logging.getLogger(__name__)


class EngineHost:
    """The runtime's handle on the engine process: hands it requests, aborts and settings; feeds
    its steps to the relay; keeps its latest statistics for the heartbeats."""

    def __init__(self, settings: Settings, relay: Relay) -> None:
        self.relay = relay
        self.name = "?"  # the serving backend (a failover changes it)
        self.max_context = 0
        self.device = settings.engine.device
        self.choice, self.reason = "", ""
        self.offloads: dict[str, Offload] = {}  # backend → how it holds what does not fit the GPU budget
        self.cpu_offload_gb = 0.0  # vLLM's, where its offload is vllm_cpu
        self.stats = EngineStats(running=0, waiting=0, steps=0, max_batch_seen=0, tokens_generated=0)
        self.busy_s = 0.0  # seconds the engine spent stepping with requests in it
        self.expert_tokens: dict[str, list[list[int]]] = {}  # tag → [layer][expert], every second
        self._conn, child = mp.get_context("spawn").Pipe(duplex=True)
        self._proc = mp.get_context("spawn").Process(
            target=_main, args=(child, os.getpid()), name="engine", daemon=False
        )
        # One sender at a time on the pipe (submits, the cancel listener, the config watcher, stop),
        # and submit's track-then-add is one step for a cancel: reentrant, held by _send too.
        self._send_lock = threading.RLock()
        self._stopping = False

    def start(self) -> None:
        """Spawn the engine process and wait until it has loaded and warmed up; raises if it
        could not load."""
        self._proc.start()
        first = unpack(self._conn.recv_bytes())
        if isinstance(first, LoadFailed):
            raise RuntimeError(f"the engine could not load: {first.error}")
        assert isinstance(first, Loaded), first
        self.loaded(first)
        threading.Thread(target=self._read, name="engine-output", daemon=True).start()

    def loaded(self, message: Loaded) -> None:
        """What the engine process says once it is warm: its engine and the choice behind it."""
        self.name, self.max_context, self.device = message.name, message.max_context, message.device
        self.choice, self.reason = message.choice, message.reason
        self.offloads, self.cpu_offload_gb = message.offloads, message.cpu_offload_gb

    def offload(self) -> tuple[Offload, float]:
        """The serving engine's offload (a failover changes it) and its cpu_offload_gb."""
        offload = self.offloads.get(self.name, "none")
        return offload, self.cpu_offload_gb if offload == "vllm_cpu" else 0.0

    def submit(self, held: Held) -> None:
        """The job joins the batch at the engine's next step (all its sequences in one message);
        the relay holds it from now on."""
        adds, ended = requests_of(held)
        with self._send_lock:
            self.relay.track(held)
            if ended:
                self.relay.publish(ended)
            if len(adds) == 1:
                self._send(Add.of(adds[0]))
            elif adds:
                self._send(AddMany.of(adds))

    def cancel(self, job_id: str) -> None:
        held = self.relay.held.get(job_id)
        if held is None or not held.sequences:
            self._send(Abort(job_id))
            return
        for seq in held.sequences:
            self._send(Abort(sequence_id(job_id, seq.index)))

    def configure(self, settings: Settings) -> None:
        e = settings.engine
        self._send(Configure(e.step_delay_s, e.max_step_failures, e.failover_cooldown_s))

    def stop(self, timeout: float = 60.0) -> None:
        """The engine process closes the engine (device memory, its own processes) and exits."""
        self._stopping = True
        with contextlib.suppress(OSError):  # already gone
            self._send(Stop())
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _send(self, message: ToEngine) -> None:
        with self._send_lock:
            self._conn.send_bytes(pack(message))

    def _read(self) -> None:
        try:
            while True:
                message = unpack(self._conn.recv_bytes())
                if isinstance(message, Stepped):
                    self.relay.publish(message.unpack())
                elif isinstance(message, Refused):
                    self.relay.fail(message.request_id, message.error)
                elif isinstance(message, Seated):
                    self.relay.seated(message.request_ids)
                elif isinstance(message, Stats):
                    self.name, self.stats, self.busy_s = message.name, message.engine_stats(), message.busy_s
                elif isinstance(message, Experts):
                    self.expert_tokens = message.tokens
        except (EOFError, OSError):
            if self._stopping:
                return
        # The engine is gone with jobs in flight: end this process at once; the consumer sees its
        # pipe close, ends the worker without acknowledging, and the broker hands the jobs on.
        log.critical("engine process died (exit code %s); stopping the worker", self._proc.exitcode)
        os._exit(70)


def requests_of(held: Held) -> tuple[list[GenerationRequest], list[Delta]]:
    """→ the engine requests of a held job: one, or one per sequence (relay.sequence_id) of a
    job with n > 1; and the final deltas of those that end at once. A resumed request continues
    what earlier attempts streamed of it; one that ended, or made every token, before its worker
    died ends at once."""
    job = held.job
    if held.sequences:  # (request id, sequence index, resumed tokens and text, how it ended)
        runs = [
            (sequence_id(job.id, s.index), s.index, s.resumed_tokens, "".join(s.text), s.finish_reason)
            for s in held.sequences
        ]
    else:  # held.text holds only the resumed text yet
        runs = [(job.id, 0, held.resumed_tokens, "".join(held.text), None)]
    adds, ended = [], []
    for request_id, index, resumed_tokens, resumed_text, finished in runs:
        if finished is not None or resumed_tokens >= job.spec.max_tokens:
            reason = finished or FinishReason.LENGTH
            ended.append(Delta(request_id, "", [], job.usage.prompt_tokens, 0, reason))
        else:
            prompt, params = job.spec.prompt + resumed_text, _params(job.spec, index, resumed_tokens)
            rank = job.priority.rank
            # a prompt of token ids goes as sent; resumed after a worker's loss, as its text and
            # the text made so far (the ids' text re-tokenized: the one place they are not kept)
            ids = job.spec.prompt_token_ids
            given = tuple(ids) if ids is not None and not resumed_text else None
            adds.append(
                GenerationRequest(
                    request_id, prompt, params, tag=job.modality, priority=rank, prompt_token_ids=given
                )
            )
    return adds, ended


def _params(spec: JobSpec, index: int, resumed_tokens: int) -> SamplingParams:
    """How sequence `index` of a job samples; resumed_tokens: what earlier attempts made of it."""
    return SamplingParams(
        max_tokens=spec.max_tokens - resumed_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        min_p=spec.min_p,
        seed=None if spec.seed is None else (spec.seed + index) % 2**63,  # as vLLM seeds n sequences
        stop=tuple(spec.stop),
        ignore_eos=spec.ignore_eos,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        repetition_penalty=spec.repetition_penalty,
        logit_bias=tuple(sorted((int(t), b) for t, b in spec.logit_bias.items())),
        min_tokens=max(spec.min_tokens - resumed_tokens, 0),
        stop_token_ids=tuple(spec.stop_token_ids),
        skip_special_tokens=spec.skip_special_tokens,
        include_stop_str_in_output=spec.include_stop_str_in_output,
        logprobs=spec.logprobs,
        # the prompt is scored once per job, by its first sequence
        prompt_logprobs=spec.prompt_logprobs if index == 0 else None,
        structured=spec.constraint,
    )


def _main(conn: Connection, parent: int) -> None:
    """The engine process: load, warm up, say so, then step until Stop or the pipe closes."""
    arm_parent_death_signal(parent, signal.SIGKILL)
    set_process_name("lm-engine")
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    send_lock = threading.Lock()

    def send(message: FromEngine) -> None:
        with send_lock:
            conn.send_bytes(pack(message))

    try:
        engine, choice, device = _load(settings)
    except Exception as e:
        log.exception("the engine could not load")
        send(LoadFailed(f"{type(e).__name__}: {e}"))
        os._exit(1)
    # the engine's model, tokenizer and imports stay for the process's life: out of every
    # collection, or a full one stops the steps for as long as it walks them (host/heap.py)
    log.info("engine process: %d objects out of the collector's reach", freeze_heap())
    from workers.engine_loop import EngineLoop

    loop = EngineLoop(engine, send, settings.engine.step_delay_s)

    def read() -> None:
        try:
            while True:
                loop.put(unpack(conn.recv_bytes()))
        except (EOFError, OSError):  # the runtime is gone: stop stepping, let go of the device
            loop.put(Stop())

    from workers.engine_setup import offload_of

    order = (choice.backend, *choice.fallbacks)
    offloads: dict[str, Offload] = {b: offload_of(b, choice, settings.engine) for b in order}
    loaded = (engine.name, engine.max_context, device, choice.backend, choice.reason)
    send(Loaded(*loaded, offloads, choice.cpu_offload_gb))
    threading.Thread(target=read, name="engine-input", daemon=True).start()
    loop.run()
    engine.close()
    os._exit(0)


def _load(settings: Settings) -> tuple[Engine, Choice, str]:
    import torch

    from scheduler.jobs import batch_slots
    from workers.engine_setup import start_engine

    device = settings.engine.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(settings.engine.resolved_cpu_threads())
    model_dir = settings.resolved_model_dir
    log.info("loading %s on %s", model_dir, device)
    batch_rows = batch_slots(settings.engine.max_batch_size, settings.scheduler.batch_reserve)
    engine, choice = start_engine(model_dir, device, settings.engine, batch_rows)
    return engine, choice, device
