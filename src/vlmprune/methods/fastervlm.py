"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818v1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.budget import Rounding
from vlmprune.criteria import Criterion, VisionAttention
from vlmprune.methods.base import PreLLMMethod

__all__ = ["FasterVLM"]


@dataclass
class FasterVLM(PreLLMMethod):
    """FasterVLM: the image tokens the vision encoder's [CLS] attends to most, chosen before the language model.

    Official code: Theia-4869/FasterVLM (`f5d5f12`), `llava/model/llava_arch.py::encode_images` with
    `multimodal_encoder/clip_encoder.py`: the [CLS] query's softmaxed attention to each patch at the vision layer
    whose output is the features (CLIP's layer -2 on LLaVA-1.5), averaged over heads, then `torch.topk(T)`; the
    projected features are masked, so the kept tokens stay in raster order with consecutive positions. That is
    VisPruner's importance score without its diversity step (`VisionAttention`).

    Budget: `keep` = T image tokens per prompt (default 144, the README's 75% example); or `ratio`, the fraction
    dropped, rounded to the nearest count as the README computes its budgets (90% of 576: 57.6 -> 58). The
    official code prunes each image (each LLaVA-NeXT crop) to T; here `keep` counts a prompt's image tokens
    together and ranks all of them at once. Ties go to the earlier token (`topk` leaves them to the backend).
    """

    name: ClassVar[str] = "fastervlm"
    paper: ClassVar[str] = "FasterVLM, Zhang et al., arXiv 2412.01818v1 ([CLS] attention)"
    rounding: ClassVar[Rounding] = "round"

    keep: int | None = 144

    def criterion(self) -> Criterion:
        return VisionAttention()
