"""The PyTorch / transformers engine: continuous batching over one DynamicCache (nano-vllm style).

Each `step()` is one forward pass:

* prefill, when requests wait and the batch has free slots: the admitted prompts are left-padded to
  a common length and run together; their first tokens are sampled and their KV rows are merged
  into the running batch's cache (both sides left-padded to a common length);
* decode otherwise: the last sampled token of every running request, as a [B, 1] input.

Finished and aborted rows leave the cache at once, and left columns that are padding in every row
are trimmed. Each row carries its own attention-mask row and position counter, so left padding
never shifts positions: a request's logits do not depend on its batch companions (up to float
rounding from different matrix shapes).

Cache layout: all layers are plain `DynamicLayer`s (`cache.layers[i].keys/.values`: [B, H_kv, T, D]),
even for configs with sliding-window layers, whose window is then applied by the attention mask over
cache columns (padding columns count towards the window).

Too-long prompts: a request whose prompt holds >= max_context tokens (or max_tokens <= 0) is not
run; the next `step()` returns its final delta with FinishReason.LENGTH and empty text. An empty
prompt (no tokens at all) raises ValueError from `add_request`.
"""

from __future__ import annotations

import gc
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from host.heap import thaw_heap
from moe_core.detokenize import IncrementalDetokenizer, StopStringBuffer
from moe_core.engine import (
    Delta,
    EngineStats,
    FinishReason,
    GenerationRequest,
    PromptLogprob,
    SamplingParams,
    TokenLogprob,
)
from moe_core.expert_cache import CacheStats, ExpertCache
from moe_core.loader import load_model, resolve_dtype
from moe_core.sampling import adjust_logits, apply_token_bitmask, make_generator, sample_next_tokens
from moe_core.structured import Grammars
from moe_core.telemetry import PADDING, ExpertTelemetry, routers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

YIELD_IDLE_S = 0.002  # a step with only batch-tier requests waiting out batch_yield's hold sleeps this
WARMUP_PROMPTS = ("Hello", "def warm_up(engine):\n    return engine.step()")


# --------------------------------------------------------------------------------------------------
# Per-request state
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sequence:
    """One request from add_request until its final delta."""

    request: GenerationRequest
    prompt_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stops: StopStringBuffer
    generator: torch.Generator | None
    matcher: Any = None  # an llguidance LLMatcher following this request's tokens (params.structured)
    output_ids: list[int] = field(default_factory=list)
    arrival: int = 0  # the engine's count of requests added before it: FIFO within a priority
    finish_reason: FinishReason | None = None
    error: str | None = None  # with FinishReason.ERROR

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def __lt__(self, other: _Sequence) -> bool:  # the waiting heap's order
        return self.order < other.order

    @property
    def order(self) -> tuple[int, int]:
        """Waiting requests are taken lowest first: by priority rank, then arrival."""
        return self.request.priority, self.arrival

    @property
    def fed_ids(self) -> list[int]:
        """What a prefill feeds: the prompt, and a preempted request's tokens so far (recomputed:
        sampling goes on from its last token)."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    def delta(self, text: str, token_ids: list[int], logprob: TokenLogprob | None = None) -> Delta:
        return Delta(
            request_id=self.request_id,
            text=text,
            token_ids=token_ids,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            finish_reason=self.finish_reason,
            error=self.error,
            logprobs=[logprob] if logprob is not None else None,
        )

    def finish(self, reason: FinishReason) -> str:
        """Mark finished; returns the held-back text that now belongs to the output."""
        self.finish_reason = reason
        return "" if reason == FinishReason.STOP and self.stops.stopped else self.stops.flush()


# --------------------------------------------------------------------------------------------------
# KV-cache surgery: every tensor below is indexed [row, ...] with rows aligned to _Batch.seqs
# --------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """The running batch: its cache and, per row, what the next decode forward needs.

    Invariants: cache keys/values are [B, H_kv, T, D] with T == mask.shape[1]; mask[b, t] is 1 where
    column t holds a real token of row b (left padding is 0); positions[b] == mask[b].sum(), the
    position id of the next token fed for row b; last_tokens[b] is row b's sampled, unfed token.
    """

    seqs: list[_Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [B, T] int64
    positions: torch.Tensor  # [B] int64
    last_tokens: torch.Tensor  # [B] int64


def _kv(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """Every layer with its keys and values, each [B, H_kv, T, D]."""
    out = []
    for layer in cache.layers:
        # Plain attention layers only: the cache is built without a config (see the module docstring).
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        out.append((layer, layer.keys, layer.values))
    return out


def _map_kv(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every layer's keys and values by fn(them)."""
    for layer, keys, values in _kv(cache):
        layer.keys, layer.values = fn(keys), fn(values)


