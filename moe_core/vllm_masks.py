"""Structured outputs in vLLM's engine core: a grammar compiled once per distinct constraint, a
step's token masks filled in one native call.

At every decode step vLLM's StructuredOutputManager fills one mask row per structured request
(ceil(V / 32) int32 words: bit t set = token t allowed) into its mask tensor [rows, ceil(V / 32)],
rows in the step's order. vLLM 0.26 fills them with one Python call per row, one by one up to 128
rows and in chunks of 16 on a thread pool above that. Under async scheduling that fill is on the
step's critical path: a structured step's forward is launched at once, but its sampling waits for
the previous step's tokens and then for its masks, so a fill longer than the forward slows every
step.

LocalMoE's engine core runs vLLM's own scheduler with one change (`scheduler`, handed to vLLM as
its `scheduler_cls`): its manager fills every llguidance row of a step in one call to llguidance's
parallel fill (`fill_next_token_bitmask_par`: the rows spread over native threads, no Python and
no GIL per row); a row vLLM leaves unconstrained (a terminated grammar, reasoning not yet over) is
all ones as vLLM writes it, and another backend's grammar (xgrammar) is filled by vLLM's own code.
Which rows are constrained is still vLLM's decision, and with speculative tokens vLLM keeps its own
per-token path.

vLLM's guidance backend also compiles a grammar for every request, and each new matcher then
builds its lexer's states afresh as its request decodes. The same manager keeps one compiled
grammar per distinct constraint (`GrammarCache`, in place of its `_create_grammar`: kind, spec and
stop tokens; least recently used past 256) and hands each request a copy of it (llguidance's
`deep_copy`, a few µs), as the torch engine does (moe_core/structured.py); the copies' masks also
cost less than fresh matchers' do. What both save: `python -m bench.engine_core_masks` (a decode
simulated on vLLM's own manager, each way; figures in BENCHMARKS.md).

The seam, the same in vLLM 0.26 and 0.32: above `fill_bitmask_parallel_threshold` rows and
without speculative tokens the manager gathers (grammar, row, constrain) triples, hands each
`fill_bitmask_parallel_batch_size` of them to `_async_submit_fill_bitmask` and waits on the
futures it returns; a request's grammar comes from `_create_grammar(request)` (on the manager's
compile threads). `install` sets the threshold to 0 and the chunk past any batch, so each step's
rows come in one list, puts `ParallelFill` in the submit's place and `GrammarCache` in the
create's. vLLM imports this module in its engine-core process; it imports vLLM lazily.

Scheduling ahead (`ScheduleAhead`, on unless the engine is told otherwise). Under async scheduling a
structured step's sampling is deferred: vLLM's loop launches step k+1's forward, waits for step
k's tokens, takes them in (update_from_output: the grammars' accepts), fills k+1's masks, launches
k+1's sampling and only then, at its next turn, schedules k+2. One thread does all of it in turn.
The fill is native and frees the GIL, so LocalMoE's scheduler runs k+2's `schedule()` on the
engine-core thread while a driver thread waits in the fill, and hands that output to the loop's
next `schedule()` call. The scheduler's calls keep vLLM's order (schedule k+1, update k, schedule
k+2, update k+1, ...) and the model runner's do too (execute k+1, sample k+1, execute k+2); what
moves is that requests added or aborted between two steps reach the scheduler one step later,
as they would had they come during the step, and an aborted request already in k+2 runs one more
step as an in-flight one does. Only the deferred call (its output has
`pending_structured_output_tokens`) schedules ahead: a step sampled at once has its masks before
the previous step's update, and a schedule there would come before that update, not vLLM's order.

Accepts in the fill (`DeferredAccept`, on the grammars GrammarCache hands out). vLLM's scheduler
advances each structured request's grammar by its sampled tokens in update_from_output, one request
after another on the engine-core thread (llguidance's consume holds the GIL), in series with the
rest of the step. Nothing reads a matcher between that update and the next fill of its mask but the
grammar's own calls, so a copy holds a step's one sampled token (not an end of sequence, the
grammar not terminated) and ParallelFill consumes every held token of its rows in one native call
(llguidance's `consume_token_par`: the GIL released, the rows over its threads) just before it
fills their masks, on the thread that fills beside the next schedule. Any other call that reads the
matcher (validate_tokens, rollback, fill_bitmask: vLLM's speculative and serial paths) consumes
the held token first, so every mask is the one vLLM's order gives. A token the matcher rejects
(vLLM's "Unexpected" branch: impossible under a mask) makes the request's next accept return False,
and vLLM ends it with an error one token later than its own accept would.

Both schedulers also seat an urgent request by preempting a batch-tier row where the engine asks
for it (moe_core/vllm_seating.py).
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from moe_core import vllm_bitmask, vllm_seating
from moe_core.structured import Templates, fill_threads

logger = logging.getLogger(__name__)

SCHEDULER = f"{__name__}.scheduler"  # vLLM's scheduler_cls
SCHEDULER_IN_TURN = f"{__name__}.scheduler_in_turn"  # the same, without scheduling ahead
# The GIL's switch interval while a fill overlaps the next schedule (CPython's default is 5 ms: the
# driver thread would wait that long for the GIL to start the fill, and again to end it)
SWITCH_S = 50e-6


class ParallelFill:
    """The manager's `_async_submit_fill_bitmask`: fills one step's rows, given as (grammar, row,
    constrain) triples, into the manager's mask tensor and returns a future already done."""

    def __init__(self, manager: Any, threads: int) -> None:
        import llguidance
        import llguidance.torch as llt
        from vllm.v1.structured_output.backend_guidance import GuidanceGrammar

        self.manager = manager
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.threads = threads
        self._fill_par = llt.fill_next_token_bitmask_par
        self._guided = GuidanceGrammar
        self.calls = 0  # steps filled here
        self.parallel_rows = 0  # llguidance rows among them
        self.deferred = 0  # held tokens consumed here (DeferredAccept), in the fill's native call
        self.overlapped = 0  # fills that ran `during` beside them
        # run once on the calling thread while the next fill's llguidance rows fill (then cleared)
        self.during: Callable[[], None] | None = None
        self._driver: ThreadPoolExecutor | None = None  # its one thread waits in the native fill

    def __call__(self, batch: list[tuple[Any, int, bool]]) -> Future[None]:
        mask = self.manager._grammar_bitmask  # [max_num_seqs, ceil(V / 32)] int32, contiguous
        free: list[int] = []
        matchers: list[tuple[Any, int]] = []
        guided: list[Any] = []
        others: list[tuple[Any, int, bool]] = []
        consumes: list[tuple[Any, int]] = []  # (matcher, held token): consumed before any row fills
        consumers: list[Any] = []
        for grammar, row, constrain in batch:
            token = getattr(grammar, "localmoe_pending", None)
            if token is not None:
                grammar.localmoe_pending = None
                if not grammar.ll_matcher.is_stopped():  # stopped: vLLM's accept consumes nothing
                    consumes.append((grammar.ll_matcher, token))
                    consumers.append(grammar)
            if not constrain or grammar.is_terminated():
                free.append(row)
            elif isinstance(grammar, self._guided):
                matchers.append((grammar.ll_matcher, row))
                guided.append(grammar)
            else:
                others.append((grammar, row, constrain))
        if free:
            mask[free] = -1  # every token allowed, as vLLM fills such a row
        during, self.during = self.during, None
        accepted: list[bool] = []
        if (matchers or consumes) and during is not None:
            if self._driver is None:
                self._driver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localmoe-fill")
            interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_S)  # the driver takes the GIL at once to start the fill
            try:
                filling = self._driver.submit(self._consume_fill, consumes, matchers, mask)
                try:
                    during()  # the GIL is free: llguidance's threads consume and fill meanwhile
                finally:
                    accepted = filling.result()  # the rows written (or the error raised) before they are read
            finally:
                sys.setswitchinterval(interval)
            self.overlapped += 1
        elif matchers or consumes:
            accepted = self._consume_fill(consumes, matchers, mask)
        for grammar, ok in zip(consumers, accepted, strict=True):
            if not ok:  # vLLM's "Unexpected" branch: the request's next accept says so
                grammar.localmoe_rejected = True
                grammar.check_error()
                logger.error("Unexpected: a grammar rejected its request's sampled token")
        if matchers:
            for grammar in guided:
                grammar.check_error()  # vLLM's warning for a matcher in error, once per grammar
        if others:
            self.manager._fill_bitmasks(others)
        self.calls += 1
        self.parallel_rows += len(matchers)
        self.deferred += len(consumes)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _consume_fill(
        self, consumes: list[tuple[Any, int]], matchers: list[tuple[Any, int]], mask: Any
    ) -> list[bool]:
        """The held tokens consumed (one per matcher, in one native call), then the rows filled:
        each matcher's mask after its token, as vLLM's order has it. Whether each token was taken."""
        accepted = self.executor.consume_token_par(consumes) if consumes else []
        if matchers:
            self._fill_par(self.executor, matchers, mask)
        return accepted


