"""Density-peak pruning on vision features: FEATHER's φKNN ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria import KnnDensity
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["KnnPrune"]


@dataclass
class KnnPrune(Method):
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
    positions: Literal["original", "renumbered"] = "original"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of image tokens dropped) must be in [0, 1), got {self.ratio}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (0 = before the LLM), got {self.layer}")
        if self.k < 1:
            raise ValueError(f"k (neighbours per density estimate) must be >= 1, got {self.k}")
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")

    def stages(self) -> list[Stage]:
        return [
            Stage(
                layer=self.layer,
                criterion=KnnDensity(k=self.k),
                budget=Keep.fraction_of_original(1.0 - self.ratio),
                positions=self.positions,
            )
        ]
