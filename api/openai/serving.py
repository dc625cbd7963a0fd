"""What the OpenAI endpoints share (vLLM's serving_engine): the served model's name, intake
through the job API, the Idempotency-Key header, the streamed answer's schema, continuous usage.
The endpoints: models.py, completions.py, chat.py (and tokenize.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import Header
from starlette.exceptions import HTTPException

from api.auth import ApiKey
from api.deps import Services
from api.jobs import accept
from api.openai.errors import OpenAIError, validation_error
from api.openai.protocol import ModelCard, SamplingRequest
from scheduler.jobs import Job, JobSpec


def served_model(services: Services) -> str:
    """The served model's name: its directory's."""
    return services.settings.resolved_model_dir.name


def model_card(services: Services) -> ModelCard:
    model_dir = services.settings.resolved_model_dir
    created = int((model_dir / "config.json").stat().st_mtime) if (model_dir / "config.json").exists() else 0
    return ModelCard(id=model_dir.name, created=created)


def check_model(requested: str | None, services: Services) -> str:
    served = served_model(services)
    if requested is not None and requested != served:
        raise OpenAIError(
            404,
            f"The model `{requested}` does not exist; this server serves `{served}`.",
            "model",
            "model_not_found",
        )
    return served


async def accept_request(
    body: SamplingRequest, spec: JobSpec, caller: ApiKey, services: Services, idempotency_key: str | None
) -> Job:
    """`api.jobs.accept`, its refusals naming this request's fields (max_completion_tokens...)."""
    try:
        job, _replayed = await accept(spec, caller, services, idempotency_key)
    except HTTPException as e:
        if e.status_code == 422 and isinstance(e.detail, list):
            raise validation_error(e.detail, body.renames()) from e
        raise
    return job


IdempotencyKey = Annotated[
    str | None, Header(description="Retry-safe submission: the same key and body give the same job.")
]


# With `stream: true` the answer is server-sent events: each `data:` a chunk object (OpenAI's
# `*.chunk` shapes), the last one the text `[DONE]`. The schema says "any": it is per event.
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {}}}, "description": "The answer."}
}


def usage_so_far(job: Job) -> Callable[[int], bytes]:
    """vLLM's continuous usage: completion tokens so far → the usage JSON a chunk carries."""
    prompt = job.usage.prompt_tokens

    def usage(generated: int) -> bytes:
        return orjson.dumps(
            {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
        )

    return usage
