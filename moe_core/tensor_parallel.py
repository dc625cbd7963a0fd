"""DeepSpeed tensor parallelism without a launcher: this process is rank 0, it spawns ranks 1..N-1.

`TensorParallelEngine` is what `DeepSpeedEngine(..., tensor_parallel_size=N)` returns outside a
launcher's world (moe_core/deepspeed.py). Every rank builds and loads the same DeepSpeed
TorchEngine (init_inference shards the model across the N ranks, and each forward all-reduces
across them), so every rank must make the same `step()` calls on the same batch:

* Rank 0 (the leader) is the calling process, on cuda:0 (or the CPU). It alone takes requests and
  publishes deltas. `add_request` / `abort` apply to its own engine at once (so a bad request
  raises ValueError here) and are recorded; its `step()` broadcasts the recorded commands, possibly
  none, with `broadcast_object_list` over a gloo group of their own (control messages never go
  through NCCL), then steps its engine.
* Ranks 1..N-1 (followers) are "spawn" processes on cuda:i (the worker pins CUDA_VISIBLE_DEVICES to
  its N GPUs), with RANK=i, WORLD_SIZE=N, LOCAL_RANK=i and the leader's MASTER_ADDR/MASTER_PORT.
  They loop: receive a command list, apply it, step, drop the deltas; `_Close` ends the loop.

Invariant: between two broadcasts every rank's engine sees the same calls in the same order, and
each broadcast is followed by exactly one `step()` on every rank, so all ranks hold the same
batch at every forward. Sampled requests without a seed get one from the leader before they are
recorded, so every rank draws the same token (the lm_head all-reduce gives all ranks the same
logits).

Idle: with nothing unfinished and no commands recorded the leader's `step()` returns [] at once
and broadcasts nothing (the followers wait in the broadcast); once every KEEPALIVE_S it
broadcasts an empty list anyway (a step of an idle engine runs no forward), so that the
followers' wait never reaches the control group's CONTROL_TIMEOUT while the worker loop idles.

Faults: before each broadcast the leader checks that every follower lives; the world and the
tensor-parallel group time out after `timeout_s` (rendezvous included), and gloo fails at once on
a closed connection. A failed step raises RuntimeError and leaves the engine broken (later steps
raise at once), which is what FailoverEngine counts. Followers exit when the leader's process
dies. `close()` stops the followers (terminating them after JOIN_S), destroys the process group
and restores this process's environment, so another engine (or another TensorParallelEngine) can
load here afterwards (a group of one left by an earlier single-process DeepSpeed engine is
destroyed at load; a larger world is refused).

Limits: on CUDA a follower that dies inside a forward leaves the leader's NCCL all-reduce to NCCL's
watchdog (timeout_s); a follower that dies while loading fails the leader's load at once (the
leader joins the group only after every follower said it is joining), but one that dies inside the
rendezvous itself leaves the leader there for up to timeout_s; followers wait at most
CONTROL_TIMEOUT for a command list, which the keep-alive covers only while step() keeps being
called (the worker's loop steps every 0.5 s when idle).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_core.deepspeed_engine import forget_tp_group, free_port, rank_engine
from moe_core.engine import Delta, EngineStats, GenerationRequest
from moe_core.torch_engine import TorchEngine

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # collectives and rendezvous; covers the ranks' load-time skew
CONTROL_TIMEOUT = timedelta(days=1)  # a follower's wait for the next command list
KEEPALIVE_S = 60.0  # an idle leader broadcasts at least this often (when its step() is called)
JOIN_S = 10.0  # close(): how long followers get to exit before they are terminated
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------------
# Commands: what the leader broadcasts (pickled) before each step
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Add:
    request: GenerationRequest  # seeded if sampled


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Close:
    pass


_Command = _Add | _Abort | _Close


# --------------------------------------------------------------------------------------------------
# What every rank runs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RankSpec:
    """Everything a rank needs to build its engine (pickled into each follower)."""

    model_dir: Path
    device_type: str  # "cpu" or "cuda"; rank i runs on cuda:i
    dtype: str
    max_batch_size: int
    world_size: int
    master_port: int
    timeout_s: float
    cpu_threads: int  # torch threads per rank on CPU (the leader's share of its threads)
    log_level: int  # the leader's root logging level, for a follower's own log lines

    def device(self, rank: int) -> str:
        return "cpu" if self.device_type == "cpu" else f"cuda:{rank}"

    def environ(self, rank: int) -> dict[str, str]:
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.master_port),
        }

    def build(self, rank: int, before_join: Callable[[], None]) -> TorchEngine:
        """This rank's engine (unloaded); its env must already be set. before_join: see rank_engine."""
        if self.device_type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        return rank_engine(
            self.model_dir,
            device=self.device(rank),
            dtype=self.dtype,
            max_batch_size=self.max_batch_size,
            tensor_parallel_size=self.world_size,
            timeout=timedelta(seconds=self.timeout_s),
            before_join=before_join,
        )


