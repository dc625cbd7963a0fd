"""TorchEngine on real tiny random MoE checkpoints (CPU, float32): outputs must equal generate()."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_build.checkpoint import ARCHS, build_checkpoint
from moe_core.engine import FinishReason, GenerationRequest, SamplingParams
from moe_core.sampling import _mask_min_p
from moe_core.torch_engine import TorchEngine
from tests.parity import (
    LATE_PROMPTS,
    LOGITS_OPTIONS,
    NEW_TOKENS,
    PROMPTS,
    STRUCTURED_CASES,
    adjusted_reference,
    assert_logprobs_close,
    assert_matches,
    assert_n_sequences,
    assert_obeys,
    output_option_cases,
    reference_logprobs,
    reference_prompt_logprobs,
    reference_tokens,
    structured_requests,
)


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    deltas: int = 0
    prompt_logprobs: list[Any] | None = None  # the first delta's, when the request asked


def _collect(engine: TorchEngine, results: dict[str, Result]) -> None:
    for delta in engine.step():
        result = results.setdefault(delta.request_id, Result())
        assert result.finish_reason is None, "a finished request got another delta"
        result.text += delta.text
        result.token_ids += delta.token_ids
        result.finish_reason = delta.finish_reason
        if delta.prompt_logprobs is not None:
            assert result.deltas == 0, "prompt logprobs after the first delta"
            result.prompt_logprobs = delta.prompt_logprobs
        result.deltas += 1
        assert delta.completion_tokens == len(result.token_ids)


def _run(engine: TorchEngine, requests: list[GenerationRequest]) -> dict[str, Result]:
    for request in requests:
        engine.add_request(request)
    results: dict[str, Result] = {}
    while engine.has_unfinished():
        _collect(engine, results)
    return results


def _greedy(request_id: str, prompt: str, max_tokens: int = NEW_TOKENS) -> GenerationRequest:
    return GenerationRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens))


def _reference(engine: TorchEngine, prompt: str, max_tokens: int = NEW_TOKENS) -> list[int]:
    assert len(engine.tokenizer(prompt)["input_ids"]) == engine.count_tokens(prompt)
    return reference_tokens(engine.model, engine.tokenizer, prompt, max_tokens)


def _assert_matches(engine: TorchEngine, result: Result, reference: list[int], max_tokens: int) -> None:
    assert_matches(engine.tokenizer, result, reference, max_tokens)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "mixtral", arch="mixtral", progress=False)


@pytest.fixture(scope="module")
def engine(mixtral_dir: Path) -> Iterator[TorchEngine]:
    torch.manual_seed(0)
    engine = TorchEngine(mixtral_dir, max_batch_size=8)
    engine.load()
    yield engine


@pytest.fixture(scope="module")
def references(engine: TorchEngine) -> dict[str, list[int]]:
    return {prompt: _reference(engine, prompt) for prompt in PROMPTS + LATE_PROMPTS}


def test_load_sets_context_and_leaves_engine_idle(engine: TorchEngine) -> None:
    assert engine.max_context == engine.model.config.max_position_embeddings
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.steps, stats.tokens_generated) == (0, 0, 0, 0)
    assert not engine.has_unfinished()


def test_greedy_alone_matches_generate(engine: TorchEngine, references: dict[str, list[int]]) -> None:
    prompt = PROMPTS[2]
    results = _run(engine, [_greedy("solo", prompt)])
    _assert_matches(engine, results["solo"], references[prompt], NEW_TOKENS)
    assert len(results["solo"].text) > 0


def test_continuous_batching_matches_generate(engine: TorchEngine, references: dict[str, list[int]]) -> None:
    """8 prompts at once, 4 more while they decode (engine capped at 8 rows), rows leaving early.

    The longest prompt stops first so the left trim runs; late prompts wait for free slots.
    """
    max_tokens = {prompt: NEW_TOKENS - 2 * (i % 4) for i, prompt in enumerate(PROMPTS)}
    max_tokens[PROMPTS[2]] = 3  # the longest prompt leaves first: its padding columns get trimmed
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(_greedy(f"a{i}", prompt, max_tokens[prompt]))
    results: dict[str, Result] = {}
    for _ in range(3):
        _collect(engine, results)
    for i, prompt in enumerate(LATE_PROMPTS):
        max_tokens[prompt] = NEW_TOKENS
        engine.add_request(_greedy(f"b{i}", prompt))
    assert engine.stats().waiting == len(LATE_PROMPTS)
    while engine.has_unfinished():
        _collect(engine, results)
        assert engine.stats().running <= 8

    for i, prompt in enumerate(PROMPTS):
        _assert_matches(
            engine, results[f"a{i}"], references[prompt][: max_tokens[prompt]], max_tokens[prompt]
        )
    for i, prompt in enumerate(LATE_PROMPTS):
        _assert_matches(engine, results[f"b{i}"], references[prompt], NEW_TOKENS)
    stats = engine.stats()
    assert stats.max_batch_seen == 8
    assert stats.running == stats.waiting == 0


def _sampled(
    request_id: str, prompt: str, seed: int | None, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> GenerationRequest:
    params = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=1.0, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed
    )
    return GenerationRequest(request_id, prompt, params)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: TorchEngine) -> None:
    prompt = PROMPTS[0]
    alone = _run(engine, [_sampled("s", prompt, seed=1234, top_p=0.95, top_k=200)])["s"]
    crowd = [_sampled(f"c{i}", p, seed=None) for i, p in enumerate(PROMPTS[1:5])] + [_greedy("g", PROMPTS[5])]
    in_batch = _run(engine, [*crowd, _sampled("s", prompt, seed=1234, top_p=0.95, top_k=200)])["s"]
    assert in_batch.token_ids == alone.token_ids and in_batch.text == alone.text
    other_seed = _run(engine, [_sampled("s", prompt, seed=4321, top_p=0.95, top_k=200)])["s"]
    assert other_seed.token_ids != alone.token_ids


def test_a_job_of_n_sequences(engine: TorchEngine) -> None:
    assert_n_sequences(lambda requests: {r: x.token_ids for r, x in _run(engine, requests).items()})


def test_top_k_1_equals_greedy(engine: TorchEngine, references: dict[str, list[int]]) -> None:
    prompt = PROMPTS[3]
    result = _run(engine, [_sampled("k1", prompt, seed=None, top_k=1)])["k1"]
    assert result.token_ids == references[prompt]


def test_min_p(engine: TorchEngine, references: dict[str, list[int]]) -> None:
    """min_p 1 keeps only the likeliest token: greedy; a small one keeps most (a seeded sample
    unchanged), 0.5 some: the floor is relative to the likeliest token's probability."""
    prompt = PROMPTS[3]
    result = _run(engine, [_sampled("p1", prompt, seed=None, min_p=1.0)])["p1"]
    assert result.token_ids == references[prompt]
    free = _run(engine, [_sampled("free", prompt, seed=9)])["free"]
    loose = _run(engine, [_sampled("loose", prompt, seed=9, min_p=1e-9)])["loose"]
    assert loose.token_ids == free.token_ids and free.token_ids != references[prompt]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1]]))
    kept = _mask_min_p(logits, [0.5, 0.0]).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_a_prompt_of_token_ids_is_taken_as_it_is(
    engine: TorchEngine, references: dict[str, list[int]]
) -> None:
    """prompt_token_ids: the engine runs those ids (the prompt's text unread): the tokenized
    prompt's ids give its reference tokens, the same ids less the first (BOS) others."""
    prompt = PROMPTS[3]
    ids = tuple(engine.tokenizer(prompt)["input_ids"])
    params = SamplingParams(max_tokens=NEW_TOKENS)
    same = GenerationRequest("ids", "unread text", params, prompt_token_ids=ids)
    cut = GenerationRequest("cut", prompt, params, prompt_token_ids=ids[1:])
    results = _run(engine, [same, cut])
    assert results["ids"].token_ids == references[prompt]
    assert results["cut"].token_ids == reference_tokens(engine.model, engine.tokenizer, list(ids[1:]))


