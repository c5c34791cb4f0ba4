"""FEATHER (Endo et al., "Feather the Throttle", ICCV 2025, arXiv 2412.13180)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep, Rounding
from vlmprune.criteria import Attention, Ensemble, Uniform
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["Feather"]


@dataclass
class Feather(Method):
    """FEATHER: φ-R plus a uniform grid early, then φ-R alone later.

    Official code (markendo/FEATHER, `FastVLlamaModel.forward`): before layer 8 keep the top
    `int(N·(1−R))` image tokens by φ-R (last-token attention without RoPE, softmax over the image keys only,
    mean over heads, scored with layer 7's q/k) united with the `grid[::stride, ::stride]` tokens, the union
    kept as it is (overlaps not refilled, so counts vary per sample); before layer 16 keep the top
    `int(M·((1−R)·(1−R)))` of the M tokens remaining, re-scored with layer 15. Original positions are kept.
    Defaults R=0.7, stride 3, layers (8, 16). Both counts are `int()` of the float product, so R=0.15 on
    M=400 keeps 288 (the product is 288.99999999999994). With `score_dtype="model"` the scores are rounded as
    `calculate_attention_weight` does: q·kᵀ/√d in the model's dtype, softmax in float32 cast back to it, mean
    over heads in it.

    `keep` replaces the ratio by image-token counts: `(a, b)` keeps the top a by φ-R (united with the grid) at
    the first stage and b at the second; one integer b is the second stage's count, the first stage keeping
    `int(N·(1−R))` as without it. A count above the tokens present is a `BudgetError` when the stage runs.

    `top_up=True` fills each sample's union up to its φ-R count plus the grid size, so every sample keeps
    the same count.
    """

    name: ClassVar[str] = "feather"
    paper: ClassVar[str] = "FEATHER, Endo et al., ICCV 2025 (arXiv 2412.13180)"
    rounding: ClassVar[Rounding] = "int"

    layers: tuple[int, int] = (8, 16)
    ratio: float = 0.7
    stride: int = 3
    rope: bool = False
    softmax: Literal["sequence", "image", "none"] = "image"
    top_up: bool = False
    keep: int | tuple[int, int] | None = None
    score_dtype: Literal["model", "float32"] = "model"

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if len(self.layers) != 2 or self.layers[0] >= self.layers[1]:
            raise ValueError(f"layers must be two increasing layer indices, got {self.layers}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of image tokens dropped) must be in [0, 1), got {self.ratio}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if isinstance(self.keep, list | tuple):
            self.keep = tuple(self.keep)
            if len(self.keep) != 2:
                raise ValueError(f"keep takes one count per stage (2) or the last stage's, got {self.keep!r}")
        counts = self.keep if isinstance(self.keep, tuple) else () if self.keep is None else (self.keep,)
        # no order between the two: the grid adds tokens to the first stage's count
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"keep must be a non-negative integer image-token count per stage, got {self.keep!r}")
        if self.score_dtype not in ("model", "float32"):
            raise ValueError(f"score_dtype must be 'model' or 'float32', got {self.score_dtype!r}")

    def budgets(self) -> tuple[Keep, Keep]:
        """The budgets of the two stages: φ-R's count at the first (before the union), the count at the second."""
        keep = 1.0 - self.ratio
        first = Keep.fraction_of_current(keep, rounding=self.rounding)
        second = Keep.fraction_of_current(keep * keep, rounding=self.rounding)  # the code's `ratio * ratio`
        if isinstance(self.keep, tuple):
            return Keep.count(self.keep[0]), Keep.count(self.keep[1])
        if self.keep is not None:
            return first, Keep.count(self.keep)
        return first, second

    def stages(self) -> list[Stage]:
        attention = Attention(query="last", softmax=self.softmax, rope=self.rope, score_dtype=self.score_dtype)
        first, second = self.budgets()
        return [
            Stage(
                layer=self.layers[0],
                criterion=Ensemble((attention, Uniform(stride=self.stride)), top_up=self.top_up),
                budget=first,
            ),
            Stage(layer=self.layers[1], criterion=attention, budget=second),
        ]
