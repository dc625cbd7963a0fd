"""Expert telemetry: how many tokens each expert of each MoE layer received, split by a tag per
request (LocalMoE tags a job's tokens with its modality: text, code or mixed).

Hooks every router of a transformers MoE model (`*TopKRouter`: Mixtral, Qwen2-MoE, OLMoE; its
forward returns (logits, scores, indices [T, k]) over the T flattened tokens of the batch). The
engine says, before each forward, which tag each of those T tokens carries (padding goes to a
slot nobody reads). Counts stay on the model's device, one index_add per layer per forward and no host
sync, until `snapshot()` reads them.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_TAGS = 8  # distinct tags counted separately; later ones share the last slot ("other")
PADDING = MAX_TAGS  # padding tokens are counted into this extra slot, never read: no filtering


def routers(model: Any) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


class ExpertTelemetry:
    def __init__(self, model: Any) -> None:
        found = routers(model)
        if not found:
            raise ValueError("no MoE router modules in this model")
        weight = found[0].weight  # [E, hidden]
        assert isinstance(weight, torch.Tensor)
        self.num_layers, self.num_experts = len(found), int(weight.shape[0])
        self.device = weight.device
        self.tags: dict[str, int] = {}
        self.counts = torch.zeros(  # [tags + the padding slot, layers, experts]
            MAX_TAGS + 1, self.num_layers, self.num_experts, dtype=torch.int64, device=self.device
        )
        self._base: torch.Tensor | None = None  # [T] tag offsets into counts, next forward's tokens
        for layer, router in enumerate(found):
            router.register_forward_hook(self._hook(layer))

    def tag_id(self, tag: str) -> int:
        if tag not in self.tags:
            self.tags[tag] = min(len(self.tags), MAX_TAGS - 1)
        return self.tags[tag]

    def reset(self) -> None:
        self.tags.clear()
        self.counts.zero_()

    def expect(self, token_tags: torch.Tensor | None) -> None:
        """token_tags: [T] tag ids of the next forward's flattened tokens (PADDING for padding);
        None: count nothing until told again. Everything stays on the device: no host sync."""
        if token_tags is None:
            self._base = None
            return
        self._base = token_tags.reshape(-1) * (self.num_layers * self.num_experts)  # [T]

    def snapshot(self) -> dict[str, list[list[int]]]:
        """tag → [layer][expert] tokens routed there so far."""
        counts = self.counts.tolist()
        return {tag: counts[i] for tag, i in self.tags.items()}

    def _hook(self, layer: int) -> Any:

        offset = layer * self.num_experts

        def hook(_module: torch.nn.Module, _inputs: Any, outputs: Any) -> None:
            if self._base is None:
                return
            indices = outputs[2]  # [T, k]
            flat = (self._base[:, None] + (indices + offset)).reshape(-1)  # [T * k] cells of counts
            self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

        return hook
