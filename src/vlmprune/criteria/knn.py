"""Density peaks of the vision features (DPC-KNN): FEATHER's φKNN."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from vlmprune.criteria.base import ScoredCriterion, SelectionContext

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

    The official code adds uniform noise of 1e-6 to ρ to break ties; here "denser" compares (ρ, −index)
    lexicographically instead, so on equal densities the earlier token counts as denser and the result is
    deterministic.
    """

    k: int = 5
    delta_fallback: Literal["global", "row"] = "global"

    requires: ClassVar[frozenset[str]] = frozenset({"vision_features"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k (neighbours per density estimate) must be >= 1, got {self.k}")
        if self.delta_fallback not in ("global", "row"):
            raise ValueError(f"delta_fallback must be 'global' or 'row', got {self.delta_fallback!r}")

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        return [self._score(x) for x in ctx.vision_features()]

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C) features -> (n,) float32 scores ρ·δ."""
        n, channels = x.shape
        if n == 0:
            return x.new_zeros(0, dtype=torch.float32)
        x = x.float()
        d = torch.cdist(x, x) / math.sqrt(channels)
        nearest = torch.topk(d, min(self.k, n), dim=-1, largest=False).values
        density = torch.exp(-(nearest**2).mean(dim=-1))
        index = torch.arange(n, device=x.device)
        # denser[i, j]: token j is denser than token i, ties going to the lower index.
        denser = (density[None, :] > density[:, None]) | (
            (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
        )
        # Every d_ij is at most the fallback, so it only wins for the densest token.
        fallback = d.max() if self.delta_fallback == "global" else d.max(dim=-1, keepdim=True).values
        delta = torch.where(denser, d, fallback).min(dim=-1).values
        return density * delta
