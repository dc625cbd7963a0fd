"""vLLM's `/tokenize` and `/detokenize`: the served model's own tokenizer, as the engine counts.

A prompt (`add_special_tokens` true by default: the BOS the engine adds) or a chat's `messages`
(rendered by the chat template, as /v1/chat/completions renders them; `add_special_tokens` false
by default, as the template writes its own) → the token ids, their count and the context length;
token ids → text, special tokens kept (as vLLM). Behind the API key, like every route that is
not a probe.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.auth import Caller
from api.deps import ServicesDep
from api.openai.chat_template import render_chat
from api.openai.errors import ERRORS, OpenAIError, OpenAIRoute
from api.openai.protocol import ChatMessage, Tool, template_options_refused
from api.openai.serving import check_model

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


class TokenizeRequest(BaseModel):
    """Either `prompt` or `messages`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name; may be left out.")
    prompt: str | None = Field(None, description="Text to tokenize.")
    messages: list[ChatMessage] | None = Field(None, description="A chat, rendered by the model's template.")
    tools: list[Tool] | None = Field(None, description="Chat: the tools shown to the model, as chat does.")
    add_generation_prompt: bool = Field(True, description="Chat: end with the assistant's turn opened.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Chat: more variables for the model's chat template, as chat does."
    )
    continue_final_message: bool = Field(
        False, description="Chat: leave the last message open, as chat does (add_generation_prompt false)."
    )
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (BOS); default: a prompt yes, a chat no."
    )
    return_token_strs: bool = Field(False, description="Also return each token as the tokenizer spells it.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of `prompt` and `messages`")
        if self.tools and self.messages is None:
            raise ValueError("`tools` go with `messages`")
        if self.chat_template_kwargs and self.messages is None:
            raise ValueError("`chat_template_kwargs` go with `messages`")
        refused = template_options_refused(
            self.chat_template_kwargs, self.add_generation_prompt, self.continue_final_message
        )
        if refused is not None:
            raise ValueError(refused[0])
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name; may be left out.")
    tokens: list[int] = Field(description="Token ids of the served model's vocabulary.")


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, services: ServicesDep, _caller: Caller) -> TokenizeResponse:
    """A prompt's or a chat's token ids, as the engine will see them."""
    check_model(body.model, services)
    if body.messages is not None:
        model_dir = services.settings.resolved_model_dir
        rendered = await render_chat(
            model_dir,
            body.messages,
            body.add_generation_prompt,
            body.tools or (),
            body.chat_template_kwargs,
            body.continue_final_message,
        )
        text = rendered.prompt
        special = bool(body.add_special_tokens)
    else:
        text = body.prompt or ""
        special = body.add_special_tokens is not False
    encoding = services.counter.tokenizer.encode(text, add_special_tokens=special)
    return TokenizeResponse(
        count=len(encoding.ids),
        max_model_len=services.counter.max_context,
        tokens=encoding.ids,
        token_strs=encoding.tokens if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, services: ServicesDep, _caller: Caller) -> DetokenizeResponse:
    """Token ids → text."""
    check_model(body.model, services)
    tokenizer = services.counter.tokenizer
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise OpenAIError(400, f"token ids out of the vocabulary (0 ≤ id < {vocab}): {bad[:8]}", "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))
