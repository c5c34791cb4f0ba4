"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025, arXiv 2412.01818)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlmprune.criteria import Criterion, ImportantDiverse
from vlmprune.methods.base import PreLLMMethod

__all__ = ["VisPruner"]


@dataclass
class VisPruner(PreLLMMethod):
    """VisPruner: important tokens by the vision encoder's attention, then diverse ones, before the language model.

    Official code: Theia-4869/VisPruner `llava/model/llava_arch.py::encode_images` and
    `multimodal_encoder/clip_encoder.py` (see `ImportantDiverse` for the selection rules). Of a budget of
    `keep` = T image tokens per prompt, `int(T·important_ratio)` are the tokens the [CLS] query attends to most at
    the vision layer whose output is the features (CLIP's layer -2 on LLaVA-1.5; the mean attention received
    at the last layer for a tower without [CLS], SigLIP), averaged over heads; the rest are chosen by iterative
    de-duplication of the remaining tokens' pre-projector features (even/odd split of the list, at most 8
    most-duplicated dropped per round). Defaults T=128 of 576 and r=0.5, the paper's main LLaVA-1.5 setting
    (`vqav2.sh 128 0.5`).

    Qwen2-VL, Qwen2.5-VL and Qwen3-VL (towers without [CLS] whose 2x2 patches are merged into one token; not in
    the official code): the rule the author gives for them (VisPruner issue #1, "apply the same merging operation
    [as PatchMerger] to the attention"): the mean attention each patch receives from its image's patches at the
    tower's last layer (Qwen2.5-VL: its last full-attention layer, the windowed ones seeing only a window),
    averaged over heads and then over each 2x2 merge group; the de-duplication features are the merger's input
    averaged over each group the same way (`vlmprune.adapters.qwen_vl`).

    Pruning happens before the language model (a stage at layer 0): no decoder layer or KV-cache entry is spent
    on a dropped token. The vision tower and the projector still run on every image token, as in the official
    code (which masks the projected features). The kept tokens stay in raster order and, as in the official
    code, their positions are renumbered consecutively (`positions="original"` keeps each one's position id).

    Budget: `keep` counts a prompt's image tokens together; with several images in one prompt the selection
    ranks all of them at once (the official code prunes each image, or LLaVA-NeXT crop, to T on its own). Give
    `ratio` (the fraction of image tokens dropped) with `keep=None` instead of a count.
    """

    name: ClassVar[str] = "vispruner"
    paper: ClassVar[str] = "VisPruner, Zhang et al., ICCV 2025 (arXiv 2412.01818)"

    important_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {self.important_ratio}")

    def criterion(self) -> Criterion:
        return ImportantDiverse(important_ratio=self.important_ratio)