class GrammarCache:
    """The manager's `_create_grammar`: with vLLM's guidance backend, vLLM's compile once per
    distinct (kind, spec, stop tokens) and a copy per request (moe_core/structured.py `Templates`,
    the torch engine's cache too); with another backend, or a spec that cannot be a key, vLLM's
    compile for the request alone."""

    def __init__(self, manager: Any, create: Callable[[Any], Any], capacity: int = 256) -> None:
        from vllm.v1.structured_output.backend_guidance import GuidanceBackend

        self.manager = manager  # its backend is made with the first structured request
        self.create = create  # vLLM's own _create_grammar (raises where a spec does not compile)
        self.templates: Templates[Any] = Templates(self._copy, capacity)
        self._guidance = GuidanceBackend
        self.defer = True  # copies hold their accepts for the fill (DeferredAccept); False: vLLM's accepts

    def _copy(self, template: Any) -> Any:
        return _copy_grammar(template, self.defer)

    @property
    def compiles(self) -> int:
        return self.templates.compiles

    @property
    def copies(self) -> int:
        return self.templates.copies

    def __call__(self, request: Any) -> Any:
        if not isinstance(self.manager.backend, self._guidance):
            return self.create(request)
        kind, spec = request.structured_output_request.structured_output_key
        stops = getattr(request.sampling_params, "all_stop_token_ids", None) or ()
        key = (kind, spec, tuple(sorted(stops)))
        try:
            hash(key)
        except TypeError:  # a spec vLLM keeps as a dict: compiled for this request alone
            return self.create(request)
        return self.templates.get(key, lambda: self.create(request))


