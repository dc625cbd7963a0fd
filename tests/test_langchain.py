"""LangChain's `ChatOpenAI` (langchain-openai) pointed at LocalMoE, as an agent framework uses it:
`bind_tools` with two tools and `with_structured_output` of a pydantic model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

langchain_openai = pytest.importorskip("langchain_openai")


class Ticket(BaseModel):
    """A support ticket, extracted."""

    title: str = Field(max_length=12)
    priority: Literal["low", "high"]
    component: Literal["api", "worker", "engine"]


# The tools forbid extra arguments (additionalProperties: false in their schemas): JSON Schema
# allows any other key otherwise, and the small model sampling at 0.7 can spend all its tokens
# writing one, which the forced-call grammar rightly lets through.
class GetWeather(BaseModel):
    """The weather in a city."""

    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=10)


class SearchDocs(BaseModel):
    """Search the documentation."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(max_length=16)
    limit: int = Field(ge=1, le=5)


@pytest.fixture
def chat(api_url: str, user_key: str, model_dir: Path) -> object:
    return langchain_openai.ChatOpenAI(
        base_url=f"{api_url}/v1",
        api_key=user_key,
        model=model_dir.name,
        max_tokens=300,
        temperature=0.7,
        seed=1,
    )


def test_bind_tools_with_two_tools(chat: object) -> None:
    for choice in ("any", "SearchDocs"):  # LangChain's "any" is OpenAI's "required"
        bound = chat.bind_tools([GetWeather, SearchDocs], tool_choice=choice)  # type: ignore[attr-defined]
        message = bound.invoke("Find the docs about retries.")
        assert message.tool_calls, message
        for call in message.tool_calls:
            model = {"GetWeather": GetWeather, "SearchDocs": SearchDocs}[call["name"]]
            model.model_validate(call["args"])  # LangChain parsed the arguments; they validate
            assert call["id"].startswith("call_")
        if choice == "SearchDocs":
            assert {c["name"] for c in message.tool_calls} == {"SearchDocs"}


def test_with_structured_output(chat: object) -> None:
    extract = chat.with_structured_output(Ticket)  # type: ignore[attr-defined]
    ticket = extract.invoke("The API returns 500 on every request since this morning.")
    assert isinstance(ticket, Ticket)
