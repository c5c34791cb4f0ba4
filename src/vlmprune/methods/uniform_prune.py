"""Uniform-grid pruning: FEATHER's φuniform ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.criteria import Criterion, Uniform
from vlmprune.methods.base import OneStageMethod

__all__ = ["UniformPrune"]


@dataclass
class UniformPrune(OneStageMethod):
    """Keep only a regular grid of image tokens, once, before `layer` (FEATHER's φuniform).

    FEATHER (arXiv 2412.13180) ablates φuniform at K=3 and K=8 with `grid[::2, ::2]` anchored at the
    top-left (official code `s=2`: 196 of 729 tokens on a 27×27 grid, 144 of 576 on LLaVA-1.5's 24×24).
    With `stride=None` the grid is instead fitted to keep `int(N·(1−ratio))` tokens, or `keep` tokens (see
    `Uniform`); `ratio` is used only then, and `keep` is refused with a stride.
    """

    name: ClassVar[str] = "uniform"
    paper: ClassVar[str] = "φuniform ablation of FEATHER, Endo et al., ICCV 2025 (arXiv 2412.13180)"

    layer: int = 3
    ratio: float = 0.75
    stride: int | None = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, or None to fit the budget, got {self.stride}")
        if self.stride is not None and self.keep is not None:  # the grid ignores budgets: say so, not silently
            raise ValueError(
                f"uniform keeps its stride-{self.stride} grid whatever keep says; pass stride=None with keep"
            )

    def criterion(self) -> Criterion:
        return Uniform(stride=self.stride)
