"""Density peaks of the vision features (DPC-KNN): FEATHER's φKNN."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vlmprune.criteria.base import ScoredCriterion, SelectionContext, keep_top
from vlmprune.tensors import on_device

__all__ = ["KnnDensity"]


@dataclass(frozen=True)
class KnnDensity(ScoredCriterion):
    """Scores tokens as density peaks of the vision features: FEATHER's φKNN (arXiv 2412.13180).

    DPC-KNN as in FEATHER's `patch_cluster.py::cluster_dpc_knn` (from Chat-UniVi), on the vision encoder's
    features before the projector, x of shape (n, C), in float32:

    - d_ij = ‖x_i − x_j‖ / √C;
    - ρ_i = exp(−mean of the k smallest d_ij²), the token itself (d_ii = 0) included, as the official
      `topk(largest=False)` over the full row does; with fewer than k tokens present, all of them are used;
    - δ_i = min d_ij over the tokens j denser than i; the densest token has none and takes the global max of
      d (`delta_fallback="global"`, the code) or its own row's max (`"row"`, the paper);
    - score = ρ·δ: high for tokens that are dense and far from any denser token (cluster centres).

    With `shrink_k` (the official `FastVPatchCluster.forward`), a stage that keeps fewer tokens than k uses
    `min(3, max(c // 2, 1))` neighbours instead, c being the sample's budget: 5 neighbours down to a budget of 5,
    then 2, 2, 1, 1 for budgets 4 to 1. `scores` and `ranking`, which know no budget, use k.

    The official code adds uniform noise of 1e-6 to ρ to break ties; here "denser" compares (ρ, −index)
    lexicographically instead, so on equal densities the earlier token counts as denser and the result is
    deterministic.
    """

    k: int = 5
    delta_fallback: Literal["global", "row"] = "global"
    shrink_k: bool = True

    requires: ClassVar[frozenset[str]] = frozenset({"vision_features"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k (neighbours per density estimate) must be >= 1, got {self.k}")
        if self.delta_fallback not in ("global", "row"):
            raise ValueError(f"delta_fallback must be 'global' or 'row', got {self.delta_fallback!r}")

    def neighbours(self, budget: int) -> int:
        """Neighbours per density estimate for a budget of `budget` tokens (the official shrink, if `shrink_k`)."""
        if self.shrink_k and self.k > budget:
            return min(3, max(budget // 2, 1))
        return self.k

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        scores = self._scores(ctx, [self.neighbours(b) for b in budgets])
        order = torch.sort(scores.masked_fill(~ctx.present, float("-inf")), dim=1, descending=True, stable=True)
        return keep_top(order.indices, ctx.budgets_tensor(budgets))

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """(batch, m) float32 scores ρ·δ of the present tokens, each sample among its own present tokens only."""
        return self._scores(ctx, [self.k] * ctx.batch_size)

    def _scores(self, ctx: SelectionContext, ks: list[int]) -> torch.Tensor:
        """As `scores`, sample b's density from its `ks[b]` nearest tokens (host integers)."""
        x = ctx.vision_features().float()  # (batch, m, C)
        batch, m, channels = x.shape
        if m == 0:
            return x.new_zeros(batch, 0)
        present = ctx.present
        d = torch.cdist(x, x) / math.sqrt(channels)  # (batch, m, m)
        # With fewer than k present tokens the padding columns come last as +inf and are not counted.
        nearest = torch.topk(d.masked_fill(~present[:, None, :], float("inf")), min(max(ks), m), dim=-1, largest=False)
        rank = torch.arange(nearest.values.shape[-1], device=x.device)
        counted = torch.isfinite(nearest.values) & (rank < on_device(ks, x.device)[:, None, None])
        squared = torch.where(counted, nearest.values, 0.0) ** 2
        density = torch.exp(-squared.sum(dim=-1) / counted.sum(dim=-1).clamp(min=1))
        index = torch.arange(m, device=x.device)
        # denser[b, i, j]: present token j is denser than token i, ties going to the lower index.
        denser = (density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])
        )
        denser &= present[:, None, :]
        # Every d_ij is at most the fallback, so it only wins for the densest token.
        real = d.masked_fill(~present[:, None, :], float("-inf"))
        if self.delta_fallback == "global":
            fallback = real.masked_fill(~present[:, :, None], float("-inf")).amax(dim=(1, 2))[:, None, None]
        else:
            fallback = real.amax(dim=-1, keepdim=True)
        delta = torch.where(denser, d, fallback).min(dim=-1).values
        return density * delta
