"""What a structured-output request means, before any engine: the wire models' one constraint
(scheduler/structured.py) and whether it compiles (moe_core/structured.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from moe_core.structured import check, grammar_for
from scheduler.jobs import JobSpec
from scheduler.structured import ANY_OBJECT, ResponseFormat, StructuredOutputs, constraint_of

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_response_format_constraints() -> None:
    assert ResponseFormat(type="text").constraint() is None
    assert ResponseFormat(type="json_object").constraint() == ("json", ANY_OBJECT)
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    )
    assert fmt.constraint() == ("json", json.dumps(SCHEMA))
    # the wire names survive a round trip through the job record
    assert fmt.model_dump(mode="json")["json_schema"]["schema"] == SCHEMA
    with pytest.raises(ValidationError, match="needs `json_schema`"):
        ResponseFormat(type="json_schema")
    with pytest.raises(ValidationError):
        ResponseFormat.model_validate({"type": "xml"})


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ({"json": SCHEMA}, ("json", json.dumps(SCHEMA))),
        ({"json": json.dumps(SCHEMA)}, ("json", json.dumps(SCHEMA))),
        ({"json_object": True}, ("json", ANY_OBJECT)),
        ({"regex": "[a-z]+"}, ("regex", "[a-z]+")),
        ({"choice": ["a", "b c"]}, ("choice", '["a", "b c"]')),
        ({"grammar": 'root ::= "x"'}, ("grammar", 'root ::= "x"')),
    ],
)
def test_structured_outputs_constraints(given: dict[str, object], want: tuple[str, str]) -> None:
    outputs = StructuredOutputs.model_validate(given)
    assert outputs.constraint() == want
    assert StructuredOutputs.model_validate(outputs.model_dump(mode="json")).constraint() == want


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
        ({"json": "[1, 2]"}, "must be a JSON schema"),
        ({"json": "{nope"}, "is not JSON"),
        ({"choice": []}, "at least 1 item"),
        ({"structural_tag": "{}"}, "Extra inputs"),
    ],
)
def test_structured_outputs_refusals(given: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        StructuredOutputs.model_validate(given)


def test_a_job_takes_one_constraint() -> None:
    fmt = ResponseFormat(type="json_object")
    outputs = StructuredOutputs(regex="x")
    assert JobSpec(prompt="p", response_format=fmt).constraint == ("json", ANY_OBJECT)
    assert JobSpec(
        prompt="p", response_format=ResponseFormat(type="text"), structured_outputs=outputs
    ).constraint == (
        "regex",
        "x",
    )
    assert JobSpec(prompt="p").constraint is None
    with pytest.raises(ValidationError, match="not both"):
        JobSpec(prompt="p", response_format=fmt, structured_outputs=outputs)
    assert constraint_of(None, None) is None


@pytest.mark.parametrize(
    ("kind", "spec", "needle"),
    [
        ("json", json.dumps(SCHEMA), None),
        ("json", '{"type": "int"}', "int"),
        ("json", "[]", "a JSON schema is an object"),
        ("regex", "[0-9]{3}", None),
        ("regex", "[0-9", "unclosed"),
        ("choice", '["a", "b"]', None),
        ("grammar", 'root ::= "a" | "b"', None),  # GBNF
        ("grammar", 'start: "a" NUM\nNUM: /[0-9]+/', None),  # Lark
        ("grammar", "root ::= ( ", "GBNF"),
        ("grammar", "start: missing_rule", "missing_rule"),
        ("xml", "<a/>", "unknown structured-output kind"),
    ],
)
def test_check_names_what_does_not_compile(kind: str, spec: str, needle: str | None) -> None:
    error = check(kind, spec)
    if needle is None:
        assert error is None
        assert grammar_for(kind, spec)
    else:
        assert error is not None and needle in error, error
