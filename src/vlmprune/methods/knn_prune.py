"""Density-peak pruning on vision features: FEATHER's φKNN ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.criteria import Criterion, KnnDensity
from vlmprune.methods.base import OneStageMethod

__all__ = ["KnnPrune"]

OFFICIAL_KEEP = 196  # `sample_cluster_196_1`: FEATHER's φKNN keeps 196 tokens


@dataclass
class KnnPrune(OneStageMethod):
    """Keep the image tokens that are density peaks of the vision features (DPC-KNN), once, before `layer`.

    FEATHER (arXiv 2412.13180) ablates φKNN at K=3 and K=8: the top 196 tokens (of 729) by ρ·δ of DPC-KNN on
    the vision encoder's patch features before the projector, with k=5 neighbours, shrunk to
    `min(3, max(c // 2, 1))` when fewer than k tokens are kept (official code `sample_cluster_196_1`,
    `base_vision.py::FastVPatchCluster`, `patch_cluster.py::cluster_dpc_knn`). See `KnnDensity`.

    The official budget is a count, so the default is `keep=196` (196 of 576 on LLaVA-1.5). A fraction is the
    option: `keep=None, ratio=R` keeps `int(N · (1 − R))`. Giving both is refused, since `keep` would win.
    """

    name: ClassVar[str] = "knn"
    paper: ClassVar[str] = "φKNN ablation of FEATHER, Endo et al., ICCV 2025 (arXiv 2412.13180)"

    layer: int = 3
    ratio: float | None = None
    keep: int | None = OFFICIAL_KEEP
    k: int = 5

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.ratio is None):
            given = "both" if self.keep is not None else "neither"
            raise ValueError(
                f"knn takes keep (a count; the official {OFFICIAL_KEEP} by default) or ratio, got {given} "
                f"(keep={self.keep}, ratio={self.ratio}); for a fraction pass keep=None with ratio"
            )
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k (neighbours per density estimate) must be >= 1, got {self.k}")

    def criterion(self) -> Criterion:
        return KnnDensity(k=self.k)
