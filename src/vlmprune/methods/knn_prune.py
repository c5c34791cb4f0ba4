"""Density-peak pruning on vision features: FEATHER's φKNN ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.criteria import Criterion, KnnDensity
from vlmprune.methods.base import OneStageMethod

__all__ = ["KnnPrune"]


@dataclass
class KnnPrune(OneStageMethod):
    """Keep the image tokens that are density peaks of the vision features (DPC-KNN), once, before `layer`.

    FEATHER (arXiv 2412.13180) ablates φKNN at K=3 and K=8: the top 196 of 729 tokens (ratio ≈ 0.73) by
    ρ·δ of DPC-KNN on the vision encoder's patch features before the projector, with k=5 neighbours
    (official code `sample_cluster_196_1`, `patch_cluster.py::cluster_dpc_knn`). See `KnnDensity`.
    """

    name: ClassVar[str] = "knn"
    paper: ClassVar[str] = "φKNN ablation of FEATHER, Endo et al., ICCV 2025 (arXiv 2412.13180)"

    layer: int = 3
    ratio: float = 0.75
    k: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k (neighbours per density estimate) must be >= 1, got {self.k}")

    def criterion(self) -> Criterion:
        return KnnDensity(k=self.k)
