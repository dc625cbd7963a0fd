"""A chat's messages → one prompt: the model's own chat template, or ChatML when it has none."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from api.openai.errors import OpenAIError
from api.openai.protocol import ChatMessage

# --- chat template -------------------------------------------------------------------------------

# Without a template in the model's tokenizer config, a ChatML-style one (Qwen's, many others'):
#   <|im_start|>system\n{content}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n
# and `<|im_end|>` is added as a stop string, so a model continuing the pattern ends its turn.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@functools.cache
def _hf_tokenizer(model_dir: Path) -> Any | None:
    """The model's tokenizer when it carries a chat template, else None; loaded once, lazily
    (importing transformers costs seconds: a model without a template never pays it)."""
    config = model_dir / "tokenizer_config.json"
    declared = config.exists() and "chat_template" in json.loads(config.read_text())
    if not declared and not (model_dir / "chat_template.jinja").exists():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer if getattr(tokenizer, "chat_template", None) else None


def chatml(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return f"{turns}{IM_START}assistant\n" if add_generation_prompt else turns


async def render_chat(
    model_dir: Path, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
) -> tuple[str, list[str]]:
    """→ (the prompt, stop strings the template implies). `developer` is rendered as `system`,
    the role chat templates know; add_generation_prompt: end with the assistant's turn opened."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    tokenizer = await asyncio.to_thread(_hf_tokenizer, model_dir)  # the first call loads it
    if tokenizer is None:
        return chatml(turns, add_generation_prompt), [IM_END]
    try:
        prompt = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # a template may refuse a conversation (jinja's raise_exception)
        raise OpenAIError(400, f"the model's chat template refused these messages: {e}", "messages") from e
    return str(prompt), []
