"""Where a job goes: its estimated cost and the Celery queue that should run it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from scheduler import keys
from scheduler.jobs import Job


class PromptCounter:
    """Counts prompt tokens exactly as the engine will (the model's own tokenizer.json) and knows
    the model's context length, so intake can refuse what the engine could never run."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "config.json").read_text())
        self.max_context = int(config.get("max_position_embeddings", 2048))

    def count(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt).ids)


@dataclass(frozen=True)
class Route:
    queue: str
    reason: str


def route(job: Job) -> Route:
    # Every worker consumes the shared queue, so a free engine slot anywhere takes the next job.
    # Load- and expert-aware routing onto per-worker queues builds on the registry (scheduler
    # issue); until then the shared queue is the policy, not a fallback.
    return Route(keys.SHARED_QUEUE, "shared queue: every worker takes the next job when it has a free slot")
