"""Random pruning: the φrand baseline of FastV and UniPruneBench."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria import RandomScore
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["RandomPrune"]


@dataclass
class RandomPrune(Method):
    """Drop a random `ratio` of the image tokens, once, before `layer`.

    FastV's φrand (its `K=0` branch) and the random baseline of UniPruneBench, where random pruning turns
    out a strong baseline. `layer=0` prunes before the LLM. The draw is seeded per sample and per stage
    (see `RandomScore`), so a sample keeps the same tokens whatever batch it runs in.
    """

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "random baseline (φrand of FastV, arXiv 2403.06764; UniPruneBench)"

    layer: int = 0
    ratio: float = 0.5
    seed: int = 0
    positions: Literal["original", "renumbered"] = "original"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of image tokens dropped) must be in [0, 1), got {self.ratio}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (0 = before the LLM), got {self.layer}")
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")

    def stages(self) -> list[Stage]:
        return [
            Stage(
                layer=self.layer,
                criterion=RandomScore(seed=self.seed),
                budget=Keep.fraction_of_original(1.0 - self.ratio),
                positions=self.positions,
            )
        ]
