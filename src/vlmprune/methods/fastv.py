"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Rounding
from vlmprune.criteria import Attention, Criterion, RandomScore
from vlmprune.methods.base import OneStageMethod

__all__ = ["FastV"]


@dataclass
class FastV(OneStageMethod):
    """FastV: drop the image tokens that receive the least attention, once, before `layer`.

    Official code (pkunlp-icler/FastV): scores from layer `layer - 1`, the last token as query, softmax over
    the full sequence, mean over heads, RoPE applied, original positions kept. The paper's K is `layer`
    and its R is `ratio` (the fraction of image tokens dropped); its default is K=2, R=50%, its README demo
    K=3, R=75%. With `layer=0` the official code drops tokens at random (the paper's φrand, seeded by `seed`).

    Budget: `round(N · (1 − R))`, Python's round (halves to even), as the repository's llava-hf fork
    (`LlamaModel.fastv_forward`, the implementation that takes R as a ratio) does: 173 of 576 at R=0.7, where
    `int()` gives 172. The original fork takes the kept count itself (`keep`).

    Precision (`score_dtype="model"`): eager attention's q·kᵀ/√d in the model's dtype, softmax in float32 cast
    back to the model's dtype, then `torch.mean` over heads in that dtype, as the official code reads the
    attention map; `"float32"` scores in float32 instead.

    Query: the paper scores a token by the average attention it receives "from all other tokens"
    (`query="all"`, at the cost of a whole attention map); the code uses the last token (`"last"`, the
    default); `"text_mean"` averages over the text tokens after the image.
    """

    name: ClassVar[str] = "fastv"
    paper: ClassVar[str] = "FastV, Chen et al., ECCV 2024 (arXiv 2403.06764)"
    rounding: ClassVar[Rounding] = "round"

    layer: int = 2
    ratio: float = 0.5
    query: Literal["last", "text_mean", "all"] = "last"
    softmax: Literal["sequence", "image", "none"] = "sequence"
    rope: bool = True
    scoring: Literal["before", "after"] = "before"
    seed: int = 0
    full_map: bool = False  # score from the whole attention map, as the original eager code does (benchmarks)
    score_dtype: Literal["model", "float32"] = "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_dtype not in ("model", "float32"):
            raise ValueError(f"score_dtype must be 'model' or 'float32', got {self.score_dtype!r}")

    def criterion(self) -> Criterion:
        if self.layer == 0 and self.scoring == "before":
            return RandomScore(seed=self.seed)
        return Attention(
            query=self.query, softmax=self.softmax, rope=self.rope, full_map=self.full_map, score_dtype=self.score_dtype
        )
