"""Structured output as a client asks for it: OpenAI's `response_format` and vLLM's
`structured_outputs` (its older `guided_*` fields map onto the latter, api/openai/protocol.py).

Both come down to one constraint, (kind, spec) as moe_core/engine.py's STRUCTURED_KINDS define it,
which the engine enforces token by token (constrained decoding, not retry-and-hope). Whether a
spec compiles is checked at intake (api/jobs.py), so a bad schema, regex or grammar is a 4xx.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SPEC_CHARS = 65_536  # a schema, regex or grammar; choices in all
ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object

Constraint = tuple[str, str]  # (kind, spec): SamplingParams.structured


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    name: str = Field("response", max_length=64, description="The schema's name (not used to decode).")
    description: str | None = Field(None, description="Accepted; not used to decode.")
    json_schema: dict[str, Any] = Field(alias="schema", description="The JSON schema the output obeys.")
    strict: bool | None = Field(
        None, description="Accepted: the output always obeys the schema (constrained decoding)."
    )


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format type 'json_schema' needs `json_schema` (and only it does)")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return "json", ANY_OBJECT
        if self.json_schema is not None:
            return "json", json.dumps(self.json_schema.json_schema)
        return None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of json, json_object, regex, choice, grammar."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    json_: dict[str, Any] | str | None = Field(
        None, alias="json", description="A JSON schema (an object, or its JSON text)."
    )
    json_object: bool | None = Field(None, description="true: any JSON object.")
    regex: str | None = Field(None, max_length=MAX_SPEC_CHARS, description="The whole output matches it.")
    choice: list[str] | None = Field(
        None, min_length=1, max_length=1024, description="The output is one of these."
    )
    grammar: str | None = Field(
        None, max_length=MAX_SPEC_CHARS, description="A context-free grammar: Lark, or GBNF / EBNF (`::=`)."
    )
    disable_any_whitespace: bool = Field(
        False, description="Accepted: JSON output is always compact (no whitespace beyond ', ' and ': ')."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            name
            for name, value in (
                ("json", self.json_),
                ("json_object", self.json_object or None),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, grammar"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if isinstance(self.json_, str):
            try:
                parsed = json.loads(self.json_)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not JSON: {e}") from e
            if not isinstance(parsed, dict):
                raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        return self

    def constraint(self) -> Constraint:
        if self.json_object:
            return "json", ANY_OBJECT
        if self.json_ is not None:
            return "json", self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        assert self.grammar is not None
        return "grammar", self.grammar


def constraint_of(
    response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None
) -> Constraint | None:
    """The one constraint a request asks for (at most one of the two may constrain)."""
    by_format = response_format.constraint() if response_format is not None else None
    by_outputs = structured_outputs.constraint() if structured_outputs is not None else None
    if by_format is not None and by_outputs is not None:
        raise ValueError("give response_format or structured_outputs, not both")
    found = by_format or by_outputs
    if found is not None and len(found[1]) > MAX_SPEC_CHARS:
        raise ValueError(f"the structured-output spec is longer than {MAX_SPEC_CHARS} characters")
    return found
