"""What every engine's parity tests share: the prompts, and transformers `generate()` as the
reference its greedy tokens must equal (tests/test_torch_engine.py, test_deepspeed_engine.py,
test_vllm_engine.py)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any, Protocol

import jsonschema
import pytest
import torch

from moe_build.checkpoint import ARCHS
from moe_core.engine import FinishReason, GenerationRequest, SamplingParams

PROMPTS = [
    "def add(a, b):\n    return",
    "import os",
    "class Parser:\n    def __init__(self, text):\n        self.text = text\n        self.pos = 0\n\n    def",
    "The quick brown fox",
    "x",
    "for i in range(10):\n    print(i)\n# done",
    "raise ValueError(",
    "    # The cache is trimmed on the left when rows leave the batch, so",
]
LATE_PROMPTS = ["while True:", "with open(path) as f:\n    data = f.read()", "lambda", "return None"]
NEW_TOKENS = 16

# Every architecture the checkpoint builder makes: mixtral in the fast loop (`make test-fast`), the
# others marked slow (the full suite runs them all).
ARCH_PARAMS = [ARCHS[0], *(pytest.param(arch, marks=pytest.mark.slow) for arch in ARCHS[1:])]

# What the logits options must do, each alone and together, in one batch beside plain greedy rows.
LOGITS_OPTIONS: list[dict[str, object]] = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"presence_penalty": 1.5, "frequency_penalty": 0.7},
    {"frequency_penalty": -1.0},
    {"logit_bias": ((5, 4.0), (11, -100.0))},
    {"presence_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": ((7, 3.0),)},
]


class Outcome(Protocol):
    """A request's collected deltas, as each engine test gathers them."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None