def _pad_left(batch: _Batch, columns: int) -> None:
    """Prepend `columns` padding columns (zero K/V, mask 0) to every row."""
    if columns > 0:
        _map_kv(batch.cache, lambda t: F.pad(t, (0, 0, columns, 0)))  # pads D by (0, 0), T by (columns, 0)
        batch.mask = F.pad(batch.mask, (columns, 0))


def _concat_rows(a: _Batch, b: _Batch) -> _Batch:
    """Rows of a then rows of b, in a's cache object; both are left-padded to a common length."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    _pad_left(a, length - a.mask.shape[1])
    _pad_left(b, length - b.mask.shape[1])
    for (layer, keys_a, values_a), (_, keys_b, values_b) in zip(_kv(a.cache), _kv(b.cache), strict=True):
        layer.keys, layer.values = torch.cat([keys_a, keys_b]), torch.cat([values_a, values_b])
    return _Batch(
        seqs=a.seqs + b.seqs,
        cache=a.cache,
        mask=torch.cat([a.mask, b.mask]),
        positions=torch.cat([a.positions, b.positions]),
        last_tokens=torch.cat([a.last_tokens, b.last_tokens]),
    )


def _select_rows(batch: _Batch, rows: list[int]) -> None:
    """Keep only `rows` (in that order), then drop left columns that are now padding in every row."""
    if rows == list(range(len(batch.seqs))):
        return
    index = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
    _map_kv(batch.cache, lambda t: t[index])
    batch.seqs = [batch.seqs[r] for r in rows]
    batch.mask = batch.mask[index]
    batch.positions = batch.positions[index]
    batch.last_tokens = batch.last_tokens[index]
    _trim_left(batch)


def _trim_left(batch: _Batch) -> None:
    """Drop the leading columns that are padding in every row."""
    if not batch.seqs:
        return
    used = batch.mask.any(dim=0)  # [T]; the last column is always used
    first = int(torch.argmax(used.to(torch.int8)).item())  # first column some row uses
    if first > 0:
        _map_kv(batch.cache, lambda t: t[:, :, first:])
        batch.mask = batch.mask[:, first:]


def _zero_padding(cache: DynamicCache, mask: torch.Tensor) -> None:
    """Zero K/V in padding columns. mask: [B, T].

    A left-padded prompt's pad queries attend to nothing; some attention kernels return NaN for
    such rows, and NaN * 0 would later leak into real queries' attention over those columns.
    """
    pad = ~mask.bool()[:, None, :, None]  # [B, 1, T, 1]
    _map_kv(cache, lambda t: t.masked_fill(pad, 0))


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class TorchEngine:
    """Continuous-batching engine over a transformers `AutoModelForCausalLM`. Single-threaded."""

    name = "torch"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        max_batch_size: int = 64,
        max_context: int | None = None,
        max_prefill_tokens: int = 16384,
        max_scored_logits_bytes: int = 1 << 30,
        prepare: Callable[[PreTrainedModel], torch.nn.Module] | None = None,
        name: str | None = None,
        telemetry: bool = True,
        expert_cache: float | None = None,
        batch_yield: tuple[int, int, float] | None = None,
    ) -> None:
        """max_prefill_tokens bounds one prefill's padded size (admitted prompts x longest prompt);
        one prompt is always admitted, however long. A prefill with a row whose prompt is scored
        (prompt_logprobs) keeps every position's logits, [N, L, V]: its padded size is bounded
        further so that they take at most max_scored_logits_bytes (as float32).

        prepare: applied by load() to the loaded model before warm-up; every forward pass then calls
        what it returns (e.g. a DeepSpeed wrapper), with the same keyword arguments. The config and
        generation config are still read from the model itself. name: reported instead of "torch".
        expert_cache: keep this share of each MoE layer's routed experts on the device and the rest
        in (pinned) host memory (moe_core/expert_cache.py); None: every weight on the device.
        batch_yield: (rank, rows, hold_s): while requests more urgent than `rank` (priority < rank)
        are running or waiting, and hold_s after the last of them, requests of that rank or higher
        (the batch tier) hold at most `rows` rows: those past it are preempted (latest first) and no
        more are admitted (None: they run beside anything, preempted only one for one)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_scored_logits_bytes = max_scored_logits_bytes
        self._scored_prefill_tokens = max_prefill_tokens  # set by load() from the vocabulary
        self._prepare = prepare
        self._expert_fraction = expert_cache
        self._yield = batch_yield
        self.expert_cache: ExpertCache | None = None
        self._want_telemetry = telemetry
        self.telemetry: ExpertTelemetry | None = None
        self._tag_key: tuple[str, ...] = ()  # the rows whose tag ids _tag_ids holds
        self._tag_ids = torch.zeros(0, dtype=torch.int64)
        if name is not None:
            self.name = name
        self._requested_max_context = max_context
        self.max_context = max_context or 0  # set by load() from the config when not given
        self.model: Any = None
        self.tokenizer: Any = None
        self._device = torch.device(device)
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._grammars: Grammars | None = None  # built with the first constrained request
        # Told the requests a prefill step admits before it computes them (the worker records them:
        # a death in that step counts against their attempts, scheduler/record.py REQUEUE).
        self.on_seated: Callable[[list[str]], None] | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._waiting: list[_Sequence] = []  # a heap by _Sequence.order
        self._arrivals = 0
        self._batch: _Batch | None = None
        self._finished: list[Delta] = []  # final deltas owed by the next step (aborts, rejected prompts)
        self._ids: set[str] = set()  # every request not yet given its final delta
        self._steps = 0
        self._max_batch_seen = 0
        self._tokens_generated = 0
        self._urgent_at = -float("inf")  # time.monotonic() of the last step that saw urgent work
        self._batch_room: int | None = None  # batch-tier rows this step may still admit (None: any)

    # ---------------------------------------------------------------------------------- loading

    def load(self) -> None:
        started = time.monotonic()
        if self._expert_fraction is None:
            model, self.tokenizer = load_model(self.model_dir, self.device, self.dtype)
        else:  # in host memory first: all of it may not fit the device
            dtype = str(resolve_dtype(self.device, self.dtype)).removeprefix("torch.")
            model, self.tokenizer = load_model(self.model_dir, "cpu", dtype)
            self.expert_cache = ExpertCache(model, self.device, self._expert_fraction)
        if self._want_telemetry and routers(model):
            self.telemetry = ExpertTelemetry(model)  # hooks stay with the modules under any wrapper
        self.model = self._prepare(model) if self._prepare is not None else model
        self._device = next(self.model.parameters()).device
        if self.telemetry is not None:
            self.telemetry.to(self._device)  # a TP model is loaded on the CPU and placed by _prepare
        if self._device.type == "cuda":
            # Process-wide: cuDNN's SDPA builds an execution plan for every new (batch, length) shape,
            # and continuous batching makes a new shape almost every step (measured on an H200, bf16:
            # 64 x 64 tokens took 4.2 s with it, 0.54 s without; the mem-efficient kernel takes over).
            torch.backends.cuda.enable_cudnn_sdp(False)
        config = model.config
        vocab = int(config.vocab_size)
        self._scored_prefill_tokens = min(
            self.max_prefill_tokens, self.max_scored_logits_bytes // (4 * vocab)
        )
        if not self._requested_max_context:
            self.max_context = int(config.max_position_embeddings)
        self._eos_ids = frozenset(_eos_token_ids(model, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else min(self._eos_ids, default=0)
        self._warm_up()
        elapsed = time.monotonic() - started
        log.info("%s engine loaded %s on %s in %.1fs", self.name, self.model_dir, self._device, elapsed)

    def _warm_up(self) -> None:
        """A batched prefill (two lengths) and a decode step, so the first request is not slow."""
        for i, prompt in enumerate(WARMUP_PROMPTS):
            self.add_request(GenerationRequest(f"__warmup-{i}", prompt, SamplingParams(max_tokens=2)))
        while self.has_unfinished():
            self.step()
        self._reset_state()
        if self.telemetry is not None:
            self.telemetry.reset()

    # ------------------------------------------------------------------------------- public API

    def count_tokens(self, prompt: str) -> int:
        return len(self._tokenize(prompt))

    def add_request(self, request: GenerationRequest) -> None:
        if request.request_id in self._ids:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        prompt_ids = request.prompt_ids(self._tokenize)
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens")
        matcher = self._matcher(request.params.structured) if request.params.structured else None
        seq = _Sequence(
            request=request,
            prompt_ids=prompt_ids,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, prompt_ids, request.params.skip_special_tokens
            ),
            stops=StopStringBuffer(request.params.stop, request.params.include_stop_str_in_output),
            generator=make_generator(request.params, self._device),
            matcher=matcher,
            arrival=self._arrivals,
        )
        self._arrivals += 1
        self._ids.add(request.request_id)
        if len(prompt_ids) >= self.max_context or request.params.max_tokens <= 0:
            seq.finish(FinishReason.LENGTH)  # backstop: the API rejects these earlier
            self._finished.append(seq.delta("", []))
        else:
            heapq.heappush(self._waiting, seq)

    def abort(self, request_id: str) -> None:
        """Drop the request now (its batch row too); the next step returns its ABORT delta."""
        for i, seq in enumerate(self._waiting):
            if seq.request_id == request_id:
                del self._waiting[i]
                heapq.heapify(self._waiting)
                self._finish_aborted(seq)
                return
        batch = self._batch
        if batch is not None:
            for row, seq in enumerate(batch.seqs):
                if seq.request_id == request_id:
                    with torch.inference_mode():
                        _select_rows(batch, [r for r in range(len(batch.seqs)) if r != row])
                    self._finish_aborted(seq)
                    return

    def step(self) -> list[Delta]:
        deltas, self._finished = self._finished, []
        with torch.inference_mode():
            self._preempt()
            self._batch_room = self._yield_rows()
            if self._waiting and self._running() < self.max_batch_size and self._admissible():
                deltas += self._prefill_step()
            elif self._running():
                deltas += self._decode_step()
            elif self._waiting:  # only the batch tier, yielding still (batch_yield's hold): no spin
                time.sleep(YIELD_IDLE_S)
        for delta in deltas:
            if delta.finish_reason is not None:
                self._ids.discard(delta.request_id)
        return deltas

    def wake(self) -> None:
        """step() computes and returns: nothing to wake."""

    def has_unfinished(self) -> bool:
        return bool(self._ids)

    def stats(self) -> EngineStats:
        cache = self.expert_cache.stats if self.expert_cache is not None else CacheStats()
        return EngineStats(
            running=self._running(),
            waiting=len(self._waiting),
            steps=self._steps,
            max_batch_seen=self._max_batch_seen,
            tokens_generated=self._tokens_generated,
            expert_cache_needed=cache.needed,
            expert_cache_hits=cache.hits,
            expert_cache_fetched_bytes=cache.bytes_fetched,
        )

    def close(self) -> None:
        """Drop the model (and any wrapper holding it, e.g. a ZeRO engine) and free the device."""
        self._reset_state()
        self.model = None
        self.expert_cache = None  # its slots and pinned host copies go with the model
        self.tokenizer = None
        thaw_heap()  # a process that froze its heap after loading this model would keep it
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------ the stages

    def _running(self) -> int:
        return len(self._batch.seqs) if self._batch is not None else 0

    def _matcher(self, structured: tuple[str, str]) -> Any:
        """A matcher for one request's constraint; ValueError when it does not compile."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, int(self.model.config.vocab_size))
        return self._grammars.matcher(structured)

    def _tokenize(self, prompt: str) -> list[int]:
        # Exactly what tokenizer(prompt) gives (special tokens such as BOS included where the
        # tokenizer adds them), which is also what generate() is usually given.
        return list(self.tokenizer(prompt)["input_ids"])

    def _yield_rows(self) -> int | None:
        """batch_yield: the batch-tier rows this step may still admit, its rows past `rows`
        preempted first (latest first), while urgent work is here or was within hold_s; None
        otherwise (no limit)."""
        if self._yield is None:
            return None
        rank, rows, hold_s = self._yield
        running = self._batch.seqs if self._batch is not None else []
        now = time.monotonic()
        if any(q.request.priority < rank for q in running) or (
            self._waiting and self._waiting[0].request.priority < rank  # the heap's most urgent
        ):
            self._urgent_at = now
        elif now - self._urgent_at > hold_s:
            return None
        tier = [r for r, q in enumerate(running) if q.request.priority >= rank]
        if len(tier) > rows:
            batch = self._batch
            assert batch is not None
            gone = set(sorted(tier, key=lambda r: batch.seqs[r].order, reverse=True)[: len(tier) - rows])
            for row in gone:
                heapq.heappush(self._waiting, batch.seqs[row])
            _select_rows(batch, [r for r in range(len(batch.seqs)) if r not in gone])
            if not batch.seqs:
                self._batch = None
        return rows - min(len(tier), rows)

    def _admissible(self) -> bool:
        """The most urgent waiting request may be admitted now (batch_yield's room allows)."""
        if self._batch_room is None or self._batch_room > 0:
            return True
        assert self._yield is not None
        return self._waiting[0].request.priority < self._yield[0]

    def _admit(self) -> list[_Sequence]:
        """Pop waiting requests (by priority, then arrival) for one prefill: free slots, the
        padded-size budget and batch_yield's room for the batch tier allow."""
        admitted: list[_Sequence] = []
        longest, scored = 0, False
        room = self._batch_room
        while self._waiting and self._running() + len(admitted) < self.max_batch_size:
            candidate = self._waiting[0]
            if room is not None and self._yield is not None and candidate.request.priority >= self._yield[0]:
                if room <= 0:
                    break  # the rest are batch tier too (the heap's order)
                room -= 1
            longest_if_added = max(longest, len(candidate.fed_ids))
            scored_if_added = scored or _scored(candidate)
            budget = self._scored_prefill_tokens if scored_if_added else self.max_prefill_tokens
            if admitted and longest_if_added * (len(admitted) + 1) > budget:
                break
            admitted.append(heapq.heappop(self._waiting))
            longest, scored = longest_if_added, scored_if_added
        return admitted

    def _preempt(self) -> None:
        """The batch full and a waiting request more urgent than a running one: put running rows
        of the least urgent rank (the latest arrived first) back to waiting, one per such waiting
        request, so that it is admitted at this step. A preempted request keeps what it made and
        is prefilled again with it later (vLLM's recompute preemption); only a strictly more urgent
        request preempts, so requests of one rank never do."""
        batch = self._batch
        if batch is None or not self._waiting or len(batch.seqs) < self.max_batch_size:
            return
        if self._waiting[0].request.priority >= max(q.request.priority for q in batch.seqs):
            return  # the usual case under load: nothing waiting outranks anything running
        urgent = heapq.nsmallest(len(batch.seqs), self._waiting)  # the most urgent waiting, in order
        victims = sorted(range(len(batch.seqs)), key=lambda r: batch.seqs[r].order, reverse=True)
        out: list[int] = []
        for waiting, row in zip(urgent, victims, strict=False):
            if batch.seqs[row].request.priority <= waiting.request.priority:
                break
            out.append(row)
        if not out:
            return
        gone = set(out)
        for row in out:
            heapq.heappush(self._waiting, batch.seqs[row])
        _select_rows(batch, [r for r in range(len(batch.seqs)) if r not in gone])
        if not batch.seqs:
            self._batch = None

    def _prefill_step(self) -> list[Delta]:
        """Run the admitted prompts as one left-padded batch, sample their first tokens, merge."""
        seqs = self._admit()
        if self.on_seated is not None:
            self.on_seated([s.request_id for s in seqs])
        input_ids, mask = _left_pad([s.fed_ids for s in seqs], self._pad_id, self._device)  # [N, L]
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [N, L]; pads get 0, real tokens 0..n-1
        cache = DynamicCache()
        self._expect_tags(seqs, mask)
        scored = [r for r, s in enumerate(seqs) if _scored(s)]
        logits = self._forward(input_ids, mask, position_ids, cache, every_position=bool(scored))
        # logits: [N, L, V] with a scored row, else [N, 1, V]
        prompt_logprobs = {
            (q := seqs[r]).request_id: _prompt_logprobs(logits[r], q.prompt_ids, q.params.prompt_logprobs)
            for r in scored
        }
        if not bool(mask.all()):
            _zero_padding(cache, mask)
        new = _Batch(seqs, cache, mask, positions=mask.sum(dim=1), last_tokens=input_ids[:, -1])
        deltas = self._sample_and_advance(new, logits[:, -1])
        for delta in deltas:
            delta.prompt_logprobs = prompt_logprobs.get(delta.request_id)
        if not new.seqs:
            pass  # every admitted request finished on its first token
        elif self._batch is None or not self._batch.seqs:
            self._batch = new
        else:
            self._batch = _concat_rows(self._batch, new)
        return deltas

    def _decode_step(self) -> list[Delta]:
        """Feed every running row its last sampled token ([B, 1]) and sample the next one."""
        batch = self._batch
        assert batch is not None
        mask = F.pad(batch.mask, (0, 1), value=1)  # [B, T + 1]: the fed token's column
        input_ids, position_ids = batch.last_tokens[:, None], batch.positions[:, None]  # [B, 1]
        self._expect_tags(batch.seqs, None)
        logits = self._forward(input_ids, mask, position_ids, batch.cache)  # [B, 1, V]
        batch.mask = mask
        batch.positions = batch.positions + 1
        return self._sample_and_advance(batch, logits[:, -1])

    def _expect_tags(self, seqs: Sequence[_Sequence], mask: torch.Tensor | None) -> None:
        """Tell the telemetry whose tokens the next forward carries: [N, L] under a prefill's mask
        (padding → the PADDING slot), or one token per row for a decode."""
        if self.telemetry is None:
            return
        key = tuple(s.request_id for s in seqs)
        if key != self._tag_key:  # the batch changed: rebuild its rows' tag ids, [N]
            tags = [self.telemetry.tag_id(s.request.tag) for s in seqs]
            self._tag_key, self._tag_ids = key, torch.tensor(tags, device=self._device)
        if mask is None:
            self.telemetry.expect(self._tag_ids)
        else:
            self.telemetry.expect(torch.where(mask.bool(), self._tag_ids[:, None], PADDING))  # [N, L]

    def expert_tokens(self) -> dict[str, list[list[int]]]:
        return self.telemetry.snapshot() if self.telemetry is not None else {}

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        every_position: bool = False,
    ) -> torch.Tensor:
        """One model forward appending to `cache`; returns the last column's logits, [B, 1, V], or
        with every_position every column's, [B, Q, V].

        input_ids, position_ids: [B, Q]; mask: [B, T + Q] over cache columns then input columns.
        """
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if every_position else 1,  # 0: all
            )
            if self.telemetry is not None:
                self.telemetry.flush()
        finally:
            if self.telemetry is not None:
                self.telemetry.expect(None)  # forwards that are not ours (generate()) go uncounted
        self._steps += 1
        self._max_batch_seen = max(self._max_batch_seen, input_ids.shape[0])
        logits: torch.Tensor = out.logits
        return logits

    def _sample_and_advance(self, batch: _Batch, logits: torch.Tensor) -> list[Delta]:
        """Sample one token per row, update each request, drop finished rows. logits: [B, V]."""
        seqs = batch.seqs
        params = [s.params for s in seqs]
        asked = [r for r, p in enumerate(params) if p.logprobs is not None]
        # Raw log-probabilities (before any adjustment, which may work on `logits` in place): [A, V]
        raw = torch.log_softmax(logits[asked].float(), dim=-1) if asked else None
        if any(p.adjusts_logits for p in params):
            logits = logits.float()  # adjusted in place: a copy in the dtype sampling works in
            prompts, outputs = [s.prompt_ids for s in seqs], [s.output_ids for s in seqs]
            logits = adjust_logits(logits, params, prompts, outputs, self._eos_ids)
        constrained = [r for r, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            logits = logits.float()
            assert self._grammars is not None  # a matcher comes from it
            masks = _bitmask(self._grammars, [seqs[r].matcher for r in constrained], logits)
            apply_token_bitmask(logits, constrained, masks)
        tokens = sample_next_tokens(logits, params, [s.generator for s in seqs])  # [B]
        batch.last_tokens = tokens
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if raw is not None:
            for i, row in enumerate(asked):
                logprobs[row] = _token_logprob(raw[i], int(tokens[row]), params[row].logprobs or 0)
        deltas = [
            self._append_token(seq, token, lp)
            for seq, token, lp in zip(seqs, tokens.tolist(), logprobs, strict=True)
        ]
        self._tokens_generated += len(deltas)
        _select_rows(batch, [r for r, seq in enumerate(batch.seqs) if seq.finish_reason is None])
        return deltas

    def _append_token(self, seq: _Sequence, token: int, logprob: TokenLogprob | None = None) -> Delta:
        """Record `token` for `seq`: detokenize, check stop conditions, build the step's delta."""
        seq.output_ids.append(token)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            seq.error = f"structured output: {seq.matcher.get_error() or 'no token was allowed'}"
            return seq.delta(seq.finish(FinishReason.ERROR), [token], logprob)
        if token in seq.params.stop_token_ids or (token in self._eos_ids and not seq.params.ignore_eos):
            # the EOS / stop token adds no text, unless asked (as vLLM: its text, if not skipped as special)
            text = (
                seq.stops.push(seq.detokenizer.add_token(token))
                if seq.params.include_stop_str_in_output
                else ""
            )
            return seq.delta(text + seq.finish(FinishReason.STOP), [token], logprob)
        text = seq.stops.push(seq.detokenizer.add_token(token))
        if seq.stops.stopped:
            seq.finish(FinishReason.STOP)
        elif seq.matcher is not None and seq.matcher.is_stopped():  # the constraint is complete
            text += seq.finish(FinishReason.STOP)
        elif len(seq.output_ids) >= seq.params.max_tokens or (
            len(seq.prompt_ids) + len(seq.output_ids) >= self.max_context
        ):
            text += seq.finish(FinishReason.LENGTH)
        return seq.delta(text, [token], logprob)

    def _finish_aborted(self, seq: _Sequence) -> None:
        text = seq.finish(FinishReason.ABORT)
        self._finished.append(seq.delta(text, []))


def _scored(seq: _Sequence) -> bool:
    """Its next prefill scores its prompt (prompt_logprobs; a preempted request's were sent at its
    first prefill)."""
    return seq.params.prompt_logprobs is not None and not seq.output_ids


def _bitmask(grammars: Grammars, matchers: list[Any], logits: torch.Tensor) -> torch.Tensor:
    """The tokens each matcher allows next: int32 [len(matchers), ceil(V / 32)] on the CPU."""
    bitmask = torch.zeros((len(matchers), (logits.shape[-1] + 31) // 32), dtype=torch.int32)
    grammars.fill(matchers, bitmask.data_ptr(), bitmask.shape[1] * 4)
    return bitmask


def _token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s entry in one row's log-probabilities [V], with the k likeliest (id, logprob)."""
    top = torch.topk(logprobs, k) if k > 0 else None
    alternatives = (
        tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
    )
    return token, float(logprobs[token]), alternatives


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int | None) -> list[PromptLogprob]:
    """Each prompt token's raw log-probability given the ones before it, with the k likeliest there
    and its rank (the first token's are None).

    logits: one left-padded prefill row's, [L, V]; the prompt fills its last len(prompt) columns, so
    column L - len(prompt) + i - 1 predicts prompt[i]."""
    length, m = logits.shape[0], len(prompt)
    scores = torch.log_softmax(logits[length - m : length - 1].float(), dim=-1)  # [m - 1, V]
    ids = torch.tensor(prompt[1:], dtype=torch.long, device=scores.device)
    chosen = scores.gather(1, ids[:, None])  # [m - 1, 1]
    ranks = ((scores > chosen).sum(dim=1) + 1).tolist()
    top = torch.topk(scores, k) if k else None
    ranked = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    out: list[PromptLogprob] = [(prompt[0], None, (), None)]
    for i, (token, logprob) in enumerate(zip(prompt[1:], chosen[:, 0].tolist(), strict=True)):
        alternatives = tuple(zip(*ranked[i], strict=True)) if ranked else ()
        out.append((token, logprob, alternatives, ranks[i]))
    return out


def _left_pad(
    prompts: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to a common length: (input_ids, mask), both [N, L] int64."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt) :] = 1
    return input_ids.to(device), mask.to(device)


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config (one id or a list) plus the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, list) else [configured]))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