def test_max_tokens_finishes_with_length(engine: TorchEngine, references: dict[str, list[int]]) -> None:
    prompt = next(p for p in PROMPTS if engine.tokenizer.eos_token_id not in references[p][:5])
    result = _run(engine, [_greedy("len", prompt, max_tokens=5)])["len"]
    assert result.finish_reason == FinishReason.LENGTH
    assert result.token_ids == references[prompt][:5]
    assert result.deltas == 5


def test_stop_string_truncates_and_deltas_add_up(engine: TorchEngine) -> None:
    prompt = PROMPTS[1]
    full = _run(engine, [_greedy("full", prompt)])["full"]
    # A stop string that straddles a token boundary in the middle of the output.
    pieces = [engine.tokenizer.decode([t]) for t in full.token_ids]
    j = next(j for j in range(2, len(pieces) - 1) if pieces[j].isprintable() and pieces[j + 1].isprintable())
    stop = pieces[j][-2:] + pieces[j + 1][:2]
    expected = full.text[: full.text.index(stop)]
    request = GenerationRequest(
        "stop", prompt, SamplingParams(max_tokens=NEW_TOKENS, stop=("zzzz-none", stop))
    )
    result = _run(engine, [request])["stop"]
    assert result.finish_reason == FinishReason.STOP
    assert result.text == expected  # the concatenated deltas
    assert len(result.token_ids) < len(full.token_ids)


