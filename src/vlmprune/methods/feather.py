"""FEATHER (Endo et al., "Feather the Throttle", ICCV 2025, arXiv 2412.13180)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
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
    `int(M·(1−R)²)` of the M tokens remaining, re-scored with layer 15. Original positions are kept.
    Defaults R=0.7, stride 3, layers (8, 16).

    `top_up=True` fills each sample's union up to `int(N·(1−R))` plus the grid size, so every sample keeps
    the same count.
    """

    name: ClassVar[str] = "feather"
    paper: ClassVar[str] = "FEATHER, Endo et al., ICCV 2025 (arXiv 2412.13180)"

    layers: tuple[int, int] = (8, 16)
    ratio: float = 0.7
    stride: int = 3
    rope: bool = False
    softmax: Literal["sequence", "image", "none"] = "image"
    top_up: bool = False

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if len(self.layers) != 2 or self.layers[0] >= self.layers[1]:
            raise ValueError(f"layers must be two increasing layer indices, got {self.layers}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of image tokens dropped) must be in [0, 1), got {self.ratio}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")

    def stages(self) -> list[Stage]:
        attention = Attention(query="last", softmax=self.softmax, rope=self.rope)
        keep = 1.0 - self.ratio
        return [
            Stage(
                layer=self.layers[0],
                criterion=Ensemble((attention, Uniform(stride=self.stride)), top_up=self.top_up),
                budget=Keep.fraction_of_current(keep),
            ),
            Stage(layer=self.layers[1], criterion=attention, budget=Keep.fraction_of_current(keep * keep)),
        ]
