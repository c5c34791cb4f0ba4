"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.criteria import Attention, Criterion, RandomScore
from vlmprune.methods.base import OneStageMethod

__all__ = ["FastV"]


@dataclass
class FastV(OneStageMethod):
    """FastV: drop the image tokens that receive the least attention, once, before `layer`.

    Official code (pkunlp-icler/FastV): scores from layer `layer - 1`, the last token as query, softmax over
    the full sequence, mean over heads, RoPE applied, original positions kept. The paper's K is `layer`
    and its R is `ratio` (the fraction of image tokens dropped); its default is K=2, R=50%, its README demo
    K=3, R=75%. With `layer=0` the official code drops tokens at random (the paper's φrand, seeded by `seed`).

    The paper describes the score as the attention "received from all other tokens"; `query="text_mean"`
    averages over the text tokens after the image instead of the last token.
    """

    name: ClassVar[str] = "fastv"
    paper: ClassVar[str] = "FastV, Chen et al., ECCV 2024 (arXiv 2403.06764)"

    layer: int = 2
    ratio: float = 0.5
    query: Literal["last", "text_mean"] = "last"
    softmax: Literal["sequence", "image", "none"] = "sequence"
    rope: bool = True
    scoring: Literal["before", "after"] = "before"
    seed: int = 0
    full_map: bool = False  # score from the whole attention map, as the original eager code does (benchmarks)

    def criterion(self) -> Criterion:
        if self.layer == 0 and self.scoring == "before":
            return RandomScore(seed=self.seed)
        return Attention(query=self.query, softmax=self.softmax, rope=self.rope, full_map=self.full_map)