def test_logits_options_match_their_definition_in_a_shared_batch(
    engine: TorchEngine, references: dict[str, list[int]]
) -> None:
    eos = {engine.tokenizer.eos_token_id}
    requests, expected = [], {}
    for i, options in enumerate(LOGITS_OPTIONS):
        prompt = PROMPTS[i % len(PROMPTS)]
        params = SamplingParams(max_tokens=NEW_TOKENS, **options)  # type: ignore[arg-type]
        requests.append(GenerationRequest(f"o{i}", prompt, params))
        expected[f"o{i}"] = adjusted_reference(
            engine.model, engine.tokenizer, prompt, NEW_TOKENS, eos, **options
        )
        assert expected[f"o{i}"] != references[prompt], options  # the option changes this answer
    requests.append(_greedy("plain", PROMPTS[6]))
    results = _run(engine, requests)
    for request_id, tokens in expected.items():
        assert results[request_id].token_ids == tokens, request_id
    assert results["plain"].token_ids == references[PROMPTS[6]]  # its neighbours' options left it alone


def test_min_tokens_and_stop_token_ids(engine: TorchEngine) -> None:
    eos = engine.tokenizer.eos_token_id
    prompt = PROMPTS[3]
    # EOS made the likeliest by far: without min_tokens it comes first; with it, after 5 others.
    eager = SamplingParams(max_tokens=NEW_TOKENS, logit_bias=((eos, 100.0),))
    held = SamplingParams(max_tokens=NEW_TOKENS, logit_bias=((eos, 100.0),), min_tokens=5)
    # A stop token id ends the request as EOS does: finish "stop", and it adds no text.
    stopper = SamplingParams(max_tokens=NEW_TOKENS, logit_bias=((42, 100.0),), stop_token_ids=(42,))
    ignored = SamplingParams(max_tokens=4, logit_bias=((42, 100.0),))
    requests = [
        GenerationRequest(n, prompt, p) for n, p in [("eager", eager), ("held", held), ("stop", stopper)]
    ]
    results = _run(engine, [*requests, GenerationRequest("plain", prompt, ignored)])
    assert results["eager"].token_ids == [eos] and results["eager"].finish_reason == FinishReason.STOP
    assert len(results["held"].token_ids) == 6 and results["held"].token_ids[-1] == eos
    assert eos not in results["held"].token_ids[:5] and results["held"].finish_reason == FinishReason.STOP
    assert results["stop"].token_ids == [42] and results["stop"].text == ""
    assert results["stop"].finish_reason == FinishReason.STOP
    assert results["plain"].token_ids == [42] * 4  # the same bias without the stop id: it goes on


