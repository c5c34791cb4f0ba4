"""Union of several criteria's picks (FEATHER's φ-R + φuniform)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmprune.criteria.base import Criterion, SelectionContext
from vlmprune.tensors import on_device

__all__ = ["Ensemble"]


@dataclass(frozen=True)
class Ensemble(Criterion):
    """Keeps the union of the tokens each member criterion picks with the stage budget.

    FEATHER's official rule keeps the union as it is: a token picked twice is kept once and the overlap is
    not refilled, so counts vary per sample. With `top_up=True` the union is filled, from the first ranked
    member's order, up to the sum of the members' own counts (the union's size had nothing overlapped), which
    gives every sample of a batch the same count.
    """

    members: tuple[Criterion, ...]
    top_up: bool = False

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an Ensemble needs at least one member criterion")
        object.__setattr__(self, "members", tuple(self.members))

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(m.requires for m in self.members))

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        picks = [m.select(ctx, budgets) for m in self.members]
        union = torch.stack(picks).any(dim=0)
        if not self.top_up:
            return union
        order = self.ranking(ctx)
        if order is None:
            raise ValueError("Ensemble(top_up=True) needs a member that ranks tokens (e.g. Attention)")
        counts = on_device(ctx.counts, union.device)
        target = torch.minimum(sum(p.sum(dim=1) for p in picks), counts)  # (batch,)
        missing = (target - union.sum(dim=1)).unsqueeze(1)
        # Walk the ranking: the first `missing` present tokens not yet kept are added.
        free = ~torch.gather(union, 1, order) & torch.gather(ctx.present, 1, order)
        added = free & (free.long().cumsum(dim=1) <= missing)
        return union | torch.zeros_like(union).scatter(1, order, added)

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int] | None:
        if not self.top_up:
            return None  # the union's size depends on how the members' picks overlap
        member_counts = [m.counts(ctx, budgets) for m in self.members]
        if any(c is None for c in member_counts):
            return None
        return [min(sum(per_member), n) for *per_member, n in zip(*member_counts, ctx.counts, strict=True)]

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        """The members' counts if filled up; otherwise the union's size with the members' picks independent.

        FEATHER on 729 tokens at R=0.7: 218 by attention ∪ 81 on the grid ≈ 275 (the paper reports ≈270).
        """
        counts = [m.expected_count(budget, n_present, n_original, grids) for m in self.members]
        if self.top_up:
            return float(min(sum(counts), n_present))
        missed = 1.0
        for count in counts:
            missed *= 1.0 - count / n_present
        return n_present * (1.0 - missed)

    def ranking(self, ctx: SelectionContext) -> torch.Tensor | None:
        return next((r for r in (m.ranking(ctx) for m in self.members) if r is not None), None)
