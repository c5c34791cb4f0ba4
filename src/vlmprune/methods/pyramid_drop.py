"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria import Attention
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["PyramidDrop"]


@dataclass
class PyramidDrop(Method):
    """PyramidDrop: at each stage boundary keep a geometrically shrinking share of the image tokens.

    Official code (Cooperx521/PyramidDrop, `pdrop_rank_drop`): at boundaries 8/16/24 keep `λ^s` of the
    *original* count (576 → 288/144/72 at λ=0.5); the score is the last instruction token's softmax
    attention over the full sequence with RoPE, averaged over heads, computed with the q/k of the first
    layer *after* the boundary (the paper says the last layer before it: `scoring="before"`); positions
    are renumbered after each drop.

    `keep` overrides λ with explicit per-stage fractions of the original count.
    """

    name: ClassVar[str] = "pdrop"
    paper: ClassVar[str] = "PyramidDrop, Xing et al., CVPR 2025 (arXiv 2410.17247)"

    layers: tuple[int, ...] = (8, 16, 24)
    lam: float = 0.5
    keep: tuple[float, ...] | None = None
    query: Literal["last", "text_mean"] = "last"
    scoring: Literal["before", "after"] = "after"
    positions: Literal["original", "renumbered"] = "renumbered"
    rope: bool = True

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if not 0.0 < self.lam < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {self.lam}")
        if self.keep is not None:
            self.keep = tuple(float(x) for x in self.keep)
            if len(self.keep) != len(self.layers):
                raise ValueError(f"keep has {len(self.keep)} fractions for {len(self.layers)} layers")
            if any(not 0.0 <= k <= 1.0 for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
                raise ValueError(f"keep fractions must be in [0, 1] and non-increasing, got {self.keep}")

    def keep_fractions(self) -> tuple[float, ...]:
        if self.keep is not None:
            return self.keep
        return tuple(self.lam ** (s + 1) for s in range(len(self.layers)))

    def stages(self) -> list[Stage]:
        criterion = Attention(query=self.query, softmax="sequence", rope=self.rope)
        return [
            Stage(
                layer=layer,
                criterion=criterion,
                budget=Keep.fraction_of_original(fraction),
                scoring=self.scoring,
                positions=self.positions,
            )
            for layer, fraction in zip(self.layers, self.keep_fractions(), strict=True)
        ]
