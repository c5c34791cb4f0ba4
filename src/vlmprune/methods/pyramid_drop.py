"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep, Rounding, round_budget
from vlmprune.criteria import Attention
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["PyramidDrop"]


@dataclass
class PyramidDrop(Method):
    """PyramidDrop: at each stage boundary keep a geometrically shrinking share of the image tokens.

    Official code (Cooperx521/PyramidDrop, `pdrop_rank_drop`): at boundaries 8/16/24 keep `int(N · λ^s)` of
    the *original* count N (576 → 288/144/72 at λ=0.5; `int()` of the float product); the score is the last
    instruction token's softmax attention over the full sequence with RoPE, averaged over heads, computed with
    the q/k of the first layer *after* the boundary (the paper says the last layer before it:
    `scoring="before"`); positions are renumbered after each drop. With `score_dtype="model"` the scores are
    rounded as the code does: q·kᵀ/√d in the model's dtype, softmax in float32 cast back, means over heads and
    queries in the model's dtype.

    Budgets, one of (the first given wins over `lam`):
    - `keep`: image-token counts. A tuple gives each stage's count (non-increasing); one integer c is the last
      stage's count with the λ-geometric shape kept: stage s of S keeps `floor(c / λ^(S−1−s))` (c=72, λ=0.5:
      288/144/72). A count above the tokens present is a `BudgetError` when the stage runs.
    - `keep_fractions`: each stage's fraction of the original count, `int()`-rounded like λ^s.
    """

    name: ClassVar[str] = "pdrop"
    paper: ClassVar[str] = "PyramidDrop, Xing et al., CVPR 2025 (arXiv 2410.17247)"
    rounding: ClassVar[Rounding] = "int"

    layers: tuple[int, ...] = (8, 16, 24)
    lam: float = 0.5
    keep: int | tuple[int, ...] | None = None
    keep_fractions: tuple[float, ...] | None = None
    query: Literal["last", "text_mean"] = "last"
    scoring: Literal["before", "after"] = "after"
    positions: Literal["original", "renumbered"] = "renumbered"
    rope: bool = True
    score_dtype: Literal["model", "float32"] = "model"

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if not 0.0 < self.lam < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {self.lam}")
        if self.keep is not None and self.keep_fractions is not None:
            raise ValueError("give keep (token counts) or keep_fractions, not both")
        if isinstance(self.keep, list | tuple):
            self.keep = tuple(self.keep)
            if len(self.keep) != len(self.layers):
                raise ValueError(f"keep has {len(self.keep)} counts for {len(self.layers)} layers {self.layers}")
            _check_counts(self.keep, self.keep)
        elif self.keep is not None:
            _check_counts((self.keep,), self.keep)
        if self.keep_fractions is not None:
            self.keep_fractions = tuple(float(x) for x in self.keep_fractions)
            if len(self.keep_fractions) != len(self.layers):
                raise ValueError(
                    f"keep_fractions has {len(self.keep_fractions)} fractions for {len(self.layers)} layers"
                )
            if any(not 0.0 <= k <= 1.0 for k in self.keep_fractions) or list(self.keep_fractions) != sorted(
                self.keep_fractions, reverse=True
            ):
                raise ValueError(f"keep_fractions must be in [0, 1] and non-increasing, got {self.keep_fractions}")
        if self.score_dtype not in ("model", "float32"):
            raise ValueError(f"score_dtype must be 'model' or 'float32', got {self.score_dtype!r}")

    def budgets(self) -> list[Keep]:
        """Each stage's budget, from `keep`, `keep_fractions` or λ."""
        stages = len(self.layers)
        if isinstance(self.keep, tuple):
            return [Keep.count(c) for c in self.keep]
        if self.keep is not None:
            # the last stage keeps `keep`; each earlier one 1/λ times the next, as λ^s of some original count
            counts = [round_budget(self.keep / self.lam ** (stages - 1 - s), "floor") for s in range(stages)]
            return [Keep.count(c) for c in counts]
        fractions = self.keep_fractions or tuple(self.lam ** (s + 1) for s in range(stages))
        return [Keep.fraction_of_original(f, rounding=self.rounding) for f in fractions]

    def stages(self) -> list[Stage]:
        criterion = Attention(query=self.query, softmax="sequence", rope=self.rope, score_dtype=self.score_dtype)
        return [
            Stage(layer=layer, criterion=criterion, budget=budget, scoring=self.scoring, positions=self.positions)
            for layer, budget in zip(self.layers, self.budgets(), strict=True)
        ]


def _check_counts(counts: tuple[object, ...], given: object) -> None:
    """Non-negative integer counts, non-increasing stage by stage (shared with FEATHER); `given` names them."""
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"keep must be a non-negative integer image-token count per stage, got {given!r}")
    if list(counts) != sorted(counts, reverse=True):
        raise ValueError(f"keep counts must be non-increasing, stage by stage, got {given!r}")
