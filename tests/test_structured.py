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


def test_templates_compile_a_key_missed_at_once_once() -> None:
    """Eight threads miss one key together (vLLM compiles on a thread pool, so a burst of one
    schema does): one compile, every thread its own copy; a failing compile fails every thread
    that waited on it, keeps nothing, and the next miss compiles again."""
    import threading
    import time
    from collections.abc import Callable

    from moe_core.structured import Templates

    templates: Templates[list[str]] = Templates(lambda t: list(t))
    calls: list[str] = []

    def compiler(key: str, fails: bool) -> Callable[[], list[str]]:
        def compile_() -> list[str]:
            calls.append(key)
            time.sleep(0.3)  # long enough that every thread misses while it runs
            if fails:
                raise RuntimeError("does not compile")
            return [key]

        return compile_

    def burst(key: str, fails: bool) -> list[object]:
        barrier = threading.Barrier(8)
        got: list[object] = []

        def miss() -> None:
            barrier.wait()
            try:
                got.append(templates.get(key, compiler(key, fails)))
            except RuntimeError as e:
                got.append(e)

        threads = [threading.Thread(target=miss) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    got = burst("schema", fails=False)
    assert calls == ["schema"] and (templates.compiles, templates.copies) == (1, 8)
    assert got == [["schema"]] * 8 and len({id(g) for g in got}) == 8  # copies, not the template

    got = burst("bad", fails=True)
    assert calls == ["schema", "bad"] and len(got) == 8
    assert all(isinstance(g, RuntimeError) for g in got) and len(templates) == 1
    assert templates.get("bad", compiler("bad", fails=False)) == ["bad"]  # compiled again
    assert calls == ["schema", "bad", "bad"] and templates.compiles == 2
