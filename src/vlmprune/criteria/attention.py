"""Attention received from the text: FastV's φoriginal and FEATHER's φ-R."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmprune.criteria.base import QueryPolicy, ScoredCriterion, ScoreDtype, SelectionContext, SoftmaxDomain

__all__ = ["Attention"]


@dataclass(frozen=True)
class Attention(ScoredCriterion):
    """Attention an image token receives from the text at the stage's scoring layer.

    The score is computed from the scoring layer's own queries and keys (only the rows needed), so it works
    with any attention backend and never needs `output_attentions`.

    Args:
        query: "last" uses the last token of the prompt (FastV's and FEATHER's code); "text_mean" averages the
            attention of the text tokens after the last image; "all" averages the attention a token receives from
            every other token of the sequence (FastV's paper; it costs a whole attention map, in chunks).
        softmax: "sequence" normalises over every key the query sees (FastV, PyramidDrop); "image" over the
            image keys only (FEATHER); "none" keeps raw logits q·k/√d (BTP's LLaVA code).
        rope: apply rotary position embeddings to q and k (φoriginal). `False` is FEATHER's φ-R, which removes
            RoPE's long-term decay and with it the preference for tokens at the bottom of the image.
        full_map: compute the whole attention map of the scoring layer, as the original FastV does through
            eager attention with `output_attentions`; the same scores at the original's cost (for benchmarks).
        score_dtype: "float32" computes the scores in float32. "model" rounds where the official codes of FastV,
            PyramidDrop and FEATHER round: q·kᵀ/√d in the model's dtype, softmax in float32 cast back to the
            model's dtype, mean over heads in that dtype. Both agree on a float32 model; on a bf16/fp16 model
            only "model" reproduces the official selections (rounding makes ties and reorders close scores).

    Scores are averaged over heads (and over queries for "text_mean" and "all"); ties go to the earlier token
    (the official `topk` leaves their order to the backend).
    """

    query: QueryPolicy = "last"
    softmax: SoftmaxDomain = "sequence"
    rope: bool = True
    full_map: bool = False
    score_dtype: ScoreDtype = "float32"

    requires: ClassVar[frozenset[str]] = frozenset({"attention"})

    def __post_init__(self) -> None:
        if self.query not in ("last", "text_mean", "all"):
            raise ValueError(f"query must be 'last', 'text_mean' or 'all', got {self.query!r}")
        if self.softmax not in ("sequence", "image", "none"):
            raise ValueError(f"softmax must be 'sequence', 'image' or 'none', got {self.softmax!r}")
        if self.score_dtype not in ("model", "float32"):
            raise ValueError(f"score_dtype must be 'model' or 'float32', got {self.score_dtype!r}")

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return ctx.attention(self.query, self.softmax, self.rope, self.full_map, self.score_dtype)
