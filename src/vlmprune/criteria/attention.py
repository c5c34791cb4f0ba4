"""Attention received from the text: FastV's φoriginal and FEATHER's φ-R."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmprune.criteria.base import QueryPolicy, ScoredCriterion, SelectionContext, SoftmaxDomain

__all__ = ["Attention"]


@dataclass(frozen=True)
class Attention(ScoredCriterion):
    """Attention an image token receives from the text at the stage's scoring layer.

    The score is computed from the scoring layer's own queries and keys (only the rows needed), so it works
    with any attention backend and never needs `output_attentions`.

    Args:
        query: "last" uses the last token of the prompt (FastV's and FEATHER's code); "text_mean" averages the
            attention of the text tokens after the last image.
        softmax: "sequence" normalises over every key the query sees (FastV, PyramidDrop); "image" over the
            image keys only (FEATHER); "none" keeps raw logits q·k/√d (BTP's LLaVA code).
        rope: apply rotary position embeddings to q and k (φoriginal). `False` is FEATHER's φ-R, which removes
            RoPE's long-term decay and with it the preference for tokens at the bottom of the image.
        full_map: compute the whole attention map of the scoring layer, as the original FastV does through
            eager attention with `output_attentions`; the same scores at the original's cost (for benchmarks).

    Scores are averaged over heads, in float32.
    """

    query: QueryPolicy = "last"
    softmax: SoftmaxDomain = "sequence"
    rope: bool = True
    full_map: bool = False

    requires: ClassVar[frozenset[str]] = frozenset({"attention"})

    def __post_init__(self) -> None:
        if self.query not in ("last", "text_mean"):
            raise ValueError(f"query must be 'last' or 'text_mean', got {self.query!r}")
        if self.softmax not in ("sequence", "image", "none"):
            raise ValueError(f"softmax must be 'sequence', 'image' or 'none', got {self.softmax!r}")

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return ctx.attention(self.query, self.softmax, self.rope, self.full_map)
