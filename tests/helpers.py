"""Helpers the test files share: the reference's per-layer position policy, the positions a forward is given, the
comparison of generated answers, and an adapter stub for hand-built decoder layers."""

from __future__ import annotations

import torch

from vlmprune.adapters import get_adapter
from vlmprune.adapters.base import ModelAdapter
from vlmprune.reference import positions_from_mask


def renumber_flags(method, depth: int) -> list[bool]:
    """Per decoder layer (`depth` of them), whether the references renumber the alive tokens' positions there: the
    policy of the last stage at or before the layer (none before the first stage)."""
    flags, current = [], False
    stages = {s.layer: s for s in method.stages()}
    for layer in range(depth):
        if layer in stages:
            current = stages[layer].positions == "renumbered"
        flags.append(current)
    return flags


def position_kwargs(model, inputs: dict) -> dict[str, torch.Tensor]:
    """The positions `generate` would give a left-padded prefill, from the attention mask; none where the model derives
    its own from the prompt (M-RoPE), as the references do."""
    if get_adapter(model).computes_positions:
        return {}
    return {"position_ids": positions_from_mask(inputs["attention_mask"])}


def assert_same_answers(generated: torch.Tensor, expected: torch.Tensor, model) -> None:
    """Equal tokens up to each row's first end-of-sequence: `generate` pads a finished sample after it, the references
    keep going."""
    eos = model.generation_config.eos_token_id
    for b, (got, want) in enumerate(zip(generated, expected, strict=True)):
        ends = (want == eos).nonzero().flatten()
        stop = int(ends[0]) + 1 if ends.numel() else want.numel()
        assert torch.equal(got[:stop], want[:stop]), f"sample {b}: {got.tolist()} != {want.tolist()}"


class BareAdapter(ModelAdapter):
    """An adapter with no model: only the base class's q/k projection is used, on a hand-built decoder layer."""

    family = "bare"
    model_classes = ()
    multimodal_module = text_model = None

    def image_token_mask(self, inputs):
        raise NotImplementedError

    def image_grids(self, image_counts, inputs):
        raise NotImplementedError
