"""Token log-probabilities as OpenAI's answers carry them.

The engine reports per token [id, logprob, [[id, logprob], ...]] (moe_core/engine.py TokenLogprob,
carried in the job's stream); here ids become text with the served model's tokenizer, the one the
API counts prompts with: completions get the legacy shape (tokens, token_logprobs, top_logprobs,
text_offset), chat the per-token objects with their UTF-8 bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from api.openai.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprobs,
    PromptTokenLogprob,
    TokenLogprob,
    TopLogprob,
)

# [token id, logprob, [[id, logprob], ...]]; a prompt token's adds its rank, and the first prompt
# token's logprob and rank are None (Job.prompt_logprobs)
Entry = Sequence[Any]


class TokenTexts:
    """A token id's text (special tokens spelled out, as vLLM reports them), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = functools.lru_cache(maxsize=65536)(
            lambda token: str(tokenizer.decode([token], skip_special_tokens=False))
        )

    def __call__(self, token: int) -> str:
        return self._decode(token)


@functools.cache  # one tokenizer per API process: one cache
def token_texts(tokenizer: Any) -> TokenTexts:
    return TokenTexts(tokenizer)


def completion_logprobs(
    entries: Sequence[Entry], texts: TokenTexts, offset: int
) -> tuple[CompletionLogprobs, int]:
    """→ (the shape for these tokens, the text offset after them); offset: where the first starts."""
    out = CompletionLogprobs()
    for entry in entries:
        token, logprob, top = entry[0], entry[1], entry[2]
        text = texts(token)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append({texts(t): lp for t, lp in top} if top else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs(entries: Sequence[Entry], texts: TokenTexts) -> ChatLogprobs:
    def one(token: int, logprob: float) -> TopLogprob:
        text = texts(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for token, logprob, top in entries:
        first = one(token, logprob)
        content.append(TokenLogprob(**first.model_dump(), top_logprobs=[one(t, lp) for t, lp in top]))
    return ChatLogprobs(content=content)


def prompt_logprobs(entries: Sequence[Entry], texts: TokenTexts) -> PromptLogprobs:
    """vLLM's prompt_logprobs: None for the first token, then {token id: logprob, rank, text} for
    the prompt's token and each alternative (an alternative's rank is its place among them)."""
    out: PromptLogprobs = []
    for token, logprob, top, rank in entries:
        if logprob is None:
            out.append(None)
            continue
        position = {token: PromptTokenLogprob(logprob=logprob, rank=rank, decoded_token=texts(token))}
        for place, (t, lp) in enumerate(top, start=1):
            position.setdefault(t, PromptTokenLogprob(logprob=lp, rank=place, decoded_token=texts(t)))
        out.append(position)
    return out
