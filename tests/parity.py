"""What every engine's parity tests share: the prompts, and transformers `generate()` as the
reference its greedy tokens must equal (tests/test_torch_engine.py, test_deepspeed_engine.py,
test_vllm_engine.py)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moe_core.engine import FinishReason

PROMPTS = [
    "def add(a, b):\n    return",
    "import os",
    "class Parser:\n    def __init__(self, text):\n        self.text = text\n        self.pos = 0\n\n    def",
    "The quick brown fox",
    "x",
    "for i in range(10):\n    print(i)\n# done",
    "raise ValueError(",
    "    # The cache is trimmed on the left when rows leave the batch, so",
]
LATE_PROMPTS = ["while True:", "with open(path) as f:\n    data = f.read()", "lambda", "return None"]
NEW_TOKENS = 16


class Outcome(Protocol):
    """A request's collected deltas, as each engine test gathers them."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None


def reference_tokens(model: Any, tokenizer: Any, prompt: str, max_tokens: int = NEW_TOKENS) -> list[int]:
    """generate(do_sample=False) for the prompt alone, cut after the first EOS."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens, do_sample=False
        )
    ids: list[int] = out[0, input_ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def assert_matches(tokenizer: Any, result: Outcome, reference: list[int], max_tokens: int) -> None:
    """The engine made exactly the reference's tokens, finished for the same reason, and its
    concatenated deltas are the reference's text."""
    assert result.token_ids == reference
    eos = tokenizer.eos_token_id
    assert result.finish_reason == (FinishReason.STOP if reference[-1] == eos else FinishReason.LENGTH)
    assert len(reference) <= max_tokens
    decoded = tokenizer.decode(reference, skip_special_tokens=True)
    # Bytes of a character cut off by the end of generation are dropped, not emitted as U+FFFD.
    assert decoded == result.text or (decoded.startswith(result.text) and decoded.endswith("\ufffd"))
