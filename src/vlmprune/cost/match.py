"""Matching methods at equal compute: the value of a method's budget knob that gives a target FLOPs reduction."""

from __future__ import annotations

from dataclasses import replace

from vlmprune.cost.flops import Formula, estimate
from vlmprune.cost.schedule import TokenSchedule
from vlmprune.cost.shapes import ModelShape
from vlmprune.errors import BudgetError, VlmpruneError
from vlmprune.methods.base import Method

__all__ = ["KNOBS", "match_flops"]

# the parameter that trades compute for accuracy, and the values it may take
KNOBS: dict[str, tuple[str, float, float]] = {
    "fastv": ("ratio", 0.0, 0.99),
    "feather": ("ratio", 0.0, 0.99),
    "random": ("ratio", 0.0, 0.99),
    "knn": ("ratio", 0.0, 0.99),
    "uniform": ("ratio", 0.0, 0.99),
    "pdrop": ("lam", 0.01, 0.99),
    "vispruner": ("ratio", 0.0, 0.99),
}


def match_flops(
    method: Method, shape: ModelShape, target_reduction: float, *, formula: Formula = "paper", text_tokens: float = 0.0
) -> Method:
    """`method` with its budget knob set so that its projected prefill FLOPs reduction is closest to the target.

    The knob is scanned in steps of 0.001, so the match is within a fraction of
    a percentage point wherever the method can reach the target.
    """
    if method.name not in KNOBS:
        raise VlmpruneError(f"no budget knob known for {method.name!r}; matchable: {', '.join(KNOBS)}")
    knob, low, high = KNOBS[method.name]
    if method.name == "uniform":
        method = replace(method, stride=None)  # a fixed stride ignores the budget
    # a token count would override the ratio being matched (set together: VisPruner takes one or the other)
    overrides = {"keep": None} if getattr(method, "keep", None) is not None and knob == "ratio" else {}
    best, best_gap = method, float("inf")
    for i in range(round((high - low) / 0.001) + 1):
        value = round(low + 0.001 * i, 3)
        try:
            candidate = replace(method, **overrides, **{knob: value})
            reduction = estimate(shape, TokenSchedule.from_method(candidate, shape, text_tokens), formula).reduction
        except (BudgetError, ValueError):
            continue
        if abs(reduction - target_reduction) < best_gap:
            best, best_gap = candidate, abs(reduction - target_reduction)
    return best
