"""Uniform-grid pruning: FEATHER's φuniform ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria import Uniform
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["UniformPrune"]


@dataclass
class UniformPrune(Method):
    """Keep only a regular grid of image tokens, once, before `layer` (FEATHER's φuniform).

    FEATHER (arXiv 2412.13180) ablates φuniform at K=3 and K=8 with `grid[::2, ::2]` anchored at the
    top-left (official code `s=2`: 196 of 729 tokens on a 27×27 grid, 144 of 576 on LLaVA-1.5's 24×24).
    With `stride=None` the grid is instead fitted to keep `int(N·(1−ratio))` tokens (see `Uniform`);
    `ratio` is used only then.
    """

    name: ClassVar[str] = "uniform"
    paper: ClassVar[str] = "φuniform ablation of FEATHER, Endo et al., ICCV 2025 (arXiv 2412.13180)"

    layer: int = 3
    stride: int | None = 2
    ratio: float = 0.75
    positions: Literal["original", "renumbered"] = "original"

    def __post_init__(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, or None to fit the budget, got {self.stride}")
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
                criterion=Uniform(stride=self.stride),
                budget=Keep.fraction_of_original(1.0 - self.ratio),
                positions=self.positions,
            )
        ]