def test_special_tokens_and_stop_strings_in_the_output(engine: TorchEngine) -> None:
    """vLLM's skip_special_tokens and include_stop_str_in_output, as vLLM's own engine answers them
    (tests/test_vllm_engine.py asks it the same)."""
    prompt = PROMPTS[1]
    full = _run(engine, [_greedy("full", prompt)])["full"]
    cases = output_option_cases(engine.tokenizer, full.text, full.token_ids)
    requests = [GenerationRequest(name, prompt, params) for name, (params, _) in cases.items()]
    results = _run(engine, requests)
    assert {name: results[name].text for name in cases} == {name: text for name, (_, text) in cases.items()}


def test_logprobs_are_the_raw_distributions(engine: TorchEngine) -> None:
    """Each token's log-probability and the k likeliest, from the model's raw logits (as vLLM's
    default): transformers' generate() logits give the same, for a greedy row and beside rows that
    ask for none or adjust their logits (which must not change the logprobs reported)."""
    prompt = PROMPTS[0]
    want = reference_logprobs(engine.model, engine.tokenizer, prompt, NEW_TOKENS, 3)
    asked = SamplingParams(max_tokens=NEW_TOKENS, logprobs=3)
    requests = [
        GenerationRequest("lp", prompt, asked),
        GenerationRequest("none", PROMPTS[1], SamplingParams(max_tokens=NEW_TOKENS)),
        GenerationRequest("k0", prompt, SamplingParams(max_tokens=NEW_TOKENS, logprobs=0)),
    ]
    got: dict[str, list[Any]] = {}
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.logprobs is not None:
                assert len(delta.logprobs) == len(delta.token_ids)
                got.setdefault(delta.request_id, []).extend(delta.logprobs)
            elif delta.token_ids:
                assert delta.request_id == "none"
    assert_logprobs_close(got["lp"], want)
    assert [(t, lp) for t, lp, _ in got["k0"]] == [(t, lp) for t, lp, _ in got["lp"]]
    assert all(top == () for _, _, top in got["k0"])
    assert "none" not in got


def test_prompt_logprobs_score_each_prompt_token(engine: TorchEngine) -> None:
    """prompt_logprobs: every prompt token's log-probability given the ones before it (a plain
    forward over the prompt alone gives the same), on the request's first delta only, for rows of
    different lengths left-padded in one prefill beside a row that asks for none; generation goes
    on as without them."""
    short, long = PROMPTS[0], PROMPTS[1] + " " + PROMPTS[2]
    requests = [
        GenerationRequest("short", short, SamplingParams(max_tokens=4, prompt_logprobs=2)),
        GenerationRequest("long", long, SamplingParams(max_tokens=4, prompt_logprobs=0)),
        GenerationRequest("none", PROMPTS[3], SamplingParams(max_tokens=4)),
    ]
    for request in requests:
        engine.add_request(request)
    scored: dict[str, list[Any]] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.prompt_logprobs is not None:
                assert delta.request_id not in scored and delta.request_id not in tokens  # the first delta
                scored[delta.request_id] = delta.prompt_logprobs
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
    assert set(scored) == {"short", "long"}
    assert len(scored["long"]) > len(scored["short"])  # the short row was left-padded
    assert_logprobs_close(
        scored["short"], reference_prompt_logprobs(engine.model, engine.tokenizer, short, 2)
    )
    assert_logprobs_close(scored["long"], reference_prompt_logprobs(engine.model, engine.tokenizer, long, 0))
    assert tokens["short"] == _reference(engine, short, 4)


