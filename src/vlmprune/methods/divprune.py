"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025,
arXiv 2503.02175)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.budget import Rounding
from vlmprune.criteria import Balanced, Criterion
from vlmprune.methods.base import PreLLMMethod

__all__ = ["DivPrune"]


@dataclass
class DivPrune(PreLLMMethod):
    """DivPrune: the most diverse image tokens, by greedy max-min distance, chosen before the language model.

    Official code: vbdi/divprune (`799e2d9`), `LLaVA/llava/model/llava_arch.py` (`DivPrune`,
    `pairwise_cosine_similarity`, the `LAYER_INDEX == '0'` branch of `prepare_inputs_labels_for_multimodal`). On
    the image rows of the language model's input embeddings (the projected features), with distance
    1 - cosine similarity, it solves the Max-Min Diversity Problem greedily: the first token is the one whose
    nearest other token is farthest, each next one the token farthest from its nearest chosen token. This is the
    diversity step of BTP (`Balanced` with its whole budget on diversity, `max_min_picks`), one criterion. The
    kept rows stay in order; the language model computes consecutive positions for them (it gets no
    `position_ids`).

    Budget: the official `SUBSET_RATIO` keeps `int(round(ratio · N))` tokens, default 0.098 (56 of 576, the
    paper's "TFLOP ratio 15%" setting): here `ratio` is the fraction dropped, 0.902, rounded the same way; or
    `keep`, a count. Ties go to the earlier token, as `argmax` does. Several images in one prompt are chosen
    from together (the official LLaVA-1.5 path has one image).
    """

    name: ClassVar[str] = "divprune"
    paper: ClassVar[str] = "DivPrune, Alvar et al., CVPR 2025 (arXiv 2503.02175)"
    rounding: ClassVar[Rounding] = "round"

    keep: int | None = None
    ratio: float | None = 0.902

    def criterion(self) -> Criterion:
        return Balanced(attention=0.0, diversity=1.0)