def reference_tokens(
    model: Any, tokenizer: Any, prompt: str | list[int], max_tokens: int = NEW_TOKENS
) -> list[int]:
    """generate(do_sample=False) for the prompt (text, or token ids as they are) alone, cut after
    the first EOS."""
    if isinstance(prompt, str):
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens, do_sample=False
        )
    ids: list[int] = out[0, input_ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def assert_matches(tokenizer: Any, result: Outcome, reference: list[int], max_tokens: int) -> None:
    """The engine made exactly the reference's tokens, finished for the same reason, and its
    concatenated deltas are the reference's text."""
    assert result.token_ids == reference
    eos = tokenizer.eos_token_id
    assert result.finish_reason == (FinishReason.STOP if reference[-1] == eos else FinishReason.LENGTH)
    assert len(reference) <= max_tokens
    decoded = tokenizer.decode(reference, skip_special_tokens=True)
    # Bytes of a character cut off by the end of generation are dropped, not emitted as U+FFFD.
    assert decoded == result.text or (decoded.startswith(result.text) and decoded.endswith("\ufffd"))


def adjusted_reference(
    model: Any, tokenizer: Any, prompt: str, max_tokens: int, eos_ids: set[int], **options: Any
) -> list[int]:
    """generate(do_sample=False) with the logits options of SamplingParams, written here from
    their definitions (vLLM's), as a transformers logits processor: min_tokens, logit_bias,
    repetition, frequency and presence penalties, in that order. Cut after the first EOS."""
    from transformers import LogitsProcessorList

    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = input_ids.shape[1]
    min_tokens = options.get("min_tokens", 0)
    bias: dict[int, float] = dict(options.get("logit_bias", ()))
    repetition = options.get("repetition_penalty", 1.0)
    frequency, presence = options.get("frequency_penalty", 0.0), options.get("presence_penalty", 0.0)

    def process(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row in range(ids.shape[0]):
            seen, made = ids[row].tolist(), ids[row, start:].tolist()
            if len(made) < min_tokens:
                for t in eos_ids:
                    scores[row, t] = float("-inf")
            for t, b in bias.items():
                scores[row, t] += b
            for t in set(seen):
                s = scores[row, t]
                scores[row, t] = s / repetition if s > 0 else s * repetition
            for t in set(made):
                scores[row, t] -= frequency * made.count(t) + presence
        return scores

    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([process]),
        )
    ids: list[int] = out[0, start:].tolist()
    ends = [i for i, t in enumerate(ids) if t in eos_ids]
    return ids[: ends[0] + 1] if ends else ids


def output_option_cases(
    tokenizer: Any, full_text: str, full_ids: list[int]
) -> dict[str, tuple[SamplingParams, str]]:
    """Requests for vLLM's output options, each with the text it must give, from a greedy answer
    of the same prompt (its text and ids): EOS forced (ignore_eos) with special tokens skipped and
    kept; a stop string inside the answer left out and kept; a stop token id's text kept."""
    eos = tokenizer.eos_token_id
    pieces = [tokenizer.decode([t]) for t in full_ids]
    j = next(j for j in range(2, len(pieces) - 1) if pieces[j].isprintable() and pieces[j + 1].isprintable())
    stop = pieces[j][-2:] + pieces[j + 1][:2]
    cut = full_text.index(stop)
    forced = SamplingParams(max_tokens=3, ignore_eos=True, logit_bias=((eos, 100.0),))
    plain = SamplingParams(max_tokens=NEW_TOKENS)
    cases = {
        "eos-skipped": (forced, ""),
        "eos-kept": (replace(forced, skip_special_tokens=False), tokenizer.decode([eos]) * 3),
        "stop-left-out": (replace(plain, stop=(stop,)), full_text[:cut]),
        "stop-kept": (
            replace(plain, stop=(stop,), include_stop_str_in_output=True),
            full_text[: cut + len(stop)],
        ),
        "stop-id-kept": (
            replace(plain, logit_bias=((42, 100.0),), stop_token_ids=(42,), include_stop_str_in_output=True),
            tokenizer.decode([42]),
        ),
    }
    assert cases["eos-kept"][1] and cases["stop-id-kept"][1]  # there is text to keep
    return cases


def reference_logprobs(model: Any, tokenizer: Any, prompt: str, max_tokens: int, k: int) -> list[Any]:
    """generate(do_sample=False)'s tokens with their log-probabilities under the raw logits and
    the k likeliest tokens': [(token, logprob, ((id, logprob), ...))], cut after the first EOS."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, input_ids.shape[1] :].tolist()
    entries = []
    for token, logits in zip(tokens, out.logits, strict=False):
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        top = torch.topk(lp, k)
        entries.append(
            (token, float(lp[token]), tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        )
        if token == tokenizer.eos_token_id:
            break
    return entries


def reference_prompt_logprobs(model: Any, tokenizer: Any, prompt: str, k: int) -> list[Any]:
    """One plain forward over the prompt alone: each token's raw log-probability given the ones
    before it, the k likeliest there and its rank, [(token, logprob, ((id, logprob), ...), rank)];
    the first token's logprob and rank are None and its alternatives ()."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # [L, V]
    scores = torch.log_softmax(logits.float(), dim=-1)
    entries: list[Any] = [(ids[0], None, (), None)]
    for i, token in enumerate(ids[1:]):
        top = torch.topk(scores[i], k)
        alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if k else ()
        rank = 1 + int((scores[i] > scores[i, token]).sum())
        entries.append((token, float(scores[i, token]), alternatives, rank))
    return entries


def assert_logprobs_close(got: list[Any], want: list[Any], tolerance: float = 1e-3) -> None:
    """Same tokens and alternatives (ids in order), log-probabilities within `tolerance`."""
    assert [g[0] for g in got] == [w[0] for w in want]
    for entry, wanted in zip(got, want, strict=True):
        (lp, top), (want_lp, want_top) = entry[1:3], wanted[1:3]
        if want_lp is None:  # a prompt's first token
            assert lp is None and not top
            continue
        if len(wanted) > 3:  # a prompt token's rank (ties aside)
            assert abs(entry[3] - wanted[3]) <= 1
        assert abs(lp - want_lp) < tolerance and lp <= 0
        assert [t for t, _ in top] == [t for t, _ in want_top]
        assert all(abs(a - b) < tolerance for (_, a), (_, b) in zip(top, want_top, strict=True))


# Structured outputs (SamplingParams.structured) every engine must obey, greedy and sampled, in one
# batch beside plain rows. Strings and arrays are bounded so that even a random model ends within
# STRUCTURED_TOKENS: an output cut by max_tokens would be a prefix, not a full match.
STRUCTURED_TOKENS = 96
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
    "additionalProperties": False,
}
STRUCTURED_CASES: list[tuple[str, str]] = [
    ("json", json.dumps(PERSON_SCHEMA)),
    ("regex", r"[0-9]{3}-[A-Z]{2}(-[a-z]{1,4})?"),
    ("choice", json.dumps(["yes", "no", 'it depends: "maybe"'])),
    ("grammar", 'root ::= "(" item ("," item){0,3} ")"\nitem ::= [a-c] | "x" [0-9]'),  # GBNF
    ("grammar", 'start: "SELECT " COL " FROM t"\nCOL: /[a-z]{1,6}/'),  # Lark
]


