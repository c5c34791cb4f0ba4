"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", NeurIPS 2025, arXiv 2506.10967)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.criteria import ConditionalDPP, Criterion
from vlmprune.methods.base import PreLLMMethod

__all__ = ["CDPruner"]


@dataclass
class CDPruner(PreLLMMethod):
    """CDPruner: the image tokens a determinantal point process conditioned on the instruction picks, before the LLM.

    Official code: Theia-4869/CDPruner (`9541616`), `llava/model/llava_arch.py::encode_images` (kernel and greedy
    MAP inference, see `ConditionalDPP`) with `multimodal_encoder/clip_encoder.py` (the relevance embeddings).
    The kernel is the projected features' cosine similarity weighted on both sides by each token's relevance to
    the instruction; greedy MAP inference picks `keep` tokens, which stay in order with consecutive positions (the
    projected features are masked). Defaults: T = 128 (README `gqa.sh 128`; 64 and 32 also reported).

    Relevance: the official LLaVA code compares CLIP's projected image embeddings with the CLIP text tower's
    embedding of the question; LLaVA checkpoints carry no CLIP text tower, so here both sides are the language
    model's input embeddings (the image rows and the text after the image). `negate_relevance` keeps the code's
    sign (minus the mean cosine); `theta` is its commented-out exponential weighting.
    """

    name: ClassVar[str] = "cdpruner"
    paper: ClassVar[str] = "CDPruner, Zhang et al., NeurIPS 2025 (arXiv 2506.10967)"

    negate_relevance: bool = True
    theta: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ConditionalDPP(negate_relevance=self.negate_relevance, theta=self.theta)  # validates theta

    def criterion(self) -> Criterion:
        return ConditionalDPP(negate_relevance=self.negate_relevance, theta=self.theta)
