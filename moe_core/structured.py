"""Constrained decoding with llguidance: what SamplingParams.structured means as a grammar, and the
per-request matchers the torch / DeepSpeed batcher masks logits with (the vLLM engine hands the
same constraint to vLLM's own structured-output backend instead).

A constraint (kind, spec) becomes one llguidance grammar (`grammar_for`), the one vLLM's guidance
backend compiles for it (the vLLM engine runs that backend), so every engine accepts the same
specs and answers them alike. Per
engine, `Grammars` compiles each distinct constraint once into an LLMatcher and keeps it (LRU);
a request gets a deep copy of it (a few µs), which then follows that request's tokens.

Per step, each constrained row's matcher writes the tokens it allows into one row of a packed
bitmask, int32 [B, ceil(V / 32)] (bit j of word w: token 32 w + j), all rows in one call
(`Grammars.fill`); disallowed logits become -inf (moe_core/sampling.py `apply_token_bitmask`); the
sampled token is then consumed. A matcher that `is_stopped` accepts no further token: its request
is complete and finishes (stop).

No torch here: the API imports `check` to refuse a bad spec at intake.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# No free whitespace in JSON (", " and ": " neither): a small model cannot wander into endless
# blanks. vLLM's guidance backend with disable_any_whitespace compiles the same grammar.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
# the other kinds by llguidance's own reader; grammar: Lark, or GBNF converted to Lark
_FORMATS: dict[str, llguidance.GrammarFormat] = {"regex": "regex", "choice": "choice", "grammar": "grammar"}


def fill_threads() -> int:
    """Threads that fill a step's masks: half this process's cores, 1 to 8."""
    return max(1, min(len(os.sched_getaffinity(0)) // 2, 8))


def grammar_for(kind: str, spec: str) -> str:
    """The llguidance grammar for one constraint (see moe_core/engine.py STRUCTURED_KINDS): what
    vLLM's guidance backend makes of the same request. Raises ValueError for a spec that is not
    even well-formed (compiling checks the rest)."""
    if kind == "json":
        try:
            schema = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"the JSON schema is not JSON: {e}") from e
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if kind in _FORMATS:
        return llguidance.grammar_from(_FORMATS[kind], spec)
    raise ValueError(f"unknown structured-output kind {kind!r}")


def check(kind: str, spec: str) -> str | None:
    """Why this constraint cannot be compiled (llguidance's message), or None when it can. Needs no
    tokenizer: what a tokenizer could still reject (a grammar no token sequence can start) is rare
    and fails the job at the engine."""
    try:
        grammar = grammar_for(kind, spec)
    except ValueError as e:
        return str(e)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    return error or None


T = TypeVar("T")


class Templates(Generic[T]):
    """Compiled constraints by key, each compiled once and handed out as copies, the least
    recently used dropped past `capacity`. Thread-safe; a template is never handed out itself.
    Requests that miss the same key at once share one compile: the first compiles, the others
    wait for its result (vLLM compiles on a pool of threads, so a burst of one schema misses
    together)."""

    def __init__(self, copy: Callable[[T], T], capacity: int = 256) -> None:
        self._copy = copy  # a fresh copy of a template (a few µs for a matcher's deep_copy)
        self._compiled: OrderedDict[Hashable, T] = OrderedDict()
        self._compiling: dict[Hashable, Future[T]] = {}  # key → the compile under way
        self._capacity = capacity
        self._lock = threading.Lock()
        self.compiles = 0  # keys compiled (not found here): tests, metrics
        self.copies = 0

    def __len__(self) -> int:
        return len(self._compiled)

    def get(self, key: Hashable, compile: Callable[[], T]) -> T:
        """A copy of `key`'s template, compiled first (outside the lock) where there is none, or
        awaited where another thread is compiling it; compile's exception reaches every caller
        waiting on it and nothing is kept."""
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                self.copies += 1
                return self._copy(template)
            pending = self._compiling.get(key)
            if pending is None:
                pending = self._compiling[key] = Future()
                owner = True
            else:
                owner = False
        if owner:
            try:
                template = compile()
            except BaseException as e:
                with self._lock:
                    del self._compiling[key]
                pending.set_exception(e)
                raise
            with self._lock:
                self.compiles += 1
                self._compiled[key] = template
                del self._compiling[key]
                while len(self._compiled) > self._capacity:
                    self._compiled.popitem(last=False)
            pending.set_result(template)
        else:
            template = pending.result()
        with self._lock:
            self.copies += 1
            return self._copy(template)


class Grammars:
    """One engine's compiled constraints: a matcher per distinct (kind, spec), copied per request.
    Thread-safe (a worker compiles on its engine thread; tests may not)."""

    def __init__(self, tokenizer: Any, vocab_size: int, capacity: int = 256) -> None:
        """tokenizer: the model's transformers (fast) tokenizer; vocab_size: the logits' width."""
        import llguidance.hf

        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._templates: Templates[llguidance.LLMatcher] = Templates(lambda m: m.deep_copy(), capacity)
        self._executor: llguidance.LLExecutor | None = None  # made at the first fill

    @property
    def compiles(self) -> int:
        """Constraints compiled (not found in the cache): tests, metrics."""
        return self._templates.compiles

    def fill(self, matchers: list[llguidance.LLMatcher], address: int, row_bytes: int) -> None:
        """Row i of the packed mask at `address` (len(matchers) rows of row_bytes, contiguous):
        the tokens matchers[i] allows next. One call: llguidance spreads the rows over its own
        threads, with no Python per row."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=fill_threads())
        rows = [(m, i) for i, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(rows, address, row_bytes, len(matchers))

    def matcher(self, structured: tuple[str, str]) -> llguidance.LLMatcher:
        """A fresh matcher for one request. Raises ValueError when the constraint does not compile."""

        def compile() -> llguidance.LLMatcher:
            matcher = llguidance.LLMatcher(self._tokenizer, grammar_for(*structured), log_level=0)
            if matcher.is_error():
                raise ValueError(f"the structured-output spec does not compile: {matcher.get_error()}")
            return matcher

        return self._templates.get(structured, compile)