def _copy_grammar(template: Any, defer: bool = True) -> Any:
    """A GuidanceGrammar as compiled (not terminated), with a matcher of its own, whose accepts
    are held for the next fill (DeferredAccept) unless not `defer`."""
    base: Any = type(template)
    if isinstance(template, DeferredAccept) or not defer:
        grammar = copy.copy(template)
    else:
        grammar = object.__new__(deferring(base))  # copy.copy's way, into the mixed class
        grammar.__dict__.update(template.__dict__)
    grammar.ll_matcher = template.ll_matcher.deep_copy()
    return grammar


class DeferredAccept:
    """Mixed into vLLM's GuidanceGrammar (see the module's docstring): a step's one sampled token
    is held (`localmoe_pending`) for ParallelFill to consume with the other rows' in one native call;
    every other call that reads the matcher consumes it first."""

    localmoe_pending: int | None = None  # the token accepted and not yet consumed
    localmoe_rejected = False  # a held token the matcher refused: the next accept returns False

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        if not self.consume_held():
            return False
        g: Any = self
        if len(tokens) == 1 and not g.terminated and tokens[0] != g.ll_tokenizer.eos_token:
            self.localmoe_pending = tokens[0]
            return True
        return bool(super().accept_tokens(request_id, tokens))  # type: ignore[misc]

    def consume_held(self) -> bool:
        """The held token consumed now, as vLLM's accept would have; False once one was refused."""
        token, self.localmoe_pending = self.localmoe_pending, None
        if token is not None and not super().accept_tokens("", [token]):  # type: ignore[misc]
            self.localmoe_rejected = True
        return not self.localmoe_rejected

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        self.consume_held()
        return list(super().validate_tokens(tokens))  # type: ignore[misc]

    def rollback(self, num_tokens: int) -> None:
        self.consume_held()
        super().rollback(num_tokens)  # type: ignore[misc]

    def fill_bitmask(self, bitmask: Any, idx: int) -> None:
        self.consume_held()
        super().fill_bitmask(bitmask, idx)  # type: ignore[misc]

    def reset(self) -> None:
        self.localmoe_pending, self.localmoe_rejected = None, False
        super().reset()  # type: ignore[misc]


@functools.cache
def deferring(base: Any) -> type:
    """`base` (vLLM's GuidanceGrammar) with DeferredAccept's accepts."""
    return type(f"Deferred{base.__name__}", (DeferredAccept, base), {})


class Installed(NamedTuple):
    fill: ParallelFill
    grammars: GrammarCache


