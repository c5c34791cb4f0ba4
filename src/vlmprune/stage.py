"""A pruning stage: where to cut, what scores the tokens, how many to keep, which positions they keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlmprune.budget import Keep
from vlmprune.criteria.base import Criterion
from vlmprune.errors import LayerError

__all__ = ["Stage"]


@dataclass(frozen=True)
class Stage:
    """One pruning step of a schedule.

    Args:
        layer: 0-based index of the first decoder layer that runs on the reduced set; 0 prunes before the LLM.
        criterion: what chooses the tokens.
        budget: how many image tokens the criterion is asked to keep.
        scoring: which layer's queries and keys score the tokens, for criteria that need LLM attention:
            "before" is layer `layer - 1`, the last layer before the cut (FastV, FEATHER); "after" is layer
            `layer`, the first layer after it, on its input before pruning (PyramidDrop's code).
        positions: "original" keeps each token's position id (FastV, FEATHER); "renumbered" makes the
            remaining tokens' positions consecutive again (PyramidDrop).
    """

    layer: int
    criterion: Criterion
    budget: Keep
    scoring: Literal["before", "after"] = "before"
    positions: Literal["original", "renumbered"] = "original"

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise LayerError(f"a stage's layer must be >= 0 (0 = before the LLM), got {self.layer}")
        if self.scoring not in ("before", "after"):
            raise ValueError(f"scoring must be 'before' or 'after', got {self.scoring!r}")
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")
        if self.needs_attention and self.scoring_layer < 0:
            raise LayerError(
                f"a stage at layer 0 cannot score with the layer before it; use scoring='after' or a "
                f"criterion that needs no LLM attention (got {type(self.criterion).__name__})"
            )

    @property
    def needs_attention(self) -> bool:
        return "attention" in self.criterion.requires

    @property
    def scoring_layer(self) -> int:
        return self.layer - 1 if self.scoring == "before" else self.layer
