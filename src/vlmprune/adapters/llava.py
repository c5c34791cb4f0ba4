"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed square grid of patch tokens per image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from vlmprune.adapters.base import ModelAdapter, vit_attention, vit_keys
from vlmprune.errors import UnsupportedModelError

__all__ = ["LlavaAdapter"]


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 layout: each `<image>` placeholder expands to (image_size / patch_size)² tokens, in raster order.

    Image tokens are the positions of `config.image_token_id`; a run of k·side² consecutive image tokens is k
    images. The vision features before the projector are the CLIP layer `vision_feature_layer` patch states.
    A tower without [CLS] (SigLIP) is accepted with `vision_feature_select_strategy="full"` (every token is a
    patch).

    Vision-encoder attention (VisPruner's importance, official `clip_encoder.py`/`siglip_encoder.py`): with
    [CLS], its attention row at the layer whose output is the features (`vision_feature_layer`: CLIP's
    penultimate layer for LLaVA-1.5), patch columns only; without [CLS], the mean attention each token receives
    at the tower's last layer. Both averaged over heads.
    """

    family: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.has_cls = hasattr(self._vision_transformer.embeddings, "class_embedding")
        strategy = config.vision_feature_select_strategy
        if strategy != "default" and not (strategy == "full" and not self.has_cls):
            raise UnsupportedModelError(
                "vlmprune supports LLaVA with vision_feature_select_strategy='default' (patch tokens only), or "
                f"'full' on a vision tower without [CLS] (SigLIP), got {strategy!r}"
            )
        self._drop_first_column = strategy == "default"
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.image_token_id = int(config.image_token_id)

    @property
    def vision_feature_module(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def _vision_transformer(self) -> nn.Module:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)  # transformers 5.6 dropped CLIPVisionModel's inner level

    @property
    def vision_attention_layer(self) -> nn.Module | None:
        layers = self._vision_transformer.encoder.layers
        if not self.has_cls:
            return layers[-1]
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            return None  # features concatenated from several layers: no one layer's [CLS] speaks for them
        # hidden_states[i] is the output of layer i - 1 (hidden_states[0] the embeddings)
        index = len(layers) + feature_layer if feature_layer < 0 else feature_layer - 1
        return layers[index] if 0 <= index < len(layers) else None

    def vision_attention(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: Mapping[str, Any]) -> torch.Tensor:
        received = vit_attention(layer, hidden, "first" if self.has_cls else "mean")
        return received[:, 1:] if self._drop_first_column else received

    def vision_keys(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: Mapping[str, Any]) -> torch.Tensor:
        keys = vit_keys(layer, hidden)
        return keys[:, 1:] if self._drop_first_column else keys

    def image_token_mask(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return inputs["input_ids"] == self.image_token_id

    def image_grids(self, image_counts: list[int], inputs: Mapping[str, Any]) -> list[list[tuple[int, int]]]:
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