def test_a_scored_prefill_keeps_its_logits_within_budget(mixtral_dir: Path, engine: TorchEngine) -> None:
    """A prefill that keeps every position's logits (a scored prompt) is bounded by
    max_scored_logits_bytes: with room for less than two prompts', three scored prompts are prefilled one
    at a time (each scored right), where three plain ones share one prefill."""
    prompts = PROMPTS[:3]
    shortest = min(len(engine.tokenizer(p)["input_ids"]) for p in prompts)
    vocab = int(engine.model.config.vocab_size)
    room = 4 * vocab * (2 * shortest - 1)  # less than any two rows' (one row always goes)
    tight = TorchEngine(mixtral_dir, max_batch_size=8, max_scored_logits_bytes=room)
    tight.load()
    try:
        for i, prompt in enumerate(prompts):
            tight.add_request(
                GenerationRequest(f"s{i}", prompt, SamplingParams(max_tokens=2, prompt_logprobs=1))
            )
        per_step: list[int] = []
        scored: dict[str, list[Any]] = {}
        while tight.has_unfinished():
            deltas = tight.step()
            per_step.append(sum(d.prompt_logprobs is not None for d in deltas))
            scored |= {d.request_id: d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None}
        assert per_step[:3] == [1, 1, 1]
        for i, prompt in enumerate(prompts):
            assert_logprobs_close(
                scored[f"s{i}"], reference_prompt_logprobs(tight.model, tight.tokenizer, prompt, 1)
            )
        for i, prompt in enumerate(prompts):
            tight.add_request(GenerationRequest(f"p{i}", prompt, SamplingParams(max_tokens=2)))
        assert len(tight.step()) == 3  # one prefill for the three
        while tight.has_unfinished():
            tight.step()
    finally:
        tight.close()


def test_structured_outputs_obey_their_constraint_in_a_shared_batch(
    engine: TorchEngine, references: dict[str, list[int]]
) -> None:
    """Each row's matcher masks only its own logits: every constrained answer is one its constraint
    accepts, ended (stop) when complete; a plain row in the same batch gives generate()'s tokens."""
    requests = structured_requests()
    requests.append(_greedy("plain", PROMPTS[6]))
    results = _run(engine, requests)
    for request in requests[:-1]:
        result = results[request.request_id]
        assert request.params.structured is not None
        assert result.finish_reason == FinishReason.STOP, (request.request_id, result.text)
        assert_obeys(request.params.structured, result.text)
    assert results["plain"].token_ids == references[PROMPTS[6]]
    grammars = engine._grammars
    assert grammars is not None and grammars.compiles == len(STRUCTURED_CASES)  # once per distinct spec
    _run(engine, structured_requests()[:2])
    assert grammars.compiles == len(STRUCTURED_CASES)  # the cache served the second request


def test_a_spec_that_does_not_compile_is_refused_at_add(engine: TorchEngine) -> None:
    bad = SamplingParams(max_tokens=4, structured=("regex", "[0-9"))
    with pytest.raises(ValueError, match="structured-output spec does not compile"):
        engine.add_request(GenerationRequest("bad", "x", bad))
    assert not engine.has_unfinished()


def test_abort_frees_the_row_and_reports_next_step(
    engine: TorchEngine, references: dict[str, list[int]]
) -> None:
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(_greedy(f"r{i}", prompt, max_tokens=NEW_TOKENS))
    results: dict[str, Result] = {}
    _collect(engine, results)  # prefill
    _collect(engine, results)  # one decode
    assert engine.stats().running == 3
    engine.abort("r1")
    assert engine.stats().running == 2  # the row left the batch at once
    _collect(engine, results)
    assert results["r1"].finish_reason == FinishReason.ABORT
    assert len(results["r1"].token_ids) == 2
    while engine.has_unfinished():
        _collect(engine, results)
    for i in (0, 2):  # the rows that stayed are unaffected by the removal
        _assert_matches(engine, results[f"r{i}"], references[PROMPTS[i]], NEW_TOKENS)
    engine.abort("r0")  # unknown or finished ids are ignored
    assert engine.step() == []


def test_abort_while_waiting(engine: TorchEngine) -> None:
    engine.add_request(_greedy("w", PROMPTS[0]))
    engine.abort("w")
    deltas = engine.step()
    assert [(d.request_id, d.finish_reason, d.token_ids) for d in deltas] == [("w", FinishReason.ABORT, [])]
    assert not engine.has_unfinished()


