"""Every architecture `localmoe model init` builds, served end to end: a worker of its own loads
the checkpoint, a job goes through the API and comes back with generate()'s greedy text, a chat
request through the OpenAI endpoint ends, and the worker's heartbeat carries the model's expert
telemetry (routed choices per MoE layer; shared experts apart, where the family has them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_build.checkpoint import build_checkpoint
from moe_core.loader import inspect_model, load_model
from tests.conftest import private_stack, wait_done, wait_for
from tests.parity import ARCH_PARAMS, reference_tokens

PROMPT = "def fibonacci(n):\n    if n < 2:\n"
MAX_TOKENS = 8


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_a_job_through_the_api(arch: str, service_env: dict[str, str], tmp_path: Path) -> None:
    model_dir = build_checkpoint(tmp_path / arch, arch=arch, progress=False)
    model, tokenizer = load_model(model_dir, "cpu", "float32")
    expected = reference_tokens(model, tokenizer, PROMPT, MAX_TOKENS)
    info = inspect_model(model_dir)
    with (
        private_stack(service_env, worker=True, LOCALMOE_MODEL_DIR=str(model_dir)) as stack,
        stack.http() as http,
    ):
        r = http.post("/v1/jobs", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.status_code == 202, r.text
        job = wait_done(http, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["output"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert job["usage"]["completion_tokens"] == len(expected)

        chat = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["finish_reason"] in ("stop", "length")

        def counted() -> bool:
            (w,) = http.get("/v1/workers").json()
            return bool(w["expert_tokens"].get("code"))

        wait_for(counted, 10, "the code job's expert counts in the heartbeat")
        (w,) = http.get("/v1/workers").json()
        layers = w["expert_tokens"]["code"]
        assert all(len(layer) == info.num_experts for layer in layers)
        assert len({sum(layer) for layer in layers}) == 1  # each token routed in every MoE layer
        assert w["experts_per_token"] == info.experts_per_token
        assert w["shared_experts"] == info.shared_experts
        if info.shared_experts:
            routed_tokens = sum(layers[0]) // info.experts_per_token
            assert w["shared_expert_tokens"]["code"] == [routed_tokens * info.shared_experts] * len(layers)
        else:
            assert w["shared_expert_tokens"] == {}
