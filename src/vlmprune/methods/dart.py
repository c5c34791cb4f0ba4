"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Rounding
from vlmprune.criteria import Criterion, PivotDissimilarity
from vlmprune.methods.base import OneStageMethod

__all__ = ["DART"]


@dataclass
class DART(OneStageMethod):
    """DART: before layer `layer`, keep the image tokens least similar to a few pivots (duplication-aware).

    Official code: ZichenWen1/DART, LLaVA `modeling_llama.py` (`get_retained_image_token` and the pruning branch of
    the decoder loop; see `PivotDissimilarity`). At layer K=2: pivots are the 4 image and 4 instruction tokens
    whose keys at layer K-1 have the largest L1 norm; each pivot in turn keeps the B/8 image tokens least
    cosine-similar to it (hidden states entering layer K, through the final norm), the image pivots kept too.
    Original positions are kept (`position_ids = keep_indexs`). No attention map is needed, so any backend works.

    Budget: B is the code's `max_num_trunction`, 128 for LLaVA-1.5 with `reduction_ratio` 0.778 (README
    `textvqa.sh 0.778 128`): here `round(N · (1 − ratio))`, 128 of 576, or `keep`, a count. The code keeps
    the 4 image pivots on top: 4 + 8 · 16 = 132 tokens.
    """

    name: ClassVar[str] = "dart"
    paper: ClassVar[str] = "DART, Wen et al., arXiv 2502.11494 (duplication-aware token reduction)"
    rounding: ClassVar[Rounding] = "round"

    layer: int = 2
    ratio: float = 0.778
    positions: Literal["original", "renumbered"] = "original"
    pivot_image: int = 4
    pivot_text: int = 4
    key_rope: bool = True
    final_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer < 1:
            raise ValueError(f"layer must be >= 1 (DART reads the keys of the layer before the cut), got {self.layer}")
        PivotDissimilarity(pivot_image=self.pivot_image, pivot_text=self.pivot_text)  # validates the pivots

    def criterion(self) -> Criterion:
        return PivotDissimilarity(
            pivot_image=self.pivot_image, pivot_text=self.pivot_text, key_rope=self.key_rope, final_norm=self.final_norm
        )