def _ranked(request_id: str, prompt: str, priority: int) -> GenerationRequest:
    return GenerationRequest(request_id, prompt, SamplingParams(max_tokens=NEW_TOKENS), priority=priority)


def test_a_more_urgent_request_preempts_and_the_preempted_resume_exactly(
    engine: TorchEngine, references: dict[str, list[int]]
) -> None:
    """A full batch of batch-tier rows (rank 3): two normal requests (rank 1) arriving take the
    rows of the two latest batch requests at the next step; those wait, then are prefilled again
    with what they had made and go on to the very tokens they would have made unpreempted."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(_ranked(f"batch{i}", prompt, 3))
    results: dict[str, Result] = {}
    for _ in range(3):  # the prefill, two decodes
        _collect(engine, results)
    assert engine.stats().running == 8
    for i, prompt in enumerate(LATE_PROMPTS[:2]):
        engine.add_request(_ranked(f"urgent{i}", prompt, 1))
    _collect(engine, results)
    assert {"urgent0", "urgent1"} <= set(results)  # admitted at once: their first tokens
    assert (engine.stats().running, engine.stats().waiting) == (8, 2)
    made_before = {f"batch{i}": len(results[f"batch{i}"].token_ids) for i in (6, 7)}
    assert made_before == {"batch6": 3, "batch7": 3}  # the latest two stopped after three tokens
    while engine.has_unfinished():
        _collect(engine, results)
    for i, prompt in enumerate(PROMPTS):
        _assert_matches(engine, results[f"batch{i}"], references[prompt], NEW_TOKENS)
    for i, prompt in enumerate(LATE_PROMPTS[:2]):
        _assert_matches(engine, results[f"urgent{i}"], references[prompt], NEW_TOKENS)


def test_waiting_requests_go_by_rank_and_a_rank_never_preempts_its_own(engine: TorchEngine) -> None:
    """A full batch of normal requests (rank 1): a batch-tier request and another normal one wait
    (neither outranks a running row); a high one (rank 0) takes the latest normal row. Then rows
    free up: the preempted normal request first (it arrived first), the waiting normal one, the
    batch-tier one last, whatever the order they came in."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(_ranked(f"n{i}", prompt, 1))
    results: dict[str, Result] = {}
    _collect(engine, results)
    engine.add_request(_ranked("low", LATE_PROMPTS[0], 3))
    engine.add_request(_ranked("same", LATE_PROMPTS[1], 1))
    _collect(engine, results)
    assert "low" not in results and "same" not in results  # neither outranks the running rows
    assert (engine.stats().running, engine.stats().waiting) == (8, 2)
    engine.add_request(_ranked("high", LATE_PROMPTS[2], 0))
    _collect(engine, results)
    assert "high" in results and (engine.stats().running, engine.stats().waiting) == (8, 3)
    first: list[str] = []
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.request_id in ("low", "same", "n7") and delta.request_id not in first:
                first.append(delta.request_id)
    assert first == ["n7", "same", "low"]


