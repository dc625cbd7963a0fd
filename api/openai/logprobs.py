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

from api.openai.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

Entry = Sequence[Any]  # [token id, logprob, [[id, logprob], ...]]


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
    for token, logprob, top in entries:
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