def _control_group() -> Any:
    """The gloo group commands travel in (collective: every rank calls it after loading)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def _follower_main(spec: _RankSpec, rank: int, conn: Connection) -> None:
    """A follower process: load, report ("ready" | "error", detail) on `conn`, then mirror rank 0."""
    _exit_with_parent()
    os.environ.update(spec.environ(rank))
    if not logging.getLogger().handlers:  # a spawned process starts without logging set up
        logging.basicConfig(
            level=spec.log_level, format=f"%(asctime)s tp-rank{rank} %(name)s %(levelname)s: %(message)s"
        )
    try:
        engine = spec.build(rank, before_join=lambda: conn.send(("joining", "")))
        engine.load()
        control = _control_group()
    except BaseException:
        _report(conn, traceback.format_exc())
        raise
    conn.send(("ready", ""))
    try:
        _follow(engine, control)
    except BaseException as e:
        _report(conn, f"{type(e).__name__}: {e}")
        raise
    engine.close()
    forget_tp_group()
    dist.destroy_process_group()
    conn.close()


def _report(conn: Connection, error: str) -> None:
    with contextlib.suppress(OSError):  # the leader may be gone
        conn.send(("error", error))


def _follow(engine: TorchEngine, control: Any) -> None:
    """Receive a command list, apply it, step (deltas dropped); until _Close."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        commands: list[_Command] = box[0]
        for command in commands:
            if isinstance(command, _Close):
                return
            if isinstance(command, _Add):
                engine.add_request(command.request)
            else:
                engine.abort(command.request_id)
        engine.step()


def _exit_with_parent() -> None:
    """Exit this process as soon as its parent (the leader) is gone, whatever it is doing."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel: returns when it dies
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# --------------------------------------------------------------------------------------------------
# The leader
# --------------------------------------------------------------------------------------------------


@dataclass
class _Follower:
    rank: int
    process: BaseProcess
    conn: Connection  # the follower's ("ready" | "error", detail) messages
    error: str = ""

    def read_error(self) -> str:
        """The follower's last reported error, if it sent one."""
        try:
            while self.conn.poll():
                kind, detail = self.conn.recv()
                if kind == "error":
                    self.error = detail.strip().splitlines()[-1] if detail.strip() else detail
        except (EOFError, OSError):
            pass
        return self.error

    def describe(self) -> str:
        error = self.read_error()
        return (
            f"tensor-parallel rank {self.rank} (pid {self.process.pid}) exited with code "
            f"{self.process.exitcode}" + (f": {error}" if error else "")
        )


