"""A chat's messages (and the tools it offers) → one prompt: the model's own chat template, or
ChatML when it has none; and the tool-call format the model will answer in (api/openai/tools.py).

A template that shows tools (Qwen's, Mistral's) gets them, and the conversation's earlier calls and
tool results, as it expects them (`tools=`, `tool_calls`, `role: tool`). Where the model has no
template, or one that ignores tools, LocalMoE writes them in the hermes format itself, as Qwen2.5's
template does: the tools in the system turn, earlier calls as `<tool_call>` text, tool results as
a user turn of `<tool_response>` blocks.

The template also gets the request's own variables (vLLM's `chat_template_kwargs`, such as
Qwen3's `enable_thinking`, and OpenAI's `reasoning_effort`), and earlier assistant turns' reasoning
as `reasoning_content` (Qwen3's and DeepSeek's name) and `thinking` (gpt-oss's)."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.openai.errors import OpenAIError
from api.openai.protocol import ChatMessage, Tool
from api.openai.reasoning import opens_think, thinks
from api.openai.tools import (
    HERMES,
    ToolFormat,
    format_for,
    hermes_call_text,
    hermes_system,
    template_renders_tools,
)

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


def chatml(
    messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, continue_final: bool = False
) -> str:
    """continue_final: the last message is left open (the model continues its text)."""
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if continue_final and messages:
        return turns[: -len(IM_END) - 1]
    return f"{turns}{IM_START}assistant\n" if add_generation_prompt else turns


def _arguments(call_arguments: str, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call_arguments)
    except ValueError as e:
        raise OpenAIError(400, f"tool call arguments are not JSON: {e}", where) from e
    if not isinstance(arguments, dict):
        raise OpenAIError(400, "tool call arguments must be a JSON object", where)
    return arguments


def _turns(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as chat templates take them: `developer` as `system`, earlier calls' arguments
    as objects (templates write them with `tojson`), tool results with the call they answer."""
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            turn["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments, f"messages.{i}.tool_calls.{j}"),
                    },
                }
                for j, c in enumerate(m.tool_calls)
            ]
        if m.tool_call_id:
            turn["tool_call_id"] = m.tool_call_id
        if (reasoning := m.reasoning or m.reasoning_content) is not None:
            turn["reasoning_content"] = turn["thinking"] = reasoning
        turns.append(turn)
    return turns


def _hermes_turns(turns: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools, calls and results written out as hermes text, for a template (or ChatML) that knows
    only system / user / assistant turns of text."""
    out: list[dict[str, Any]] = []
    if tools:
        system = turns[0]["content"] if turns and turns[0]["role"] == "system" else None
        out.append({"role": "system", "content": hermes_system(tools, system)})
        turns = turns[1:] if system is not None else turns
    for turn in turns:
        if turn["role"] == "tool":
            block = f"<tool_response>\n{turn['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block  # consecutive results: one user turn
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
            continue
        if turn.get("tool_calls"):
            calls = [
                hermes_call_text(c["function"]["name"], c["function"]["arguments"])
                for c in turn["tool_calls"]
            ]
            text = "\n".join(([turn["content"]] if turn["content"] else []) + calls)
            out.append({"role": turn["role"], "content": text})
            continue
        out.append({"role": turn["role"], "content": turn["content"]})
    return [{"role": t["role"], "content": t["content"]} for t in out]


@dataclass(frozen=True)
class Rendered:
    prompt: str
    stop: list[str]  # stop strings the template implies (ChatML's end of turn)
    calls: ToolFormat  # the format of the model's tool calls
    think: bool = False  # the template writes think tags (api/openai/reasoning.py)

    @property
    def inside_think(self) -> bool:
        """The prompt leaves the model inside a think block (its answer starts as reasoning)."""
        return self.think and opens_think(self.prompt)


async def render_chat(
    model_dir: Path,
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool = True,
    tools: Sequence[Tool] = (),
    variables: Mapping[str, Any] | None = None,
    continue_final: bool = False,
) -> Rendered:
    """add_generation_prompt: end with the assistant's turn opened; continue_final: leave the last
    message open instead (the model continues it; not with add_generation_prompt); variables: more
    for the template (a model without a template has nothing to take them)."""
    turns = _turns(messages)
    listed = [t.model_dump(exclude_none=True) for t in tools]
    uses_tools = bool(tools) or any(t["role"] == "tool" or t.get("tool_calls") for t in turns)
    tokenizer = await asyncio.to_thread(_hf_tokenizer, model_dir)  # the first call loads it
    if tokenizer is None:
        hermes = _hermes_turns(turns, listed) if uses_tools else turns
        return Rendered(chatml(hermes, add_generation_prompt, continue_final), [IM_END], HERMES)
    template = str(tokenizer.chat_template)
    native = template_renders_tools(template)
    kwargs: dict[str, Any] = dict(variables or {})
    if listed and native:
        kwargs["tools"] = listed
    if uses_tools and not native:
        turns = _hermes_turns(turns, listed)
    try:
        prompt = tokenizer.apply_chat_template(
            turns,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
            **kwargs,
        )
    except Exception as e:  # a template may refuse a conversation (jinja's raise_exception)
        raise OpenAIError(400, f"the model's chat template refused these messages: {e}", "messages") from e
    return Rendered(str(prompt), [], format_for(template) if native else HERMES, thinks(template))
