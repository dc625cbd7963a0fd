"""The OpenAI protocol's request and response models, as LocalMoE serves them (vLLM's
`entrypoints/openai/protocol.py` is the model): model cards, completion and chat requests (what
they become as a JobSpec, what is refused with a 400), whole answers and streamed chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from api.openai.errors import OpenAIError, validation_error
from scheduler.jobs import MAX_SEQUENCES, JobSpec, Modality, Priority
from scheduler.stream import DoneEvent
from scheduler.structured import MAX_SPEC_CHARS, ResponseFormat, StructuredOutputs
from scheduler.webhooks import BatchWebhookSpec

# --- models ------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "localmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- requests ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with the usage before [DONE].")
    continuous_usage_stats: bool = Field(
        False, description="Extension, as vLLM: with include_usage, every chunk carries the usage so far."
    )


class SamplingRequest(BaseModel):
    """What both endpoints take. Unknown fields are refused (400), as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The served model's name (GET /v1/models); may be left out.")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Default 1.0, as OpenAI; 0 is greedy."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.0 (off).")
    n: int | None = Field(
        None,
        description=f"Choices to generate (1 to {MAX_SEQUENCES}), together in one job; the usage counts "
        "them all. With a seed, choice k samples with seed + k (as vLLM).",
    )
    stop: str | list[str] | None = Field(
        None, description="Up to 8 strings that end generation (not returned)."
    )
    seed: int | None = Field(None, description="Makes sampling reproducible (0 ≤ seed < 2**63).")
    stream: bool | None = Field(False, description="Server-sent chunks, ended by `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    presence_penalty: float | None = Field(None, description="-2 to 2: lowers tokens already generated.")
    frequency_penalty: float | None = Field(None, description="-2 to 2: lowers tokens by their count so far.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id → bias (-100 to 100).")
    # extensions, as in vLLM
    top_k: int | None = Field(
        None, ge=-1, description="Extension: sample among the k likeliest; 0 or -1 is off."
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Extension: sample among tokens at least this times as likely as the likeliest.",
    )
    ignore_eos: bool = Field(False, description="Extension: generate exactly max_tokens tokens.")
    repetition_penalty: float | None = Field(
        None, description="Extension: divides positive logits of tokens seen (prompt or output); 1 is off."
    )
    min_tokens: int | None = Field(
        None, description="Extension: no EOS or stop token id before this many tokens."
    )
    stop_token_ids: list[int] | None = Field(None, description="Extension: token ids that end generation.")
    skip_special_tokens: bool = Field(True, description="Extension: false outputs special tokens' text too.")
    include_stop_str_in_output: bool = Field(
        False, description="Extension: the stop string that ended generation ends the output."
    )
    priority: Priority | None = Field(
        None, description="Extension: high, normal, low or batch (capped per key)."
    )
    modality: Modality | None = Field(None, description="Extension: text, code or mixed; detected if absent.")
    response_format: ResponseFormat | None = Field(
        None,
        description="{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
        "{'name': ..., 'schema': {...}, 'strict': true}}: the output obeys it (constrained decoding).",
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="Extension, as vLLM: exactly one of json, json_object, regex, choice, grammar."
    )
    guided_json: dict[str, Any] | str | None = Field(
        None, description="Extension, vLLM's older name for structured_outputs.json."
    )
    guided_regex: str | None = Field(
        None, max_length=MAX_SPEC_CHARS, description="Extension, vLLM's older structured_outputs.regex."
    )
    guided_choice: list[str] | None = Field(
        None, description="Extension, vLLM's older name for structured_outputs.choice."
    )
    guided_grammar: str | None = Field(
        None, max_length=MAX_SPEC_CHARS, description="Extension, vLLM's older structured_outputs.grammar."
    )
    guided_decoding_backend: str | None = Field(
        None, description="Extension, accepted: the engine's own backend enforces the constraint."
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Extension, as vLLM: each prompt token's log-probability given the tokens before "
        "it, with this many likeliest alternatives' (the answer's `prompt_logprobs`); not streamed.",
    )

    def refuse_unsupported(self) -> None:
        """400 for options that would change the result and that this server cannot honour."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed when stream is true", "stream_options")
        if self.stream and self.prompt_logprobs is not None:  # as vLLM
            raise OpenAIError(400, "prompt_logprobs are not available when stream is true", "prompt_logprobs")

    def job_spec(
        self,
        prompt: str,
        max_tokens: int,
        extra_stop: Sequence[str] = (),
        structure: StructuredOutputs | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> JobSpec:
        """The job this request asks for; `structure`: a constraint of the server's own (forced
        tool calls) in place of the request's; `prompt_token_ids`: a prompt sent as token ids
        (`prompt` their text)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stop += [s for s in extra_stop if s not in stop and len(stop) < 8]
        try:
            return JobSpec(
                prompt=prompt,
                prompt_token_ids=prompt_token_ids,
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=max(self.top_k or 0, 0),
                min_p=self.min_p or 0.0,
                seed=self.seed,
                n=1 if self.n is None else self.n,
                stop=stop,
                modality=self.modality,
                ignore_eos=self.ignore_eos,
                priority=self.priority or Priority.NORMAL,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=self.logit_bias or {},
                min_tokens=self.min_tokens or 0,
                stop_token_ids=self.stop_token_ids or [],
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=self.requested_logprobs,
                prompt_logprobs=self.requested_prompt_logprobs,
                response_format=self.response_format,
                structured_outputs=structure or self.requested_structure,
            )
        except ValidationError as e:
            raise validation_error(e.errors(), self.renames()) from e

    def renames(self) -> dict[str, str]:
        return {}

    @property
    def requested_structure(self) -> StructuredOutputs | None:
        """structured_outputs, or what vLLM's older guided_* fields ask (not both)."""
        guided = {
            name: value
            for name, value in (
                ("json", self.guided_json),
                ("regex", self.guided_regex),
                ("choice", self.guided_choice),
                ("grammar", self.guided_grammar),
            )
            if value is not None
        }
        if not guided:
            return self.structured_outputs
        if self.structured_outputs is not None or len(guided) > 1:
            given = [f"guided_{n}" for n in guided] + ["structured_outputs"] * bool(self.structured_outputs)
            raise OpenAIError(400, f"give one structured-output constraint, not {', '.join(given)}", given[0])
        try:
            return StructuredOutputs.model_validate(guided)
        except ValidationError as e:
            raise validation_error(e.errors(), {"json": "guided_json", "choice": "guided_choice"}) from e

    @property
    def requested_logprobs(self) -> int | None:
        """Alternatives per token to report (None: no logprobs)."""
        return None

    @property
    def requested_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token to report (None: the prompt is not scored)."""
        return self.prompt_logprobs

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk (vLLM's `continuous_usage_stats`, which it honours only with
        include_usage)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="The text to continue: a string or token ids (OpenAI's token array), or a list of "
        "either (each its own job; answered whole, not streamed)."
    )
    max_tokens: int | None = Field(16, description="Most tokens to generate; default 16, as OpenAI.")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Each token's log-probability and this many likeliest alternatives'."
    )
    echo: bool | None = Field(
        False, description="Lead the answer with the prompt (streamed: its first chunk)."
    )
    best_of: int | None = Field(None, description="Not supported: only 1.")
    suffix: str | None = Field(None, description="Not supported.")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.prompt == [] or [] in self.prompts:
            raise OpenAIError(400, "the prompt is empty", "prompt")
        if self.best_of not in (None, 1):
            raise OpenAIError(400, "best_of is not supported: only 1", "best_of")
        if self.suffix is not None:
            raise OpenAIError(400, "suffix (insertion) is not supported", "suffix")

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts it holds, each a text or token ids (OpenAI's list of either)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt or isinstance(prompt[0], int):
            return [[t for t in prompt if isinstance(t, int)]]
        return [p for p in prompt if not isinstance(p, int)]

    @property
    def text(self) -> str | None:
        """The (first) prompt's text (None: it was sent as token ids)."""
        one = self.prompts[0]
        return one if isinstance(one, str) else None

    @property
    def token_ids(self) -> list[int] | None:
        """The (first) prompt's token ids, when sent as such."""
        one = self.prompts[0]
        return one if isinstance(one, list) else None

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def requested_prompt_logprobs(self) -> int | None:
        """vLLM's: echo with logprobs reports the prompt's tokens too (legacy OpenAI's answer)."""
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs
        return self.prompt_logprobs


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # an image part's fields: refused below, by its type

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported; only 'text'")
        if self.text is None:
            raise ValueError("a text part needs `text`")
        return self


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text (an object).")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's earlier calls.")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers.")
    reasoning: str | None = Field(
        None, description="Extension, as vLLM: an assistant's earlier reasoning, for the chat template."
    )
    reasoning_content: str | None = Field(None, description="Extension: vLLM's older name for reasoning.")

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the call it answers)")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments (an object).")
    strict: bool | None = Field(None, description="Accepted: required / named calls always obey parameters.")


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, description="Most tokens to generate.")
    max_tokens: int | None = Field(None, description="Deprecated twin of max_completion_tokens.")
    logprobs: bool | None = Field(False, description="Each output token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: this many likeliest alternatives per token."
    )
    tools: list[Tool] | None = Field(None, max_length=128, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="auto (the default with tools): the model decides; none: no calls; required: "
        "one or more calls; a named function: that one. Required and named calls are decoded "
        "under a grammar: their arguments always validate against the function's parameters.",
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (default: several).")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None,
        description="For a reasoning model's chat template (gpt-oss's reads it); as vLLM, it also sets "
        "the template's `enable_thinking` (false for none) unless chat_template_kwargs does.",
    )
    include_reasoning: bool = Field(
        True,
        description="Extension, as vLLM: a reasoning model's thinking (think tags, gpt-oss's analysis "
        "channel) comes back as `reasoning`, apart from the content; false leaves it out.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="Extension, as vLLM: more variables for the model's chat template, such as "
        '`{"enable_thinking": false}` for Qwen3.',
    )
    add_generation_prompt: bool = Field(
        True, description="Extension, as vLLM: end the prompt with the assistant's turn opened."
    )
    continue_final_message: bool = Field(
        False,
        description="Extension, as vLLM: leave the last message open (an assistant's start, say) and "
        "have the model continue it; needs add_generation_prompt false. The answer is the continuation.",
    )
    echo: bool = Field(
        False,
        description="Extension, as vLLM: lead the answer with the last message's content when that "
        "message is the assistant's.",
    )

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        refused = template_options_refused(
            self.chat_template_kwargs, self.add_generation_prompt, self.continue_final_message
        )
        if refused is not None:
            raise OpenAIError(400, *refused)
        if self.continue_final_message and self.messages[-1].tool_calls:
            raise OpenAIError(400, "a message with tool_calls cannot be continued", "continue_final_message")
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise OpenAIError(400, "tool_choice needs tools to choose from", "tool_choice")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise OpenAIError(400, "tools have the same function name twice", "tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise OpenAIError(
                400,
                f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                "tool_choice",
            )
        if self.forced_tools and (self.response_format or self.requested_structure):
            raise OpenAIError(
                400,
                "tool_choice required or named constrains the answer already: no response_format too",
                "tool_choice",
            )

    def renames(self) -> dict[str, str]:
        return {
            "prompt": "messages",
            "max_tokens": "max_completion_tokens" if self.max_completion_tokens else "max_tokens",
        }

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_prompt_logprobs(self) -> int | None:
        """vLLM's: echo with logprobs scores the rendered prompt too (the answer's prompt_logprobs)."""
        if self.prompt_logprobs is None and self.echo and not self.stream:
            return self.requested_logprobs
        return self.prompt_logprobs

    @property
    def offered_tools(self) -> list[Tool]:
        """The tools the model is shown and may call (none with tool_choice "none")."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    @property
    def forced_tools(self) -> list[Tool]:
        """With tool_choice required or a named function: the functions the answer must call."""
        if self.tool_choice == "required":
            return list(self.tools or [])
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == self.tool_choice.function.name]
        return []

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def template_variables(self) -> dict[str, Any]:
        """What the chat template gets beside the messages and tools."""
        effort: dict[str, Any] = {}
        if self.reasoning_effort is not None:
            effort = {
                "reasoning_effort": self.reasoning_effort,
                "enable_thinking": self.reasoning_effort != "none",
            }
        return {**effort, **(self.chat_template_kwargs or {})}


def template_options_refused(
    variables: dict[str, Any] | None, add_generation_prompt: bool, continue_final: bool
) -> tuple[str, str] | None:
    """Why a chat's template options cannot be used, and the field to name (None: they can)."""
    if continue_final and add_generation_prompt:
        why = "continue_final_message continues the last message: add_generation_prompt must be false"
        return why, "continue_final_message"
    if taken := sorted(TEMPLATE_ARGUMENTS.intersection(variables or {})):
        return (
            f"chat_template_kwargs may not set {', '.join(taken)}: the request's own fields do",
            "chat_template_kwargs",
        )
    return None


