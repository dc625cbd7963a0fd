"""Tool calls (function calling): the calls a model writes in its text, as OpenAI `tool_calls`.

A family's chat template defines how the tools are shown to the model and how it calls them
(`format_for` reads it off the template); the formats, as each family's template writes a call:
* hermes (Qwen2 / Qwen3 and their MoE models, and LocalMoE's ChatML fallback for a model without a
  template or one whose template ignores tools): each call is
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, several in a row for parallel calls.
* mistral (Mixtral and Mistral templates that know `[TOOL_CALLS]`): `[TOOL_CALLS] [{"name": ...,
  "arguments": {...}}, ...]` to the end of the answer; granite the same after `<|tool_call|>`.
* qwen3_coder (Qwen3-Coder, the templates with `<function=`): `<tool_call>\n<function=NAME>\n
  <parameter=KEY>\nVALUE\n</parameter>\n...</function>\n</tool_call>`, each value as text.
* glm45 (GLM-4.5, the templates with `<arg_key>`): `<tool_call>NAME\n<arg_key>KEY</arg_key>\n
  <arg_value>VALUE</arg_value>\n...</tool_call>`, each value as text.
* deepseek_v3 (DeepSeek-V3 / V3.1 and R1): `<｜tool▁calls▁begin｜>` then each call as
  `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>` (V3.1:
  `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`), then `<｜tool▁calls▁end｜>`.
* harmony (gpt-oss): the answer is messages in channels; a call is a message to `functions.NAME`
  (api/openai/harmony.py), and only the final channel is content, with tools or without.
A value written as text (qwen3_coder, glm45) takes the type its parameter's schema gives (`bound`:
the request's tools): a string stays as written, anything else is read as JSON.

`ToolFormat.parse` splits a whole answer into (content, calls); `ToolStream` does the same
incrementally for a streamed answer, holding back only text that could still begin a call.
Text that looks like a call but is not valid stays content (as vLLM's parsers do).

With tool_choice "required" or a named function, decoding is constrained (`ToolFormat.grammar`: a
Lark grammar with the calls' JSON as `%json` schemas): the answer is calls, and each call's
arguments validate against its function's parameters. The formats that write values as text are
forced as hermes JSON calls instead (`forced`), as vLLM forces JSON whatever a model's own format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from api.openai.reasoning import Call, partial_suffix

MAX_FORCED_CALLS = 8  # parallel calls in one forced answer, at most: a model that never ends a
# run of calls (a small one, greedy) stops there rather than at max_tokens with a cut call


def _call_of(obj: Any) -> Call | None:
    """{"name": str, "arguments" (or "parameters"): object} → a call; anything else → None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def _no_whitespace(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def _call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _typed(value: str, schema: Any) -> Any:
    """A value written as text → the parameter's type: a string stays as written (less the newline
    around it), anything else is read as JSON (as written when it is not JSON)."""
    text = value.strip("\n")
    types = schema.get("type") if isinstance(schema, dict) else None
    types = [types] if isinstance(types, str) else types or []
    enum = schema.get("enum") if isinstance(schema, dict) else None
    if "string" in types or (not types and enum and all(isinstance(e, str) for e in enum)):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


_QWEN_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*|\Z)", re.DOTALL)
_QWEN_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
_GLM_NAME = re.compile(r"\s*([^\s<][^\n<]*?)\s*(?=<arg_key>|\n|\Z)")
_GLM_ARGUMENT = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_DEEPSEEK_CALL = re.compile(
    r"\s*<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>([^\n]+)\n```(?:json)?\n(.*?)\n```"
    r"|([^<\n]+?)<｜tool▁sep｜>(.*?))<｜tool▁call▁end｜>",
    re.DOTALL,
)


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str  # what opens the calls
    end: str | None  # what closes each call (hermes); None: the calls run to the end (mistral)
    # how calls are written between start and end: "json" (one object per call), "json_list" (one
    # array to the end), "qwen_xml", "glm_xml" (values as text), "deepseek" (a block of calls)
    body: str = "json"
    gap: str = " "  # json_list: what the forcing grammar puts after `start`
    markers: tuple[str, ...] = ()  # what else a call is written with (a tokenizer may hold as special)
    # the request's functions' parameter schemas (name → schema): the types of values written as text
    params: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def bound(self, tools: Sequence[tuple[str, dict[str, Any] | None]]) -> ToolFormat:
        """This format with the request's functions ((name, parameters schema) pairs) known."""
        return replace(self, params={name: params or {} for name, params in tools})

    def marked_by(self, special: Collection[str]) -> bool:
        """Is any of this format's markers one of these special tokens (text a detokenizer skips
        unless asked not to: the parser would never see the calls)?"""
        return any(m in special for m in (self.start, self.end, *self.markers) if m)

    def forced(self) -> ToolFormat:
        """The format calls are forced in (tool_choice required or named): this one when its calls
        are JSON, else hermes (a grammar for values written as text could not hold the schemas)."""
        return self if self.body in ("json", "json_list") else replace(HERMES, params=self.params)

    def stream(self, limit: int | None = None) -> ToolStream:
        """A streamed answer's splitter (limit: calls given out at most). Not for harmony: its
        answers are channels, split whole by api/openai/harmony.py (api/openai/answer.py chooses)."""
        assert self.body != "harmony", "harmony answers are split by api/openai/harmony.py"
        return ToolStream(self, limit)

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """A whole answer → (its content, its calls). No valid call: (text, []). Not for harmony."""
        assert self.body != "harmony", "harmony answers are split by api/openai/harmony.py"
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls = self._calls(text[at:])
        if calls is None:
            return text, []
        return text[:at].strip(), calls

    def _calls(self, text: str) -> list[Call] | None:
        """The calls in `text` (which starts with `start`); None when any is not valid."""
        if self.body in ("qwen_xml", "glm_xml", "deepseek"):
            return self._written_calls(text)
        if self.end is None:  # mistral: one JSON array (or object) after the marker
            try:
                parsed = json.loads(text[len(self.start) :])
            except ValueError:
                return None
            items = parsed if isinstance(parsed, list) else [parsed]
            found = [_call_of(item) for item in items]
            calls = [c for c in found if c is not None]
            return calls if calls and len(calls) == len(found) else None
        calls = []
        pattern = re.escape(self.start) + r"(.*?)(?:" + re.escape(self.end) + r"|\Z)"
        for match in re.finditer(pattern, text, flags=re.DOTALL):
            try:
                call = _call_of(json.loads(match.group(1)))
            except ValueError:
                return None
            if call is None:
                return None
            calls.append(call)
        rest = re.sub(pattern, "", text, flags=re.DOTALL)
        return calls if calls and not rest.strip() else None

    def _written_calls(self, text: str) -> list[Call] | None:
        """qwen_xml / glm_xml: each start … end a call; deepseek: one block of calls."""
        assert self.end is not None
        pattern = re.escape(self.start) + r"(.*?)(?:" + re.escape(self.end) + r"|\Z)"
        calls: list[Call] = []
        for match in re.finditer(pattern, text, flags=re.DOTALL):
            found = self._one(match.group(1)) if self.body != "deepseek" else self._deepseek(match.group(1))
            if not found:
                return None
            calls += found
        rest = re.sub(pattern, "", text, flags=re.DOTALL)
        return calls if calls and not rest.strip() else None

    def _one(self, inner: str) -> list[Call]:
        """One qwen_xml / glm_xml call's text between its tags → [the call], or [] if not one."""
        if self.body == "qwen_xml":
            function = _QWEN_FUNCTION.fullmatch(inner.rstrip())
            if function is None:
                return []
            name, rest, pairs = function.group(1).strip(), function.group(2), _QWEN_PARAMETER
        else:
            head = _GLM_NAME.match(inner)
            if head is None:
                return []
            name, rest, pairs = head.group(1), inner[head.end() :], _GLM_ARGUMENT
        schema = self.params.get(name, {}).get("properties", {})
        arguments: dict[str, Any] = {}
        at = 0
        for pair in pairs.finditer(rest):
            if rest[at : pair.start()].strip():
                return []
            key = pair.group(1).strip()
            arguments[key] = _typed(pair.group(2), schema.get(key))
            at = pair.end()
        if not name or rest[at:].strip():
            return []
        return [(name, json.dumps(arguments, ensure_ascii=False))]

    def _deepseek(self, block: str) -> list[Call]:
        calls: list[Call] = []
        at = 0
        for match in _DEEPSEEK_CALL.finditer(block):
            if block[at : match.start()].strip():
                return []
            name, arguments = (match.group(1), match.group(2)) if match.group(1) else match.group(3, 4)
            try:
                call = _call_of({"name": name.strip(), "arguments": json.loads(arguments)})
            except ValueError:
                return []
            if call is None:
                return []
            calls.append(call)
            at = match.end()
        return calls if not block[at:].strip() else []

    def grammar(self, functions: Sequence[tuple[str, dict[str, Any] | None]], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) whose sentences are only calls of `functions`
        ((name, parameters JSON schema) pairs), one or (parallel) several, arguments valid."""
        one = _no_whitespace({"anyOf": [_call_schema(name, params) for name, params in functions]})
        if self.body not in ("json", "json_list"):
            raise ValueError(f"{self.name} calls are forced as {self.forced().name}'s (ToolFormat.forced)")
        if self.end is None:
            array: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
            array["maxItems"] = MAX_FORCED_CALLS if parallel else 1
            calls = json.dumps(_no_whitespace(array))
            return f"start: {json.dumps(self.start + self.gap)} calls\ncalls: %json {calls}"
        call = f"call: {json.dumps(self.start + chr(10))} body {json.dumps(chr(10) + self.end)}"
        start = f'start: call ("\\n" call){{0,{MAX_FORCED_CALLS - 1}}}' if parallel else "start: call"
        return f"{start}\n{call}\nbody: %json {json.dumps(one)}"


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None, "json_list")
GRANITE = ToolFormat("granite", "<|tool_call|>", None, "json_list", gap="")
QWEN3_CODER = ToolFormat("qwen3_coder", "<tool_call>", "</tool_call>", "qwen_xml")
GLM45 = ToolFormat(
    "glm45",
    "<tool_call>",
    "</tool_call>",
    "glm_xml",
    markers=("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
)
DEEPSEEK_V3 = ToolFormat(
    "deepseek_v3",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "deepseek",
    markers=("<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"),
)

# gpt-oss's harmony format: the whole answer is channels of special tokens (api/openai/harmony.py)
HARMONY = ToolFormat("harmony", "<|channel|>", "<|call|>", "harmony", markers=("<|message|>", "<|end|>"))

# What in a chat template tells its format, the most particular first (hermes where none is found)
_TEMPLATE_MARKERS = (
    ("<|channel|>", HARMONY),
    ("[TOOL_CALLS]", MISTRAL),
    ("<|tool_call|>", GRANITE),
    ("tool▁calls▁begin", DEEPSEEK_V3),
    ("<arg_key>", GLM45),
    ("<function=", QWEN3_CODER),
)


def format_for(template: str | None) -> ToolFormat:
    """The tool-call format a chat template defines (hermes where it defines none)."""
    for marker, fmt in _TEMPLATE_MARKERS:
        if template is not None and marker in template:
            return fmt
    return HERMES


def template_renders_tools(template: str | None) -> bool:
    """Does the template show the model its tools (else LocalMoE adds them to the system turn)?"""
    return template is not None and "tools" in template


def hermes_system(tools: Sequence[dict[str, Any]], system: str | None) -> str:
    """The system turn that shows hermes-format tools, as Qwen2.5's template writes it."""
    listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        (system or "You are a helpful assistant.")
        + "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
        + listed
        + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def hermes_call_text(name: str, arguments: dict[str, Any]) -> str:
    """An earlier call as the assistant wrote it (to render a conversation's past calls)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


@dataclass
class ToolStream:
    """A streamed answer split as it arrives: `feed` returns the content that is certainly not
    part of a call and the calls completed so far; `flush` at the end returns the rest."""

    format: ToolFormat
    limit: int | None = None  # calls given out at most (1 without parallel calls); later ones dropped
    _held: str = ""  # text not yet given out: a possible start of a call, or a call in progress
    _in_call: bool = False
    calls: list[Call] = field(default_factory=list)  # every call given out

    def feed(self, text: str) -> tuple[str, list[Call]]:
        self._held += text
        content, new = "", []
        start, end = self.format.start, self.format.end
        while True:
            if not self._in_call:
                at = self._held.find(start)
                if at < 0:  # give out all but what could begin a call (and blanks before it)
                    keep = partial_suffix(self._held, start)
                    ready = self._held[: len(self._held) - keep]
                    cut = len(ready.rstrip())
                    content += self._held[:cut]
                    self._held = self._held[cut:]
                    break
                content += self._held[:at]
                self._held = self._held[at:]
                self._in_call = True
            close = self._held.find(end) if end is not None else -1
            if close < 0:  # a call in progress (mistral's run to the end of the answer)
                break
            piece = self._held[: close + len(end or "")]
            self._held = self._held[len(piece) :]
            self._in_call = False
            calls = self.format._calls(piece)
            if calls is None:
                content += piece  # not a valid call: it was text
            else:
                new += calls
        if (self.calls or new) and not content.strip():
            content = ""  # the blank between calls
        return content, self._give(new)

    def _give(self, calls: list[Call]) -> list[Call]:
        if self.limit is not None:
            calls = calls[: max(0, self.limit - len(self.calls))]
        self.calls += calls
        return calls

    def flush(self) -> tuple[str, list[Call]]:
        held, self._held = self._held, ""
        if self._in_call:
            calls = self.format._calls(held)
            if calls is not None:
                return "", self._give(calls)
        return held, []
