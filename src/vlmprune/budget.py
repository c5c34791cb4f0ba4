"""How many image tokens a pruning stage keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vlmprune.errors import BudgetError

__all__ = ["Keep"]

_EPS = 1e-6  # so that 0.29 * 100 counts as 29, not 28.999999999999996 -> 28


@dataclass(frozen=True)
class Keep:
    """A budget: the number of image tokens a stage keeps.

    `of="original"` is a fraction of the sample's image-token count before any pruning (PyramidDrop's
    ratios), `of="current"` a fraction of the tokens still present when the stage runs (FEATHER's second
    stage), `of="count"` an absolute number. Fractions are floored, as every official implementation does
    (`int(576 * 0.5) = 288`).
    """

    value: float
    of: Literal["original", "current", "count"] = "original"

    def __post_init__(self) -> None:
        if self.of not in ("original", "current", "count"):
            raise BudgetError(f"Keep.of must be 'original', 'current' or 'count', got {self.of!r}")
        if self.of == "count":
            if self.value < 0 or int(self.value) != self.value:
                raise BudgetError(f"an absolute budget must be a non-negative integer, got {self.value}")
        elif not 0.0 <= self.value <= 1.0:
            raise BudgetError(f"a budget fraction must be in [0, 1], got {self.value}")

    @classmethod
    def fraction_of_original(cls, fraction: float) -> Keep:
        return cls(fraction, "original")

    @classmethod
    def fraction_of_current(cls, fraction: float) -> Keep:
        return cls(fraction, "current")

    @classmethod
    def count(cls, n: int) -> Keep:
        return cls(n, "count")

    def resolve(self, n_original: int, n_current: int) -> int:
        """Tokens to keep for a sample with `n_original` image tokens, `n_current` of them still present."""
        if self.of == "count":
            kept = int(self.value)
        else:
            base = n_original if self.of == "original" else n_current
            kept = math.floor(self.value * base + _EPS)
        if kept > n_current:
            raise BudgetError(
                f"budget {self} asks for {kept} image tokens but only {n_current} are present "
                f"({n_original} before pruning); use a budget of at most {n_current}"
            )
        return kept

    def __str__(self) -> str:
        if self.of == "count":
            return f"{int(self.value)} tokens"
        return f"{self.value:g} of the {self.of} image tokens"
