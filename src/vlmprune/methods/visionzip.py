"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv 2412.04467)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.criteria import Criterion, DominantContextual
from vlmprune.criteria.base import MergeSpace
from vlmprune.methods.base import PreLLMMethod

__all__ = ["VisionZip"]


@dataclass
class VisionZip(PreLLMMethod):
    """VisionZip: dominant tokens by [CLS] attention plus a few contextual tokens merged from the rest, before the LLM.

    Official code: dvlab-research/VisionZip (`3151f6d`), `visionzip/clip_encoder.py` (`CLIPVisionTower_VisionZip.
    forward`), `visionzip/utils.py` (the feature layer's keys as the merging `metric`), `visionzip/main.py`
    (`visionzip(model, dominant=54, contextual=10)`). See `DominantContextual` for the rule. The first method here
    whose tokens are merged, not a subset: each contextual token is a weighted sum of the vision features of the
    tokens merged into it, projected again (the trace's `sources` lists them).

    Budget: `keep` = T tokens per prompt, of which `int(T · contextual_share)` contextual: 64 = 54 + 10 (README),
    128 = 108 + 20, 192 = 162 + 30, all with share 10/64; or `ratio`, the fraction dropped. The code's 54
    dominant include [CLS], which the language model does not get here (see `DominantContextual`). `space` is
    where contextual tokens are merged: "auto" (the vision features where the model can project them again, else
    the input embeddings: Qwen-VL), "vision_features" or "hidden".
    """

    name: ClassVar[str] = "visionzip"
    paper: ClassVar[str] = "VisionZip, Yang et al., CVPR 2025 (arXiv 2412.04467)"

    keep: int | None = 64
    contextual_share: float = 10 / 64
    space: MergeSpace = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        DominantContextual(contextual_share=self.contextual_share, space=self.space)  # validates the share

    def criterion(self) -> Criterion:
        return DominantContextual(contextual_share=self.contextual_share, space=self.space)