# apply_chat_template's own arguments: a request sets them through its fields, not the template's
TEMPLATE_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


# --- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens the engine's prefix cache held (not prefilled).")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, description="With the final usage: what of the prompt the engine found cached."
    )

    @classmethod
    def of(cls, done: DoneEvent) -> UsageInfo:
        usage = cls.counted(done.usage.prompt_tokens, done.usage.completion_tokens)
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=done.usage.cached_tokens)
        return usage

    @classmethod
    def counted(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    @classmethod
    def total(cls, parts: list[UsageInfo]) -> UsageInfo:
        """Several jobs' usage together (a list of prompts)."""
        usage = cls.counted(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts))
        cached = [u.prompt_tokens_details.cached_tokens for u in parts if u.prompt_tokens_details]
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=sum(cached)) if cached else None
        return usage


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, log-probability, likeliest alternatives, and
    where its text starts in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptTokenLogprob(BaseModel):
    """vLLM's Logprob: one token's log-probability at a prompt position, and its rank there."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt token (vLLM's prompt_logprobs): None for the first, then {token id: its entry} for the
# prompt's token and the likeliest alternatives there.
PromptLogprobs = list[dict[int, PromptTokenLogprob] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = Field(description="stop, length, or abort (cancelled).")
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = Field(
        None, exclude_if=lambda v: v is None, description="With prompt_logprobs (or echo and logprobs)."
    )


class Completion(BaseModel):
    id: str = Field(description="cmpl-<job id>: the job is at /v1/jobs/<job id>.")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning: str | None = Field(None, description="Extension, as vLLM: a reasoning model's thinking.")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<job id>: the job is at /v1/jobs/<job id>.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="With prompt_logprobs (or echo and logprobs): the rendered prompt's tokens, as vLLM.",
    )


class ToolCallDelta(BaseModel):
    """A streamed call: given whole, in one delta, once the model has finished writing it."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _without_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if self.tool_calls is None:
            out.pop("tool_calls", None)  # as OpenAI: only deltas that carry calls name them
        if self.reasoning is None:
            out.pop("reasoning", None)  # and only a reasoning model's reasoning deltas this one
        return out


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# --- files (POST /v1/files) ----------------------------------------------------------------------

