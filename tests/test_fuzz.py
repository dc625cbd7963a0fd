"""Hostile input, the CI form of bench/fuzz_api.py: schemathesis over every operation of the
OpenAPI schema (fewer cases), its stateful scenarios, and the hand-made hostile requests. Any
5xx, undocumented status or content type, or response outside its schema fails."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import app
from bench.fuzz_api import CALLS, HOSTILE, Hostile
from tests.conftest import Stack, bearer, private_stack

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 30
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def fuzz_stack(service_env: dict[str, str]) -> Iterator[Stack]:
    """A stack of its own: a generated job that passes validation asks for at most 8 tokens, and
    the generated keys, webhooks and config changes stay out of the session's database."""
    limits = {"LOCALMOE_LIMITS__MAX_TOKENS": "8", "LOCALMOE_METRICS__WORKER_PORT": "0"}
    with private_stack(service_env, worker=True, **limits) as stack:
        yield stack


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_stack: Stack) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_stack.api}/openapi.json")


OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(app.openapi()).get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[o.label for o in OPERATIONS])
def test_every_operation(operation: Any, fuzz_stack: Stack) -> None:
    """Valid and invalid data (schemathesis' positive and negative modes) for one operation."""
    auth = bearer(fuzz_stack.admin_key)
    modes = [GenerationMode.POSITIVE]
    if operation.path_parameters or operation.query or operation.body:  # something to make invalid
        modes.append(GenerationMode.NEGATIVE)

    @FUZZ
    @given(case=st.one_of(*(operation.as_strategy(m) for m in modes)))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzz_stack.api, headers=auth, checks=CHECKS, timeout=60)

    fuzz()


def test_stateful_scenarios(fuzz_schema: Any, fuzz_stack: Stack) -> None:
    """Sequences along the links schemathesis infers (POST /v1/jobs → GET/DELETE /v1/jobs/{id}...)."""
    auth = bearer(fuzz_stack.admin_key)

    class Scenarios(fuzz_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": auth, "timeout": 60}

        def validate_response(self, response: Any, case: schemathesis.Case, **_: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    before = sum(CALLS.values())
    Scenarios.run(
        settings=settings(
            max_examples=15, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck)
        )
    )
    assert sum(CALLS.values()) > before  # the hook saw the calls: config changes were rolled back


@pytest.mark.parametrize("hostile", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_input_is_a_4xx(hostile: Hostile, fuzz_stack: Stack) -> None:
    got = hostile.send(fuzz_stack.api, bearer(fuzz_stack.admin_key))
    assert got in hostile.expect, (hostile.name, got)
    with fuzz_stack.http() as http:
        assert http.get("/readyz").status_code == 200  # still up, worker included


def test_made_up_framing_headers_are_left_to_the_http_client(fuzz_stack: Stack) -> None:
    """A negative case's `Content-Length: at` would be refused by uvicorn's parser (400, text/plain)
    before the API saw it: bench.fuzz_api's before_call hook drops such headers, the rest go."""
    operation = next(o for o in OPERATIONS if o.label == "DELETE /v1/keys/{key_id}")
    headers = {"Content-Length": "at", "X-Other": "1"}
    case = operation.Case(path_parameters={"key_id": "0123456789ab"}, headers=headers)
    response = case.call(base_url=fuzz_stack.api, headers=bearer(fuzz_stack.admin_key), timeout=60)
    assert response.status_code == 404, response.text
    assert case.headers == {"X-Other": "1"}
