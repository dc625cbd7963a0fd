"""Per-request token selection for a batch of next-token logits.

`adjust_logits` first applies what a request asks of the logits themselves (min_tokens, logit_bias,
penalties: SamplingParams says how), row by row, only on the rows that ask for any.

Greedy rows (temperature 0) take the argmax, exactly as `generate(do_sample=False)` does. Sampled
rows apply temperature, then min-p (vLLM applies it there, before top-k and top-p), then top-k,
then top-p (the order of transformers' logits warpers) and draw
from their own `torch.Generator`, so a seeded request samples the same tokens whatever else is in
the batch: every row-wise operation here depends on that row only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_core.engine import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator for a sampled request (seeded from `seed`, else randomly); None when greedy."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()  # non-deterministic seed
    else:
        generator.manual_seed(params.seed)
    return generator


def adjust_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_ids: frozenset[int],
) -> torch.Tensor:
    """min_tokens, logit_bias and the penalties, in vLLM's order. logits: [B, V] float32 (changed
    in place and returned); prompts / outputs: each row's prompt and generated token ids."""
    vocab = logits.shape[-1]
    for row, p in enumerate(params):
        if not p.adjusts_logits:
            continue
        x = logits[row]  # [V], a view
        if len(outputs[row]) < p.min_tokens:
            banned = [t for t in (*eos_ids, *p.stop_token_ids) if t < vocab]
            if banned:
                x[torch.tensor(banned, device=x.device)] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=x.device)
            x.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=x.device, dtype=x.dtype))
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*prompts[row], *outputs[row]}), dtype=torch.long, device=x.device)
            picked = x[seen]
            x[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and outputs[row]:
            made = torch.tensor(outputs[row], dtype=torch.long, device=x.device)
            counts = torch.bincount(made, minlength=vocab)[:vocab].to(x.dtype)  # [V]
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return logits


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row. logits: [B, V] (any float dtype); returns [B] int64 on logits' device."""
    logits = logits.float()  # generate() also works on float32 scores
    tokens = torch.argmax(logits, dim=-1)  # [B]; final for greedy rows
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        rows_params = [params[i] for i in sampled_rows]
        rows_generators = [generators[i] for i in sampled_rows]
        tokens[rows] = _sample_rows(logits[rows], rows_params, rows_generators)
    return tokens


def _sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Temperature / min-p / top-k / top-p sampling. logits: [S, V] float32; returns [S] int64."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)  # [S]
    # Sort once, descending; stable, so ties keep argmax's order (top_k=1 is greedy).
    sorted_logits, sorted_ids = torch.sort(
        logits / temperature[:, None], dim=-1, descending=True, stable=True
    )
    if any(p.min_p > 0 for p in params):
        sorted_logits = _mask_min_p(sorted_logits, [p.min_p for p in params])  # [S, V]
    sorted_logits = _mask_top_k(sorted_logits, [p.top_k for p in params])  # [S, V]
    probs = torch.softmax(sorted_logits, dim=-1)  # [S, V]
    probs = _mask_top_p(probs, [p.top_p for p in params])  # [S, V], unnormalised
    picks = torch.empty(len(params), dtype=torch.long, device=device)  # [S], index into sorted order
    for i, generator in enumerate(generators):
        picks[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return sorted_ids.gather(1, picks[:, None])[:, 0]


def _mask_min_p(sorted_logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop tokens less likely than min_p times the likeliest (0: none). sorted_logits: [S, V],
    descending: p_i < min_p * p_0 is logit_i < logit_0 + log(min_p)."""
    m = torch.tensor(min_p, device=sorted_logits.device, dtype=sorted_logits.dtype)  # [S]
    floor = sorted_logits[:, :1] + torch.log(m)[:, None]  # [S, 1]; -inf where min_p is 0
    return sorted_logits.masked_fill(sorted_logits < floor, float("-inf"))


def _mask_top_k(sorted_logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Keep the k largest logits per row (k <= 0: all). sorted_logits: [S, V], descending."""
    vocab = sorted_logits.shape[-1]
    k = torch.tensor([t if 0 < t < vocab else vocab for t in top_k], device=sorted_logits.device)  # [S]
    rank = torch.arange(vocab, device=sorted_logits.device)  # [V]
    return sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))


def _mask_top_p(sorted_probs: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Keep the smallest prefix whose mass reaches p (at least one token). sorted_probs: [S, V]."""
    p = torch.tensor(top_p, device=sorted_probs.device, dtype=sorted_probs.dtype)  # [S]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [S, V], exclusive cumsum
    drop = (mass_before >= p[:, None]) & (p[:, None] < 1.0)  # top_p 1.0 is off (no rounding loss)
    drop[:, 0] = False  # the most likely token always stays
    return sorted_probs.masked_fill(drop, 0.0)


def apply_token_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """-inf on every token a row's bitmask leaves out, in place. logits: [B, V] float; bitmask:
    int32 [len(rows), ceil(V / 32)] on the CPU, bit j of word w allowing token 32 w + j, its row i
    belonging to logits row rows[i]. A row that allows nothing is left as it is (its matcher is in
    error, which the caller turns into the request's failure: a row of -inf cannot be sampled)."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32)  # [32]
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(len(rows), -1)[:, :vocab].bool()  # [R, V]
    usable = allowed.any(dim=-1)  # [R]
    if not bool(usable.all()):
        rows = [r for r, ok in zip(rows, usable.tolist(), strict=True) if ok]
        allowed = allowed[usable]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
