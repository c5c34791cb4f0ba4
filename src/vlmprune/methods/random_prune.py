"""Random pruning: the φrand baseline of FastV and UniPruneBench."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.criteria import Criterion, RandomScore
from vlmprune.methods.base import OneStageMethod

__all__ = ["RandomPrune"]


@dataclass
class RandomPrune(OneStageMethod):
    """Drop a random `ratio` of the image tokens, once, before `layer`.

    FastV's φrand (its `K=0` branch) and the random baseline of UniPruneBench, where random pruning turns
    out a strong baseline. `layer=0` prunes before the LLM. The draw is seeded per sample and per stage
    (see `RandomScore`), so a sample keeps the same tokens whatever batch it runs in.
    """

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "random baseline (φrand of FastV, arXiv 2403.06764; UniPruneBench)"

    layer: int = 0
    seed: int = 0
    per_sample: bool = False  # each sample of a batch draws its own scores (see `RandomScore`)

    def criterion(self) -> Criterion:
        return RandomScore(seed=self.seed, per_sample=self.per_sample)
