"""Matching methods at equal compute: the value of a method's budget knob that gives a target FLOPs reduction."""

from __future__ import annotations

from dataclasses import replace

from vlmprune.cost.flops import Formula, estimate
from vlmprune.cost.schedule import TokenSchedule
from vlmprune.cost.shapes import ModelShape
from vlmprune.errors import BudgetError, VlmpruneError
from vlmprune.methods.base import Method

__all__ = ["COUNT_KNOBS", "KNOBS", "match_flops"]

# the parameter that trades compute for accuracy, and the values it may take
KNOBS: dict[str, tuple[str, float, float]] = {
    "fastv": ("ratio", 0.0, 0.99),
    "feather": ("ratio", 0.0, 0.99),
    "random": ("ratio", 0.0, 0.99),
    "knn": ("ratio", 0.0, 0.99),
    "uniform": ("ratio", 0.0, 0.99),
    "pdrop": ("lam", 0.01, 0.99),
    "btp": ("scale", 0.01, 12.0),  # up to every stage but the last keeping all
    "vispruner": ("ratio", 0.0, 0.99),
    "fastervlm": ("ratio", 0.0, 0.99),
    "divprune": ("ratio", 0.0, 0.99),
    "dart": ("ratio", 0.0, 0.99),
    "cdpruner": ("ratio", 0.0, 0.99),
    "visionzip": ("ratio", 0.0, 0.99),
}
# knobs that take whole numbers, each tried: (parameter, smallest, largest or None for the shape's image tokens)
COUNT_KNOBS: dict[str, tuple[str, int, int | None]] = {
    "pooling": ("size", 1, 8),  # the window's side: 1 keeps every token
    "sparsevlm": ("keep", 1, None),  # the budget its schedule is scaled to
}


def match_flops(
    method: Method, shape: ModelShape, target_reduction: float, *, formula: Formula = "paper", text_tokens: float = 0.0
) -> Method:
    """`method` with its budget knob set so that its projected prefill FLOPs reduction is closest to the target.

    The knob is scanned in steps of 0.01, then in steps of 0.001 around the best value (the reduction moves one
    way with the knob, so the closest 0.001 step lies there), so the match is within a fraction of a percentage
    point wherever the method can reach the target.
    """
    if method.name in COUNT_KNOBS:
        return _match_count(method, shape, target_reduction, formula, text_tokens)
    if method.name not in KNOBS:
        raise VlmpruneError(f"no budget knob known for {method.name!r}; matchable: {', '.join(KNOBS | COUNT_KNOBS)}")
    knob, low, high = KNOBS[method.name]
    if method.name == "uniform":
        method = replace(method, stride=None)  # a fixed stride ignores the budget
    # token counts and explicit fractions override the knob being matched: drop them with each candidate
    overrides = {f: None for f in ("keep", "keep_fractions") if getattr(method, f, None) is not None}

    def scan(steps: range) -> tuple[int | None, Method, float]:
        best_step, best, best_gap = None, method, float("inf")
        for i in steps:
            try:
                candidate = replace(method, **overrides, **{knob: round(low + 0.001 * i, 3)})
                reduction = estimate(shape, TokenSchedule.from_method(candidate, shape, text_tokens), formula).reduction
            except (BudgetError, ValueError):
                continue
            if abs(reduction - target_reduction) < best_gap:
                best_step, best, best_gap = i, candidate, abs(reduction - target_reduction)
        return best_step, best, best_gap

    last = round((high - low) / 0.001)  # a coarse scan at 0.01, refined at 0.001 around its best
    coarse, _, _ = scan(range(0, last + 1, 10))
    if coarse is None:
        return method
    return scan(range(max(0, coarse - 10), min(last, coarse + 10) + 1))[1]


def _match_count(
    method: Method, shape: ModelShape, target_reduction: float, formula: Formula, text_tokens: float
) -> Method:
    """`method` with its whole-number knob (`COUNT_KNOBS`) at the value whose reduction is closest to the target."""
    knob, low, high = COUNT_KNOBS[method.name]
    best, best_gap = method, float("inf")
    for value in range(low, (shape.image_tokens if high is None else high) + 1):
        try:
            candidate = replace(method, **{knob: value})
            reduction = estimate(shape, TokenSchedule.from_method(candidate, shape, text_tokens), formula).reduction
        except (BudgetError, ValueError):
            continue
        if abs(reduction - target_reduction) < best_gap:
            best, best_gap = candidate, abs(reduction - target_reduction)
    return best
