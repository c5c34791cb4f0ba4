"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP crops with anyres_max, several images, videos."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlmprune.adapters.llava_next import LlavaNextAdapter, VisualItem, _host_list, _pooled

__all__ = ["LlavaOnevisionAdapter"]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision layout, as `LlavaOnevisionModel` packs images and videos.

    Images: as LLaVA-NeXT's (`LlavaNextAdapter`: a base crop, then the crops' unpadded big grid with a newline after
    each row), except that an unpadded grid larger than `vision_aspect_ratio` ("anyres_max_N": N crops' worth of
    patches) by a factor r > 1.1 in area's square root is interpolated down (bilinear) to (rows // r, cols // r).
    An image of a sample with several images is one crop, its side² tokens followed by one newline.

    Videos (`<video>` placeholders): each frame is one crop whose patches are pooled (bilinear) to a
    ceil(side/2)² grid; a video's tokens are its frames' grids in order, then one newline. Every frame is a grid of
    its own, so a global budget prunes across the frames of a sample and `budget_scope="per_image"` frame by frame;
    every method runs on videos.

    Vision cues: SigLIP has no [CLS], so the vision-encoder attention is the mean attention each patch receives at
    the tower's last layer (VisPruner's rule for such encoders). Where the language model's tokens are
    interpolated (anyres_max, video pooling), the vision features and attention of the crop's patches go through the
    same interpolation (`interpolate` for images, the model's own `apply_pooling` for videos): a token's cue is the
    bilinear blend of the patch cues its features were blended from, not one patch's.
    """

    family: ClassVar[str] = "llava-onevision"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
    image_arguments: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")

    def _token_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id, "video": int(self.model.config.video_token_id)}

    def _items(self, inputs: Mapping[str, Any]) -> dict[str, list[VisualItem]]:
        return {"image": self._image_items(inputs), "video": self._video_items(inputs)}

    def _image_items(self, inputs: Mapping[str, Any]) -> list[VisualItem]:
        """Images in batch order; a sample with several images has them unpatched (`batch_num_images`)."""
        sizes = inputs.get("image_sizes")
        if sizes is None or inputs.get("pixel_values") is None:
            pooled = _pooled(inputs, "image")
            return [] if pooled is None else self._items_from_pooled(list(pooled))
        sizes = _host_list(sizes)
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            patched = [True] * len(sizes)
        else:
            patched = [n == 1 for n in _host_list(per_sample) for _ in range(n)]
        return [self._image_item(tuple(size), p) for size, p in zip(sizes, patched, strict=True)]

    def _video_items(self, inputs: Mapping[str, Any]) -> list[VisualItem]:
        """Videos in batch order, from `pixel_values_videos` (videos, frames, ...) or their packed features."""
        pooled_side = math.ceil(self.side / 2)
        pixels = inputs.get("pixel_values_videos")
        if pixels is not None:
            videos, frames = pixels.shape[:2]
        else:
            pooled = _pooled(inputs, "video")
            if pooled is None:
                return []
            videos, frames = pooled.shape[0], (pooled.shape[1] - 1) // pooled_side**2
        grids = ((pooled_side, pooled_side),) * frames
        return [VisualItem("video", grids, "end", crops=frames) for _ in range(videos)]  # one object each

    def _resized(self, rows: int, cols: int) -> tuple[int, int]:
        """anyres_max: the grid interpolated down to about N crops' patches when it is more than 1.1 times larger."""
        max_crops = int(self.model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * self.side**2))
        return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)

    def _resize_features(self, grid: torch.Tensor) -> torch.Tensor:
        rows, cols = self._resized(*grid.shape[:2])
        if (rows, cols) == tuple(grid.shape[:2]):
            return grid
        planes = grid.permute(2, 0, 1)[None]  # as the model interpolates: (1, channels, rows, cols), bilinear
        return F.interpolate(planes, [rows, cols], mode="bilinear")[0].permute(1, 2, 0)

    def _map_features(self, item: VisualItem, crops: torch.Tensor) -> torch.Tensor:
        if item.kind == "video":  # (frames, side², channels) pooled as the model pools its projected features
            return self.model.model.apply_pooling(crops).reshape(-1, crops.shape[-1])
        return super()._map_features(item, crops)