def structured_requests() -> list[GenerationRequest]:
    """Every STRUCTURED_CASES constraint greedy and sampled (seeded), on different prompts."""
    requests = []
    for i, case in enumerate(STRUCTURED_CASES):
        for temperature in (0.0, 1.0):
            params = SamplingParams(
                max_tokens=STRUCTURED_TOKENS, temperature=temperature, seed=i, structured=case
            )
            requests.append(GenerationRequest(f"s{i}-{temperature:g}", PROMPTS[i % len(PROMPTS)], params))
    return requests


def assert_obeys(structured: tuple[str, str], text: str) -> None:
    """`text` is one full answer the constraint accepts."""
    kind, spec = structured
    if kind == "json":
        jsonschema.validate(json.loads(text), json.loads(spec))
    elif kind == "regex":
        assert re.fullmatch(spec, text), (spec, text)
    elif kind == "choice":
        assert text in json.loads(spec), text
    elif "::=" in spec:
        assert re.fullmatch(r"\((?:[a-c]|x[0-9])(?:,(?:[a-c]|x[0-9])){0,3}\)", text), text
    else:
        assert re.fullmatch(r"SELECT [a-z]{1,6} FROM t", text), text


def job_requests(n: int, seed: int | None, temperature: float) -> list[GenerationRequest]:
    """The engine requests of one job with n sequences, as a worker makes them (one per sequence,
    its seed derived from the job's): what every engine must run as n independent sequences."""
    from scheduler.jobs import Job, JobSpec
    from workers.engine_proc import requests_of
    from workers.relay import Held, HeldSequence

    spec = JobSpec(prompt=PROMPTS[3], n=n, seed=seed, temperature=temperature, max_tokens=NEW_TOKENS)
    held = Held(Job(spec=spec), 1, sequences=[HeldSequence(k) for k in range(n)])
    requests, ended = requests_of(held)
    assert len(requests) == n and not ended
    return requests


def assert_n_sequences(run: Any) -> None:
    """`run(requests)` → request id → token ids, the requests added together. A job of 3 seeded
    sequences: they differ, and come again the same; greedy: 3 times the same tokens (as vLLM)."""
    seeded = job_requests(3, seed=7, temperature=1.0)
    first, again = run(seeded), run(seeded)
    tokens = [first[r.request_id] for r in seeded]
    assert tokens == [again[r.request_id] for r in seeded]
    assert len({tuple(t) for t in tokens}) >= 2, tokens
    greedy = job_requests(3, seed=None, temperature=0.0)
    assert len({tuple(t) for t in run(greedy).values()}) == 1
