"""Expert telemetry: how many tokens each expert of each MoE layer received, split by a tag per
request (LocalMoE tags a job's tokens with its modality: text, code or mixed).

Hooks every router of a transformers MoE model (`*TopKRouter` / `*TopkRouter`: Mixtral, Qwen2-
and Qwen3-MoE, OLMoE, Phi-MoE, Granite MoE, DeepSeek-V2/V3, GLM-4.5); the chosen expert ids are
its forward's one integer output, [T, k] over the T flattened tokens of the batch. Only routed
choices are counted here (grouped routing's: its chosen experts); shared experts have no router,
and the worker reports the tokens through them apart (scheduler/registry.py `shared_tokens`). The
engine says, before each forward, which tag each of those T tokens carries (padding goes to a
slot nobody reads), and calls `flush()` after it. A hook only keeps a reference to its router's
indices (no device work); `flush()` counts every layer's choices at once: one stack, one add and
one index_add per forward, whatever the number of layers, and no host sync. Counts stay on the
model's device until `snapshot()` reads them.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_TAGS = 8  # distinct tags counted separately; later ones share the last slot ("other")
PADDING = MAX_TAGS  # padding tokens are counted into this extra slot, never read: no filtering


def routers(model: Any) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]


class ExpertTelemetry:
    def __init__(self, model: Any) -> None:
        """model: the module tree holding the routers, before any wrapper changes its weights (a
        ZeRO-3 partition leaves them empty); the hooks stay with the routers under any wrapper."""
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
        # [L, 1, 1] each layer's offset into counts.view(-1)
        self._layer_offsets = (torch.arange(self.num_layers, device=self.device) * self.num_experts)[
            :, None, None
        ]
        self._cells: torch.Tensor | None = None  # [L, T, 1] cells of counts for the next forward's tokens
        self._pending: list[torch.Tensor] = []  # per router, in layer order: its indices [T, k]
        self._ones = torch.ones(0, dtype=torch.int64, device=self.device)  # grown as needed
        for router in found:
            router.register_forward_hook(self._hook)

    def to(self, device: torch.device) -> None:
        """Count on `device`, where the forward runs (a tensor-parallel or offloaded model is
        loaded on the CPU and placed later)."""
        self.device = device
        self.counts = self.counts.to(device)
        self._layer_offsets = self._layer_offsets.to(device)
        self._ones = self._ones.to(device)

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
        self._pending.clear()
        if token_tags is None:
            self._cells = None
            return
        base = token_tags.reshape(-1)[None, :, None] * (self.num_layers * self.num_experts)  # [1, T, 1]
        self._cells = base + self._layer_offsets  # [L, T, 1]

    def flush(self) -> None:
        """After the forward: count what its routers chose (padding into the unread slot)."""
        if not self._pending or self._cells is None:
            return
        indices = torch.stack(self._pending)  # [L', T, k], L' = routers that ran (all, normally)
        self._pending.clear()
        flat = (indices + self._cells[: indices.shape[0]]).reshape(-1)  # [L' * T * k] cells
        if self._ones.numel() < flat.numel():
            self._ones = torch.ones(
                max(flat.numel(), 2 * self._ones.numel()), dtype=torch.int64, device=self.device
            )
        self.counts.view(-1).index_add_(0, flat, self._ones[: flat.numel()])

    def snapshot(self) -> dict[str, list[list[int]]]:
        """tag → [layer][expert] tokens routed there so far."""
        counts = self.counts.tolist()
        return {tag: counts[i] for tag, i in self.tags.items()}

    def _hook(self, _module: torch.nn.Module, _inputs: Any, outputs: Any) -> None:
        if self._cells is not None:
            # [T, k] expert ids, routers in layer order: the one integer output, (logits, weights,
            # indices) for most families, (indices, weights, logits) for Granite's
            self._pending.append(next(o for o in outputs if not o.is_floating_point()))


class RoutedCounts:
    """The same counts for an engine that reports each finished request's routing afterwards (vLLM's
    `enable_return_routed_experts`: [tokens, layers, k] expert ids per request), on the host."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: dict[str, Any] = {}  # tag → np.ndarray [layers, experts] int64

    def add(self, tag: str, routed: Any) -> None:
        """routed: array-like [tokens, layers, k] of expert ids (the request's prompt and output)."""
        import numpy as np

        ids = np.asarray(routed, dtype=np.int64)
        if ids.ndim != 3 or ids.size == 0:
            return
        layers, experts = ids.shape[1], self.num_experts
        cells = ids + (np.arange(layers, dtype=np.int64) * experts)[None, :, None]  # [T, L, k]
        counts = np.bincount(cells.reshape(-1), minlength=layers * experts).reshape(layers, experts)
        if tag not in self.counts and len(self.counts) >= MAX_TAGS:
            tag = list(self.counts)[-1]  # as ExpertTelemetry: later tags share the last slot
        total = self.counts.get(tag)
        self.counts[tag] = counts if total is None else total + counts

    def reset(self) -> None:
        self.counts.clear()

    def snapshot(self) -> dict[str, list[list[int]]]:
        return {tag: counts.tolist() for tag, counts in self.counts.items()}