FilePurpose = Literal["batch", "batch_output"]  # uploads are `batch`; a batch's results `batch_output`


class Identified(BaseModel):
    """An object a cursor-paginated list pages by (`after=<its id>`)."""

    id: str


Item = TypeVar("Item", bound=Identified)


class CursorPage(BaseModel, Generic[Item]):
    """OpenAI's cursor-paginated list: one page of `data` in order, its first and last ids (the
    next page: `after=last_id`), whether more follow."""

    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[Item], has_more: bool) -> Self:
        ends = (data[0].id, data[-1].id) if data else (None, None)
        return cls(data=data, first_id=ends[0], last_id=ends[1], has_more=has_more)


class FileObject(Identified):
    """OpenAI's File object."""

    id: str = Field(description='"file-" and 32 hex digits.')
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds.")
    expires_at: int = Field(description="Unix seconds; then the file and its bytes are gone (404).")
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = Field(
        "processed", description="Always processed: a file is checked in full before it is stored."
    )
    status_details: str | None = None


class FileList(CursorPage[FileObject]):
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- batches (POST /v1/batches) ------------------------------------------------------------------

Endpoint = Literal["/v1/chat/completions", "/v1/completions"]  # what a batch's lines may call


class BatchStatus(StrEnum):
    """validating → in_progress → finalizing → completed; validating → failed (the input is not a
    batch for `endpoint`); in_progress → expired (its window passed); validating | in_progress →
    cancelling → cancelled. The four ends are terminal."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="A file uploaded with purpose `batch`.")
    endpoint: Endpoint = Field(description="Every line's `url` must be this.")
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Up to 16 pairs, kept as given.")
    webhook: BatchWebhookSpec | None = Field(
        None,
        description="LocalMoE's extension (the openai client: `extra_body`): signed callbacks for the "
        "batch's end (batch.completed, batch.failed, batch.expired, batch.cancelled), the Batch "
        "object as `data`; the URL must be an endpoint registered with POST /v1/webhooks.",
    )

    @model_validator(mode="after")
    def _metadata(self) -> BatchCreate:
        for k, v in (self.metadata or {}).items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return self


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0  # answered 200
    failed: int = 0  # answered otherwise, or never run (cancelled, expired)


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class Batch(Identified):
    """OpenAI's Batch object."""

    id: str = Field(description='"batch_" and 32 hex digits.')
    object: Literal["batch"] = "batch"
    endpoint: Endpoint
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: Literal["24h"] = "24h"
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    metadata: dict[str, str] | None = None


class BatchList(CursorPage[Batch]):
    pass
