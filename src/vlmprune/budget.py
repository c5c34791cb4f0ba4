"""How many image tokens a pruning stage keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vlmprune.errors import BudgetError

__all__ = ["ROUNDINGS", "Keep", "Rounding", "round_budget", "split_budget"]

Rounding = Literal["int", "round", "floor"]
ROUNDINGS: tuple[str, ...] = ("int", "round", "floor")

_EPS = 1e-6  # so that 0.29 * 100 counts as 29, not 28.999999999999996 -> 28


def round_budget(x: float, rounding: Rounding) -> int:
    """A token count from the float product `x` (a fraction times a count), as an official code rounds it.

    - "int": Python's `int(x)`, truncation of the float product, as PyramidDrop (`int(N * ratio)`), FEATHER
      (`int(len(image_indices) * ratio)`) and FastV's lmms-eval drop-in do: `int(2880 * 0.7) = 2015`, since
      the product is 2015.9999999999998.
    - "round": Python's `round(x)`, to the nearest integer with halves to the even one, as FastV's llava-hf fork
      does (`round(576 * (1 - 0.7)) = 173`, where "int" gives 172).
    - "floor": the floor of the exact decimal product, `floor(x + 1e-6)`: 2016 for 2880 at 0.7.
    """
    if rounding == "int":
        return int(x)
    if rounding == "round":
        return round(x)
    if rounding == "floor":
        return math.floor(x + _EPS)
    raise BudgetError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")


def split_budget(budget: int, counts: list[int]) -> list[int]:
    """`budget` split over parts in proportion to `counts` (Hamilton's largest remainder; ties to the earlier part)."""
    total = sum(counts)
    if total == 0:
        return [0] * len(counts)
    shares = [budget * c // total for c in counts]
    remainders = [budget * c % total for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-remainders[i], i))
    for i in order[: budget - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass(frozen=True)
class Keep:
    """A budget: the number of image tokens a stage keeps.

    `of="original"` is a fraction of the sample's image-token count before any pruning (PyramidDrop's
    ratios), `of="current"` a fraction of the tokens still present when the stage runs (FEATHER's second
    stage), `of="count"` an absolute number. A fraction times a count is turned into a count by `rounding`
    (see `round_budget`); each method uses its official code's rounding ("int" unless it says otherwise).
    """

    value: float
    of: Literal["original", "current", "count"] = "original"
    rounding: Rounding = "int"

    def __post_init__(self) -> None:
        if self.of not in ("original", "current", "count"):
            raise BudgetError(f"Keep.of must be 'original', 'current' or 'count', got {self.of!r}")
        if self.rounding not in ROUNDINGS:
            raise BudgetError(f"Keep.rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {self.rounding!r}")
        if self.of == "count":
            if self.value < 0 or int(self.value) != self.value:
                raise BudgetError(f"an absolute budget must be a non-negative integer, got {self.value}")
        elif not 0.0 <= self.value <= 1.0:
            raise BudgetError(f"a budget fraction must be in [0, 1], got {self.value}")

    @classmethod
    def fraction_of_original(cls, fraction: float, rounding: Rounding = "int") -> Keep:
        return cls(fraction, "original", rounding)

    @classmethod
    def fraction_of_current(cls, fraction: float, rounding: Rounding = "int") -> Keep:
        return cls(fraction, "current", rounding)

    @classmethod
    def count(cls, n: int) -> Keep:
        return cls(n, "count")

    def resolve(self, n_original: int, n_current: int) -> int:
        """Tokens to keep for a sample with `n_original` image tokens, `n_current` of them still present."""
        if self.of == "count":
            kept = int(self.value)
        else:
            base = n_original if self.of == "original" else n_current
            kept = round_budget(self.value * base, self.rounding)
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
