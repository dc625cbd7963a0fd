"""The SSE wire format written by hand (api/sse.py) says what the models would have said."""

from __future__ import annotations

import json

import pytest

from api import sse
from api.openai.protocol import ChatChunkChoice, ChatCompletionChunk, ChatDelta, Completion, CompletionChoice
from scheduler.jobs import JobStatus, Usage
from scheduler.stream import DoneEvent, TokenEvent

TEXTS = ["hello", ' "quoted" \\ back', "line\nbreak\ttab", "\x00\x1f ctrl", "é 日本 🙂", "</script>", ""]


def _completion(text: str) -> Completion:
    return Completion(
        id="cmpl-1", created=7, model="m", choices=[CompletionChoice(text=text, finish_reason=None)]
    )


def _chat(text: str) -> ChatCompletionChunk:
    choice = ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=None)
    return ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=[choice])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("make", [_completion, _chat])
def test_a_filled_template_is_the_models_own_json(make: object, text: str) -> None:
    for exclude in (None, {"usage"}):
        template = sse.Template(make(sse.MARK), exclude)  # type: ignore[operator]
        chunk = template.fill(text)
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n") == 2
        expected = make(text).model_dump(exclude=exclude)  # type: ignore[operator]
        assert json.loads(chunk[6:]) == expected


def test_a_template_needs_its_marker_once() -> None:
    with pytest.raises(ValueError):
        sse.Template(_completion("no marker"))


def test_job_events_carry_type_data_and_id() -> None:
    token = sse.job_event("17-3", TokenEvent(text='a "b"\n'))
    assert token == b'event: token\ndata: {"text":"a \\"b\\"\\n"}\nid: 17-3\n\n'
    done = DoneEvent(
        status=JobStatus.SUCCEEDED, finish_reason="length", usage=Usage(prompt_tokens=2, completion_tokens=5)
    )
    lines = sse.job_event("17-4", done).decode().split("\n")
    assert lines[0] == "event: done" and lines[2] == "id: 17-4" and lines[3:] == ["", ""]
    assert json.loads(lines[1].removeprefix("data: ")) == done.model_dump(mode="json", exclude={"type"})


def test_the_submit_answer_is_the_job_response() -> None:
    from api.protocol import JobResponse
    from scheduler.jobs import Job, JobSpec

    job = Job(spec=JobSpec(prompt="def f(x):\n", max_tokens=4, stop=["\n\n"]), owner="k1", cost=4.5)
    job.timings.queued_at = 1796259512.123456
    assert json.loads(JobResponse.json_of(job)) == JobResponse.of(job).model_dump(mode="json")
