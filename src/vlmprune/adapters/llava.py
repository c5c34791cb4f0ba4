"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed square grid of patch tokens per image."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from vlmprune.adapters.base import ModelAdapter
from vlmprune.errors import UnsupportedModelError

__all__ = ["LlavaAdapter"]


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 layout: each `<image>` placeholder expands to (image_size / patch_size)² tokens, in raster order.

    Image tokens are the positions of `config.image_token_id`; a run of k·side² consecutive image tokens is k
    images. The vision features before the projector are the CLIP layer `vision_feature_layer` patch states.
    """

    family: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                "vlmprune supports LLaVA with vision_feature_select_strategy='default' (patch tokens only), "
                f"got {config.vision_feature_select_strategy!r}"
            )
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.image_token_id = int(config.image_token_id)

    @property
    def multimodal_module(self) -> nn.Module:
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_feature_module(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id

    def image_grids(self, image_counts: list[int], forward_kwargs: dict) -> list[list[tuple[int, int]]]:
        per_image = self.grid[0] * self.grid[1]
        grids = []
        for count in image_counts:
            if count % per_image:
                raise UnsupportedModelError(
                    f"a sample has {count} image tokens, not a multiple of the {per_image} tokens of one "
                    f"{self.grid[0]}x{self.grid[1]} LLaVA image"
                )
            grids.append([self.grid] * (count // per_image))
        return grids