def install(manager: Any, threads: int | None = None) -> Installed | None:
    """Have `manager` (vLLM's StructuredOutputManager) fill each step's rows with ParallelFill and
    make its grammars with a GrammarCache; None, and vLLM's own ways left in place, where this vLLM
    has not the seam."""
    seam = ("fill_bitmask_parallel_threshold", "_async_submit_fill_bitmask", "_fill_bitmasks")
    if not all(hasattr(manager, name) for name in (*seam, "_create_grammar")):
        logger.warning("this vLLM's structured-output manager has not the seam: its own ways stay")
        return None
    fill = ParallelFill(manager, fill_threads() if threads is None else threads)
    if not hasattr(manager, "executor_for_fillmask"):
        # vLLM makes this pool only above 128 rows, and 0.32's clear_backend (at the engine core's
        # shutdown) shuts it down whenever the threshold is below max_num_seqs, as it is now: an
        # empty pool (no thread starts until a submit, and nothing submits to it) for that
        from concurrent.futures import ThreadPoolExecutor

        manager.executor_for_fillmask = ThreadPoolExecutor(max_workers=1)
    manager.fill_bitmask_parallel_threshold = 0  # every step's rows take the batched path
    manager.fill_bitmask_parallel_batch_size = sys.maxsize  # all of them in one list
    manager._async_submit_fill_bitmask = fill
    grammars = GrammarCache(manager, manager._create_grammar)
    manager._create_grammar = grammars
    return Installed(fill, grammars)


def vllms_scheduler(*args: Any, **kwargs: Any) -> Any:
    """The scheduler vLLM would build from the engine core's arguments: AsyncScheduler under async
    scheduling, Scheduler otherwise."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    config = _config(args, kwargs)
    base = AsyncScheduler if config.scheduler_config.async_scheduling else Scheduler
    return base(*args, **kwargs)


def _config(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The VllmConfig among a scheduler's arguments."""
    return kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]


AHEAD_SEAM = ("schedule", "has_requests", "get_grammar_bitmask")  # the scheduler's calls ScheduleAhead wraps


class ScheduleAhead:
    """Wraps a vLLM scheduler (its instance's schedule, has_requests and get_grammar_bitmask) so
    that a deferred structured step's mask fill (ParallelFill) runs the next step's `schedule()`
    beside it, and the loop's next `schedule()` call gets that output (the module's docstring)."""

    def __init__(self, sched: Any, fill: ParallelFill) -> None:
        self.fill = fill
        self.ahead: Any = None  # a SchedulerOutput scheduled during a fill, not yet handed out
        self.scheduled_ahead = 0  # steps scheduled so
        self._schedule, self._has_requests = sched.schedule, sched.has_requests
        self._grammar_bitmask = sched.get_grammar_bitmask
        sched.schedule, sched.has_requests = self.schedule, self.has_requests
        sched.get_grammar_bitmask = self.get_grammar_bitmask

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.ahead is None:
            return self._schedule(*args, **kwargs)
        out, self.ahead = self.ahead, None
        return out

    def has_requests(self) -> bool:
        return self.ahead is not None or bool(self._has_requests())

    def get_grammar_bitmask(self, scheduler_output: Any) -> Any:
        if self.ahead is not None or not getattr(scheduler_output, "pending_structured_output_tokens", False):
            return self._grammar_bitmask(scheduler_output)
        self.fill.during = self._schedule_next
        try:
            return self._grammar_bitmask(scheduler_output)
        finally:
            self.fill.during = None  # unused where the step had no llguidance row to fill

    def _schedule_next(self) -> None:
        if self._has_requests():
            self.ahead = self._schedule()
            self.scheduled_ahead += 1


def scheduler(*args: Any, **kwargs: Any) -> Any:
    """vLLM's scheduler_cls: the scheduler vLLM would build (vllms_scheduler), `install`ed in its
    structured-output manager, scheduling ahead during deferred fills; the model runner in this
    process applies the masks from kept host memory (moe_core/vllm_bitmask.py)."""
    built = vllms_scheduler(*args, **kwargs)
    vllm_seating.install(built)  # before ScheduleAhead: steps scheduled ahead seat too
    installed = install(built.structured_output_manager)
    vllm_bitmask.install()
    if installed is not None and all(hasattr(built, name) for name in AHEAD_SEAM):
        built.localmoe_ahead = ScheduleAhead(built, installed.fill)
    elif installed is not None:
        logger.warning("this vLLM's scheduler has not %s: each step scheduled at the loop's turn", AHEAD_SEAM)
    return built


def scheduler_in_turn(*args: Any, **kwargs: Any) -> Any:
    """`scheduler` without scheduling ahead: each step scheduled at the loop's own turn (the
    masks' staging as `scheduler`'s)."""
    built = vllms_scheduler(*args, **kwargs)
    vllm_seating.install(built)
    install(built.structured_output_manager)
    vllm_bitmask.install()
    return built