def test_the_batch_tier_yields_its_rows_while_urgent_work_runs(
    mixtral_dir: Path, references: dict[str, list[int]]
) -> None:
    """batch_yield (rank 3, 1 row, hold 0.05 s): six batch-tier requests run in 8 rows; two normal
    ones (rank 1) arrive. At the next step the batch tier is down to one row (the latest five
    preempted though rows were free) and stays there while the normal ones run and for the hold
    after; then it takes its rows again (all but the one that ran through and ended). Every
    request ends with the tokens it would have made alone (greedy; the preempted ones recomputed
    from what they made). Without batch_yield all six would run on beside the normal ones."""
    engine = TorchEngine(mixtral_dir, max_batch_size=8, batch_yield=(3, 1, 0.05))
    engine.load()

    def tier() -> int:  # batch-tier rows running
        batch = engine._batch
        return sum(1 for q in batch.seqs if q.request.priority >= 3) if batch is not None else 0

    for i, prompt in enumerate(PROMPTS[:6]):
        engine.add_request(_ranked(f"batch{i}", prompt, 3))
    results: dict[str, Result] = {}
    for _ in range(2):
        _collect(engine, results)
    assert tier() == 6
    for i, prompt in enumerate(LATE_PROMPTS[:2]):
        engine.add_request(_ranked(f"urgent{i}", prompt, 1))
    beside: list[int] = []
    while any(results.get(f"urgent{i}", Result()).finish_reason is None for i in range(2)):
        _collect(engine, results)
        beside.append(tier())
    assert {"urgent0", "urgent1"} <= set(results) and max(beside) == 1, beside
    assert tier() == 1  # the hold: still one row
    time.sleep(0.06)
    _collect(engine, results)
    left = sum(1 for i in range(6) if results[f"batch{i}"].finish_reason is None)
    assert tier() == left >= 4  # alone again: every batch-tier request not yet ended runs
    while engine.has_unfinished():
        _collect(engine, results)
    for i, prompt in enumerate(PROMPTS[:6]):
        _assert_matches(engine, results[f"batch{i}"], references[prompt], NEW_TOKENS)
    for i, prompt in enumerate(LATE_PROMPTS[:2]):
        _assert_matches(engine, results[f"urgent{i}"], references[prompt], NEW_TOKENS)


def test_the_engine_names_whom_it_seats_before_it_computes_them(engine: TorchEngine) -> None:
    """on_seated: called by each prefill step with the requests it admits, before it computes them
    (none of their tokens made yet), each request once; requests still waiting for a row (10 of
    them in 8 rows) are not named until they get one. The worker records it: a death in that step
    counts against the job's attempts (scheduler/record.py REQUEUE)."""
    seen: list[tuple[list[str], int]] = []
    engine.on_seated = lambda ids: seen.append((ids, engine.stats().tokens_generated))
    try:
        for i in range(10):
            engine.add_request(_greedy(f"seat{i}", PROMPTS[i % len(PROMPTS)], max_tokens=4))
        made = engine.stats().tokens_generated
        first = engine.step()
        assert len(seen) == 1 and seen[0][1] == made  # named before the step made a token
        assert {d.request_id for d in first} == set(seen[0][0]) and len(seen[0][0]) <= 8
        results: dict[str, Result] = {d.request_id: Result(token_ids=list(d.token_ids)) for d in first}
        while engine.has_unfinished():
            _collect(engine, results)
        named = [rid for ids, _ in seen for rid in ids]
        assert sorted(named) == sorted(f"seat{i}" for i in range(10))  # each once
        assert all(len(results[f"seat{i}"].token_ids) == 4 for i in range(10))
    finally:
        engine.on_seated = None


def test_prompt_too_long_and_context_limit(mixtral_dir: Path) -> None:
    engine = TorchEngine(mixtral_dir, max_context=24)
    engine.load()
    long_prompt = " ".join(["word"] * 40)
    assert engine.count_tokens(long_prompt) >= 24
    prompt = PROMPTS[0]
    n_prompt = engine.count_tokens(prompt)
    results = _run(engine, [_greedy("long", long_prompt), _greedy("ctx", prompt, max_tokens=100)])
    assert results["long"].finish_reason == FinishReason.LENGTH
    assert results["long"].token_ids == [] and results["long"].text == ""
    ctx = results["ctx"]
    if engine.tokenizer.eos_token_id not in ctx.token_ids:
        assert ctx.finish_reason == FinishReason.LENGTH
        assert n_prompt + len(ctx.token_ids) == 24


@pytest.mark.slow  # a checkpoint per architecture (mixtral: the tests above)
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mixtral"])
def test_other_architectures_match_generate(arch: str, tmp_path: Path) -> None:
    engine = TorchEngine(build_checkpoint(tmp_path / arch, arch=arch, progress=False))
    engine.load()
    prompts = PROMPTS[:4]
    results = _run(engine, [_greedy(f"p{i}", p, max_tokens=10) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        _assert_matches(engine, results[f"p{i}"], _reference(engine, prompt, 10), 10)
    assert engine.stats().max_batch_seen == len(prompts)
