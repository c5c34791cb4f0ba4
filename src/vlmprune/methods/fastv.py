"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria import Attention, RandomScore
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["FastV"]


@dataclass
class FastV(Method):
    """FastV: drop the image tokens that receive the least attention, once, before `layer`.

    Official code (pkunlp-icler/FastV): scores from layer `layer - 1`, the last token as query, softmax over
    the full sequence, mean over heads, RoPE applied, original positions kept. The paper's K is `layer`
    and its R is `ratio` (the fraction of image tokens dropped); its default is K=2, R=50%, its README demo
    K=3, R=75%. With `layer=0` the official code drops tokens at random (the paper's φrand).

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
    positions: Literal["original", "renumbered"] = "original"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of image tokens dropped) must be in [0, 1), got {self.ratio}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")

    def stages(self) -> list[Stage]:
        criterion = (
            RandomScore(seed=self.seed)
            if self.layer == 0 and self.scoring == "before"
            else Attention(query=self.query, softmax=self.softmax, rope=self.rope)
        )
        return [
            Stage(
                layer=self.layer,
                criterion=criterion,
                budget=Keep.fraction_of_original(1.0 - self.ratio),
                scoring=self.scoring,
                positions=self.positions,
            )
        ]