class TensorParallelEngine:
    """The Engine protocol over N DeepSpeed ranks: rank 0 here, ranks 1..N-1 spawned by load()."""

    name = "deepspeed"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str,
        dtype: str = "auto",
        max_batch_size: int = 64,
        tensor_parallel_size: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """device: "cpu", "cuda" or "cuda:0" (ranks use cuda:0..N-1). timeout_s: see the module
        docstring (a rank that stops answering fails the step after this long)."""
        if tensor_parallel_size < 2:
            raise ValueError("TensorParallelEngine needs tensor_parallel_size >= 2")
        kind = torch.device(device)
        if kind.type not in ("cpu", "cuda") or (kind.type == "cuda" and (kind.index or 0) != 0):
            raise ValueError(
                f"tensor parallelism runs rank i on cuda:i (pin the GPUs with CUDA_VISIBLE_DEVICES); "
                f"device {device!r} is not 'cpu', 'cuda' or 'cuda:0'"
            )
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.tensor_parallel_size = tensor_parallel_size
        self.timeout_s = timeout_s
        self._inner: TorchEngine | None = None  # rank 0's engine
        self._followers: list[_Follower] = []
        self._control: Any = None  # the gloo group for command lists
        self._pending: list[_Command] = []  # recorded since the last broadcast
        self._last_broadcast = 0.0
        self._broken: str | None = None  # why the ranks can no longer be trusted to be in step
        self._closed = False
        self._saved_env: dict[str, str | None] = {}
        self._saved_threads: int | None = None

    # ------------------------------------------------------------------------------ protocol

    @property
    def max_context(self) -> int:
        return self._inner.max_context if self._inner is not None else 0

    @property
    def leader(self) -> TorchEngine:
        """Rank 0's own engine (its model is rank 0's shard)."""
        if self._inner is None:
            raise RuntimeError("the tensor-parallel engine is not loaded")
        return self._inner

    @property
    def follower_pids(self) -> list[int]:
        return [f.process.pid for f in self._followers if f.process.pid is not None]

    def load(self) -> None:
        if self._inner is not None or self._closed:
            raise RuntimeError("a TensorParallelEngine loads once")
        started = time.monotonic()
        _leave_single_process_group()
        spec = _RankSpec(
            model_dir=self.model_dir,
            device_type=torch.device(self.device).type,
            dtype=self.dtype,
            max_batch_size=self.max_batch_size,
            world_size=self.tensor_parallel_size,
            master_port=free_port(),
            timeout_s=self.timeout_s,
            cpu_threads=max(1, torch.get_num_threads() // self.tensor_parallel_size),
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        if spec.device_type == "cuda" and torch.cuda.device_count() < spec.world_size:
            raise RuntimeError(
                f"tensor_parallel_size {spec.world_size} needs {spec.world_size} GPUs; "
                f"this process sees {torch.cuda.device_count()}"
            )
        self._saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
        self._saved_threads = torch.get_num_threads()
        try:
            self._spawn_followers(spec)
            os.environ.update(spec.environ(0))
            deadline = time.monotonic() + self.timeout_s
            # Join only when every follower is about to: one that died loading (or never started:
            # a spawn that cannot import the main module) fails this load at once, not after the
            # rendezvous' timeout.
            inner = spec.build(0, before_join=lambda: self._await_followers("joining", deadline))
            self._inner = inner
            inner.load()
            self._control = _control_group()
            self._await_followers("ready", deadline)
        except BaseException as e:
            reports = "; ".join(f.describe() for f in self._followers if f.read_error())
            self._teardown(graceful=False)
            if reports and isinstance(e, Exception):
                raise RuntimeError(f"tensor-parallel load failed: {e} ({reports})") from e
            raise
        self._last_broadcast = time.monotonic()
        log.info(
            "deepspeed tensor parallel %d: ranks 1..%d are pids %s; loaded in %.1fs",
            spec.world_size,
            spec.world_size - 1,
            self.follower_pids,
            time.monotonic() - started,
        )

    def count_tokens(self, prompt: str) -> int:
        return self.leader.count_tokens(prompt)

    def add_request(self, request: GenerationRequest) -> None:
        params = request.params
        if params.temperature > 0 and params.seed is None:  # every rank must draw the same tokens
            request = replace(request, params=replace(params, seed=secrets.randbits(63)))
        self.leader.add_request(request)  # raises ValueError before anything is recorded
        self._pending.append(_Add(request))

    def abort(self, request_id: str) -> None:
        self.leader.abort(request_id)
        self._pending.append(_Abort(request_id))

    def step(self) -> list[Delta]:
        inner = self._usable()
        idle = not self._pending and not inner.has_unfinished()
        if idle and time.monotonic() - self._last_broadcast < KEEPALIVE_S:
            return []  # nothing to step: the followers keep waiting in the broadcast
        for follower in self._followers:
            if not follower.process.is_alive():
                self._broken = follower.describe()
                raise RuntimeError(self._broken)
        commands, self._pending = self._pending, []
        try:
            dist.broadcast_object_list([commands], src=0, group=self._control)
            deltas = inner.step()
        except Exception as e:
            dead = [f.describe() for f in self._followers if not _alive_soon(f.process)]
            self._broken = f"tensor-parallel step failed: {type(e).__name__}: {e}" + (
                f" ({'; '.join(dead)})" if dead else ""
            )
            raise RuntimeError(self._broken) from e
        self._last_broadcast = time.monotonic()
        return deltas

    def wake(self) -> None:
        """step() computes and returns: nothing to wake."""

    def has_unfinished(self) -> bool:
        return self._inner is not None and self._inner.has_unfinished()

    def stats(self) -> EngineStats:
        if self._inner is None:
            return EngineStats(running=0, waiting=0, steps=0, max_batch_seen=0, tokens_generated=0)
        return self._inner.stats()

    def expert_tokens(self) -> dict[str, list[list[int]]]:
        return self._inner.expert_tokens() if self._inner is not None else {}

    def close(self) -> None:
        """Stop the followers (politely if the ranks are in step), free rank 0, leave the group."""
        if self._closed:
            return
        self._closed = True
        graceful = (
            self._broken is None
            and self._control is not None
            and all(f.process.is_alive() for f in self._followers)
        )
        if graceful:
            try:
                dist.broadcast_object_list([[_Close()]], src=0, group=self._control)
            except Exception:
                log.exception("telling the tensor-parallel followers to stop")
                graceful = False
        self._teardown(graceful)

    # ------------------------------------------------------------------------------ internals

    def _usable(self) -> TorchEngine:
        if self._closed:
            raise RuntimeError("the tensor-parallel engine is closed")
        if self._broken is not None:
            raise RuntimeError(f"the tensor-parallel engine is broken: {self._broken}")
        return self.leader

    def _spawn_followers(self, spec: _RankSpec) -> None:
        context = mp.get_context("spawn")
        for rank in range(1, spec.world_size):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_follower_main, args=(spec, rank, send), name=f"deepspeed-tp{rank}", daemon=True
            )
            process.start()
            send.close()  # the follower holds the only write end: EOF once it is gone
            self._followers.append(_Follower(rank, process, receive))

    def _await_followers(self, stage: str, deadline: float) -> None:
        """Wait for every follower's `stage` message: "joining" (loaded, about to join the process
        group) then "ready" (past the control group); an "error" or a dead follower fails at once."""
        for follower in self._followers:
            while True:
                while not follower.conn.poll(0.1):
                    if not follower.process.is_alive():
                        raise RuntimeError(follower.describe())
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"tensor-parallel rank {follower.rank} did not load in time")
                try:
                    kind, detail = follower.conn.recv()
                except EOFError:  # it closed its end: it is gone (or going) without a word
                    follower.process.join(5)
                    raise RuntimeError(follower.describe()) from None
                if kind == stage:
                    break
                if kind == "error":
                    follower.error = detail
                    raise RuntimeError(f"tensor-parallel rank {follower.rank} failed to load: {detail}")

    def _teardown(self, graceful: bool) -> None:
        """Join (graceful) or terminate the followers, free rank 0, destroy the process group.
        Graceful: rank 0 leaves the group while the followers leave theirs (NCCL's teardown may
        wait for every rank: joining them first made them wait out JOIN_S on the H200)."""
        if graceful:
            self._leave_group()
        for follower in self._followers:
            follower.process.join(JOIN_S if graceful else 0)
            if follower.process.is_alive():
                if graceful:
                    log.warning("tensor-parallel rank %d did not stop: terminating it", follower.rank)
                follower.process.terminate()
                follower.process.join(5)
            if follower.process.is_alive():
                follower.process.kill()
                follower.process.join()
            follower.conn.close()
        if not graceful:
            self._leave_group()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)

    def _leave_group(self) -> None:
        """Free rank 0's engine and leave the process group (and DeepSpeed's TP group)."""
        if self._inner is not None:
            self._inner.close()
        self._control = None
        forget_tp_group()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _alive_soon(process: BaseProcess, wait_s: float = 0.5) -> bool:
    """Whether `process` still runs after up to `wait_s` (a killed peer is reaped shortly after
    its sockets close, which is how the leader's collective learns about it)."""
    process.join(wait_s)
    return process.is_alive()


def _leave_single_process_group() -> None:
    """Leave a group of one that an earlier single-process DeepSpeed engine left in this process
    (its models need no collectives); any larger world belongs to someone else."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world != 1:
        raise RuntimeError(
            f"this process already belongs to a torch.distributed world of {world}: "
            "a TensorParallelEngine starts its own world (use the launcher's ranks instead)"
        )
    log.info("leaving this process's single-rank torch.distributed group to start a tensor-parallel one")
    forget_tp_group()
    dist.destroy_process_group()
