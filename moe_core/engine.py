"""The engine protocol: what every backend (PyTorch, vLLM, DeepSpeed) offers a worker.

An engine is driven by exactly one thread (the worker's engine loop): none of its methods are
thread-safe but `wake`. The loop calls `add_request` / `abort` between steps and `step` in a loop;
each `step` advances every running request by at most one token and returns what changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class FinishReason(StrEnum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens reached (or the model's context)
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed this request (Delta.error says why)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0, top_p 1.0 and min_p 0 mean off.

    Before temperature (greedy too), as vLLM orders them: min_tokens (EOS and stop_token_ids are
    impossible until that many tokens were made), logit_bias (added to those tokens' logits), then
    the penalties: repetition (a logit of a token in the prompt or the output is divided by it when
    positive, multiplied when negative: transformers' and vLLM's rule), frequency (minus it times
    the token's count in the output) and presence (minus it once for a token in the output)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # keep tokens at least this times as likely as the likeliest (after temperature)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: every request makes exactly max_tokens tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1.0 is off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # sampling one ends the request (finish "stop"; no text)
    skip_special_tokens: bool = True  # False: special tokens' text (EOS under ignore_eos...) is output
    logprobs: int | None = None  # k: each token's log-probability and the k likeliest alternatives
    # k: each prompt token's log-probability given the tokens before it, with the k likeliest
    # alternatives there (vLLM's prompt_logprobs; what loglikelihood evaluations read)
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False  # the stop string (or stop token's text) ends the output
    # Constrained decoding: (kind, spec), a plain pair so it crosses the engine pipe as is (see
    # STRUCTURED_KINDS); every token sampled keeps the output a prefix of what the spec accepts.
    structured: tuple[str, str] | None = None

    @property
    def adjusts_logits(self) -> bool:
        """Any option that changes logits before sampling (see the class docstring)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )


# SamplingParams.structured's kinds, and what the spec string holds for each:
#   "json"    a JSON schema, as JSON text ('{"type": "object"}' is any JSON object)
#   "regex"   a regular expression the whole output matches
#   "choice"  a JSON list of strings: the output is exactly one of them
#   "grammar" a context-free grammar: Lark (llguidance's dialect) or GBNF / EBNF (`::=` rules)
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    tag: str = ""  # expert telemetry counts this request's tokens under it (the job's modality)
    # The job's priority rank, 0 the most urgent (scheduler.jobs.Priority.rank; 1 is normal). An
    # engine that orders its waiting requests takes the lowest rank first, and the torch engine
    # preempts a running request of a higher rank to make room for it (moe_core/torch_engine.py).
    priority: int = 1
    # The prompt as token ids, as the client sent them: the engine takes them as they are (no
    # tokenizing, no BOS added); `prompt` is then their text, for what reads the prompt as text.
    prompt_token_ids: tuple[int, ...] | None = None

    def prompt_ids(self, tokenize: Callable[[str], list[int]]) -> list[int]:
        """The prompt's token ids: the client's own, else `tokenize(prompt)`."""
        return list(self.prompt_token_ids) if self.prompt_token_ids is not None else tokenize(self.prompt)


# A sampled token's log-probability under the model's raw next-token distribution (before
# penalties, bias and temperature: vLLM's default "raw_logprobs"), with the k likeliest tokens'
# (id, log-probability), likeliest first: (token id, logprob, alternatives).
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]
# A prompt token's: the same and its rank there (1: the likeliest); the first token's logprob and
# rank are None (nothing precedes it): (token id, logprob, alternatives, rank).
PromptLogprob = tuple[int, float | None, tuple[tuple[int, float], ...], int | None]


@dataclass
class Delta:
    """What one step did for one request.

    `text` is the newly decodable text: never half a UTF-8 character, and text that could still
    turn out to be the start of a stop string is held back until it is known not to be one, so
    the concatenation of every delta's text equals the final output exactly.
    `token_ids` are the tokens sampled this step (possibly several deltas' worth of text).
    A finished request yields one last delta with `finish_reason` set and is then forgotten.
    """

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None  # with FinishReason.ERROR
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked
    cached_tokens: int = 0  # prompt tokens whose KV the engine found in its prefix cache
    # With params.prompt_logprobs, on the request's first delta only: one per prompt token
    prompt_logprobs: list[PromptLogprob] | None = None


@dataclass
class EngineStats:
    running: int  # requests in the batch
    waiting: int  # requests added but not yet prefilled
    steps: int  # forward passes so far (prefill and decode)
    max_batch_seen: int  # the largest number of requests decoded in one step
    tokens_generated: int
    failovers: int = 0  # engine switches so far (FailoverEngine)
    kv_usage: float | None = None  # share of the KV cache in use, where the engine manages one (vLLM)
    prefix_caching: bool = False  # the engine reuses the KV of prompt prefixes it computed recently
    kv_blocks: int | None = None  # KV-cache blocks it holds, where it manages blocks
    kv_block_size: int | None = None  # tokens per block
    prompt_tokens: int = 0  # prompt tokens of the requests it has prefilled so far
    cached_tokens: int = 0  # of those, found in its prefix cache (not computed)
    expert_cache_needed: int = 0  # experts its MoE layers' forwards needed (engine.offload experts)
    expert_cache_hits: int = 0  # of those, on the device already
    expert_cache_fetched_bytes: int = 0  # expert weights copied host → device, needed or prefetched
    expert_cache_in_place_bytes: int = 0  # expert weights a kernel read from host memory in place (vLLM)


class Engine(Protocol):
    @property
    def name(self) -> str:
        """ "torch", "vllm", "deepspeed"."""

    @property
    def max_context(self) -> int:
        """Prompt + generated tokens a request may hold."""

    def load(self) -> None:
        """Load weights and warm up; returns only when the engine can serve."""

    def count_tokens(self, prompt: str) -> int: ...

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the running batch at the next step."""

    def abort(self, request_id: str) -> None:
        """Drop a request; the next step yields its final delta with FinishReason.ABORT."""

    def step(self) -> list[Delta]:
        """Run one forward pass over every request and return what changed (empty if idle)."""

    def wake(self) -> None:
        """From any thread: a step() waiting for its engine's next output returns now, so that a
        request that just arrived is added at once, not after that output (vLLM's engine core keeps
        stepping meanwhile: one step sooner). A no-op where step() never waits."""

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def expert_tokens(self) -> dict[str, list[list[int]]]:
        """tag → [layer][expert] tokens routed there so far; {} where the engine cannot see routing."""

    def close(self) -> None:
        """Release the device (weights, KV cache, engine processes); the engine is unusable after."""
