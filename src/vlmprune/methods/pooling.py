"""Average pooling of the image-token grid: the downsampling baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria import GridPool
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["Pooling"]


@dataclass
class Pooling(Method):
    """Average-pool each image's token grid in `size` x `size` windows before layer `layer` (0: before the LLM).

    The downsampling baseline of the token-reduction literature (LLaVA-OneVision and LLaVA-Video's `get_2dPool`
    average-pool the projected features 2x2): one token per window, the average of its tokens, placed at the
    window's first token; 2x2 keeps a quarter of a 24x24 grid (144), 3x3 a ninth (64). `space="hidden"` pools
    the stage's hidden states (before the LLM: the projected features), `"vision_features"` the vision features
    before the projector, projected again. The grid fixes the count: there is no budget to set.
    """

    name: ClassVar[str] = "pooling"
    paper: ClassVar[str] = "average pooling of the image-token grid (LLaVA-OneVision get_2dPool; 2x2, 3x3)"

    size: int = 2
    space: Literal["hidden", "vision_features"] = "hidden"
    layer: int = 0
    positions: Literal["original", "renumbered"] = "renumbered"

    def __post_init__(self) -> None:
        GridPool(size=self.size, space=self.space)  # validates size and space
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (0 = before the LLM), got {self.layer}")
        if self.space == "vision_features" and self.layer != 0:
            raise ValueError("vision features can be pooled only before the language model (layer 0)")
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")

    def stages(self) -> list[Stage]:
        criterion = GridPool(size=self.size, space=self.space)
        return [Stage(self.layer, criterion, Keep.fraction_of_original(1.0), positions=self.positions)]
