"""Structured outputs through the whole service (API → Redis → Celery worker → torch engine): OpenAI's
`response_format` (the official client's `parse` with a pydantic model), vLLM's
`structured_outputs` and older `guided_*` fields, the job API's own, and the 400 / 422 a spec
that cannot be used gets at intake."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import wait_done
from tests.parity import PERSON_SCHEMA
from tests.test_openai import CONVERSATION, job_id


class City(BaseModel):
    name: str = Field(max_length=8)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    """Nested object, enum, bounded array and strings: the shapes an extraction pipeline asks."""

    name: str = Field(max_length=10)
    role: Literal["admin", "user", "guest"]
    age: int = Field(ge=0, le=120)
    nicknames: list[Annotated[str, Field(max_length=5)]] = Field(max_length=2)
    city: City
    active: bool


def test_parse_with_a_pydantic_model(
    openai_client: openai.OpenAI, http: httpx.Client, model_dir: Path
) -> None:
    """`chat.completions.parse` sends the model's strict JSON schema; the answer parses into it,
    greedy and sampled, and the job behind it records the response_format."""
    for temperature in (0.0, 1.0):
        done = openai_client.chat.completions.parse(
            model=model_dir.name,
            messages=CONVERSATION,
            response_format=Person,
            max_completion_tokens=200,
            temperature=temperature,
            seed=7,
        )
        [choice] = done.choices
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person), choice.message.content
        job = http.get(f"/v1/jobs/{job_id(done.id)}").json()
        sent = job["spec"]["response_format"]
        assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Person"
        assert sent["json_schema"]["strict"] is True
        jsonschema.validate(json.loads(job["output"]), sent["json_schema"]["schema"])


def test_streamed_json_schema_concatenates_to_valid_json(
    openai_client: openai.OpenAI, model_dir: Path
) -> None:
    schema_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    stream = openai_client.chat.completions.create(
        model=model_dir.name,
        messages=CONVERSATION,
        response_format=schema_format,
        max_completion_tokens=200,
        stream=True,
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and len([p for p in parts if p]) > 3  # streamed token by token
    jsonschema.validate(json.loads("".join(parts)), PERSON_SCHEMA)


def test_json_object_constrains_the_start(
    openai_client: openai.OpenAI, http: httpx.Client, model_dir: Path
) -> None:
    """Any JSON object: with a random model and a few tokens the object is unfinished, but it is
    one (a plain answer of this prompt does not start with '{')."""
    plain = openai_client.completions.create(model=model_dir.name, prompt="x", max_tokens=6, temperature=0)
    assert not plain.choices[0].text.startswith("{")
    done = openai_client.completions.create(
        model=model_dir.name,
        prompt="x",
        max_tokens=6,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert done.choices[0].text.startswith("{")
    assert http.get(f"/v1/jobs/{job_id(done.id)}").json()["spec"]["response_format"] == {
        "type": "json_object",
        "json_schema": None,
    }


@pytest.mark.parametrize(
    ("extra", "obeys"),
    [
        (
            {"structured_outputs": {"choice": ["red", "green", "blue"]}},
            lambda t: t in ("red", "green", "blue"),
        ),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        (
            {"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{4}"}},
            lambda t: re.fullmatch(r"[A-Z]{2}-[0-9]{4}", t),
        ),
        ({"guided_regex": r"0x[0-9a-f]{1,8}"}, lambda t: re.fullmatch(r"0x[0-9a-f]{1,8}", t)),
        (
            {"guided_json": {"type": "array", "items": {"enum": [1, 2, 30]}, "maxItems": 3}},
            lambda t: set(json.loads(t)) <= {1, 2, 30} and len(json.loads(t)) <= 3,
        ),
        (
            {"guided_grammar": 'root ::= "SELECT " [a-z]{1,6} " FROM " [a-z]{1,6}'},
            lambda t: re.fullmatch(r"SELECT [a-z]{1,6} FROM [a-z]{1,6}", t),
        ),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_vllm_structured_outputs_and_guided_fields(
    openai_client: openai.OpenAI, model_dir: Path, extra: dict[str, Any], obeys: Any
) -> None:
    done = openai_client.completions.create(
        model=model_dir.name, prompt="The answer:", max_tokens=64, temperature=1.0, seed=3, extra_body=extra
    )
    [choice] = done.choices
    assert choice.finish_reason == "stop" and obeys(choice.text), choice.text


def test_the_job_api_takes_a_schema(http: httpx.Client) -> None:
    body = {
        "prompt": "Describe a user as JSON:",
        "max_tokens": 200,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
        },
    }
    job = wait_done(http, http.post("/v1/jobs", json=body).json()["id"])
    assert job["status"] == "succeeded" and job["finish_reason"] == "stop"
    jsonschema.validate(json.loads(job["output"]), PERSON_SCHEMA)
    assert job["spec"]["response_format"]["json_schema"]["schema"] == PERSON_SCHEMA
    vllm_style = {"prompt": "Pick:", "max_tokens": 16, "structured_outputs": {"choice": ["a", "b"]}}
    job = wait_done(http, http.post("/v1/jobs", json=vllm_style).json()["id"])
    assert job["output"] in ("a", "b") and job["spec"]["structured_outputs"]["choice"] == ["a", "b"]


BAD_SPECS: list[tuple[dict[str, Any], str, str]] = [
    ({"guided_regex": "[0-9"}, "structured_outputs", "cannot be used"),
    ({"structured_outputs": {"grammar": "root ::= ( "}}, "structured_outputs", "cannot be used"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "strnig"}},
            }
        },
        "response_format",
        "cannot be used",
    ),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "one structured-output constraint"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs `json_schema`"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "", "not both"),
]


@pytest.mark.parametrize(("extra", "param", "needle"), BAD_SPECS, ids=lambda v: str(v)[:40])
def test_a_spec_that_cannot_be_used_is_a_400(
    openai_client: openai.OpenAI, model_dir: Path, extra: dict[str, Any], param: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.completions.create(model=model_dir.name, prompt="x", max_tokens=4, extra_body=extra)
    error = e.value.body
    assert isinstance(error, dict) and needle in error["message"], error
    assert (error["param"] or "").startswith(param), error


def test_the_job_api_refuses_a_bad_spec_with_a_422(http: httpx.Client) -> None:
    r = http.post("/v1/jobs", json={"prompt": "x", "structured_outputs": {"regex": "(unclosed"}})
    assert r.status_code == 422
    [detail] = r.json()["detail"]
    assert detail["loc"] == ["body", "structured_outputs"] and "cannot be used" in detail["msg"]
