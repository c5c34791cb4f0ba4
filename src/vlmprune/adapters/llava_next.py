"""LLaVA-NeXT (LLaVA-1.6, `LlavaNextForConditionalGeneration`): any-resolution crops, unpadding, row-end newlines."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vlmprune.adapters.llava import LlavaAdapter
from vlmprune.errors import UnsupportedModelError

__all__ = ["LlavaNextAdapter", "VisualItem"]


@dataclass(frozen=True)
class VisualItem:
    """One image (or video) of a prompt as the language model sees it.

    Attributes:
        kind: "image" or "video" (which placeholder id its tokens carry).
        grids: (rows, cols) of each grid of prunable tokens, in token order (LLaVA-NeXT: the base image, then the
            unpadded big grid of the crops; a video: one per frame).
        newlines: where its newline tokens are, which are never pruned: "rows" after each row of the last grid,
            "end" one after every grid, "none" nowhere.
        crops: vision-encoder inputs (crops, frames) it consumed.
        crop_grid: (crop rows, crop cols) of the any-resolution crops after the base image; None without them.
        unpadded: (top, left, rows, cols) of the unpadded region in the crops' big grid of patches.
    """

    kind: Literal["image", "video"]
    grids: tuple[tuple[int, int], ...]
    newlines: Literal["rows", "end", "none"]
    crops: int
    crop_grid: tuple[int, int] | None = None
    unpadded: tuple[int, int, int, int] | None = None

    @property
    def n_prunable(self) -> int:
        return sum(rows * cols for rows, cols in self.grids)

    @property
    def n_tokens(self) -> int:
        """Placeholder tokens in the prompt: prunable tokens and newlines."""
        newlines = {"rows": self.grids[-1][0], "end": 1, "none": 0}[self.newlines]
        return self.n_prunable + newlines

    def prunable_pattern(self) -> torch.Tensor:
        """(n_tokens,) bool: which of its placeholder tokens are prunable (False at the newlines)."""
        pattern = [torch.ones(self.n_prunable, dtype=torch.bool)]
        if self.newlines == "rows":
            rows, cols = self.grids[-1]
            row = torch.ones(cols + 1, dtype=torch.bool)
            row[-1] = False
            pattern = [torch.ones(self.n_prunable - rows * cols, dtype=torch.bool), row.repeat(rows)]
        elif self.newlines == "end":
            pattern.append(torch.zeros(1, dtype=torch.bool))
        return torch.cat(pattern)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT layout, as `LlavaNextModel.pack_image_features` builds it from `image_sizes` and the config.

    Each image is encoded as a base crop (the whole image at `image_size`) and a (crop rows, crop cols) grid of
    crops of its best `image_grid_pinpoints` resolution. Its placeholder tokens are: the base crop's side² patch
    tokens (side = image_size / patch_size), then the crops' patches joined into one big (crop rows·side,
    crop cols·side) grid, cut back to the image's aspect ratio (`unpad_image`), in raster order with an
    `image_newline` token after each row. Every token carries `image_token_id`.

    Prunable image tokens: every patch token; the newlines are kept as text is. The grids of an image are
    `[(side, side), (unpadded rows, unpadded cols)]`, the true 2-D positions of its tokens.

    Where the layout comes from: `image_sizes` when the forward gets them (a direct call; `generate` on
    transformers that passes the pixels). Newer `generate` encodes the images first and hands the forward only the
    packed features (`mm_encoder_outputs`): the newline rows, exact copies of `image_newline`, then give each
    image's token count and unpadded grid (one read of the device), and its crops are found, for the criteria
    that read vision features, as the one crop layout whose projected features reproduce the packed ones.

    Vision features and attention (VisPruner, KNN) are per crop; each crop's patches are mapped onto the big grid
    as the model maps them, and the ones unpadding drops are dropped: one feature per prunable token.
    """

    family: ClassVar[str] = "llava-next"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)
    image_arguments: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: mapping vision-encoder attention to tokens may need the vision features (pre-encoded `generate`)
    attention_needs_features: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vision = model.config.vision_config
        self.side = vision.image_size // vision.patch_size

    # Layout ------------------------------------------------------------------------------------------------

    def _token_ids(self) -> dict[str, int]:
        """The placeholder id of each kind of visual input."""
        return {"image": self.image_token_id}

    def _items(self, inputs: Mapping[str, Any]) -> dict[str, list[VisualItem]]:
        """Per kind, every visual item of the batch in batch order."""
        return {"image": self._image_items(inputs)}

    def _image_items(self, inputs: Mapping[str, Any]) -> list[VisualItem]:
        """Every image of the batch, in batch order (one host read of `image_sizes`, as the model's own)."""
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            return [self._image_item(tuple(size)) for size in _host_list(sizes)]
        pooled = _pooled(inputs, "image")
        return [] if pooled is None else self._items_from_pooled(list(pooled))

    def _image_item(self, size: tuple[int, int], patched: bool = True) -> VisualItem:
        """An image of (height, width) `size` in pixels, split into crops as `get_image_features` does."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side, config = self.side, self.model.config
        if not patched:
            return VisualItem("image", ((side, side),), "end", crops=1)
        crop_rows, crop_cols = get_anyres_image_grid_shape(
            list(size), config.image_grid_pinpoints, config.vision_config.image_size
        )
        height, width = crop_rows * side, crop_cols * side
        rows, cols = unpad_image(torch.empty(0, height, width), list(size)).shape[1:]
        return self._crop_item(crop_rows, crop_cols, ((height - rows) // 2, (width - cols) // 2, rows, cols))

    def _crop_item(self, crop_rows: int, crop_cols: int, unpadded: tuple[int, int, int, int]) -> VisualItem:
        side = self.side
        return VisualItem(
            "image",
            ((side, side), self._resized(*unpadded[2:])),
            "rows",
            crops=1 + crop_rows * crop_cols,
            crop_grid=(crop_rows, crop_cols),
            unpadded=unpadded,
        )

    def _resized(self, rows: int, cols: int) -> tuple[int, int]:
        """The unpadded grid's size as the language model gets it (LLaVA-NeXT: unchanged)."""
        return rows, cols

    def _items_from_pooled(self, pooled: list[torch.Tensor]) -> list[VisualItem]:
        """Images from their packed features (n_k, hidden): newline rows are `image_newline` itself (one read).

        The crops are unknown here (`crops=0`); `_with_crops` finds them when vision features are needed.
        """
        if not pooled:
            return []
        newline = self.model.model.image_newline
        flat = torch.cat(list(pooled))
        is_newline = (flat == newline.to(flat.device, flat.dtype)).all(dim=-1).tolist()
        items, start, side = [], 0, self.side
        for features in pooled:
            n = features.shape[0]
            marks = is_newline[start : start + n]
            start += n
            rows = sum(marks)
            if n == side * side + 1 and marks[-1] and rows == 1:
                items.append(VisualItem("image", ((side, side),), "end", crops=1))
                continue
            cols = (n - side * side - rows) // max(rows, 1)
            item = VisualItem("image", ((side, side), (rows, cols)), "rows", crops=0)
            if rows == 0 or item.n_tokens != n or marks != item.prunable_pattern().logical_not().tolist():
                raise UnsupportedModelError(
                    f"an image's {n} packed features do not follow LLaVA-NeXT's layout (base crop, rows ending "
                    "in image_newline)"
                )
            items.append(item)
        return items

    def _per_sample(
        self, items: dict[str, list[VisualItem]], inputs: Mapping[str, Any], counts: list[int]
    ) -> list[list[VisualItem]]:
        """Per sample, its visual items (of `items`, per kind in batch order) in prompt order.

        With one kind of input in the batch, items go to samples in batch order, by each sample's prunable
        token count `counts` (host integers). With several kinds, each sample's count and span of each kind's
        placeholders are read from the device once; a sample's items of one kind must not be interleaved with
        its items of another.
        """
        items = {kind: found for kind, found in items.items() if found}
        if len(items) <= 1:
            return _walk(next(iter(items.values()), []), counts, "n_prunable")
        ids = inputs["input_ids"]
        token_ids = self._token_ids()
        columns = torch.arange(ids.shape[1], device=ids.device)
        stats = []
        for kind in items:
            mask = ids == token_ids[kind]
            first = torch.where(mask, columns, ids.shape[1]).amin(dim=1)
            last = torch.where(mask, columns, -1).amax(dim=1)
            stats += [mask.sum(dim=1), first, last]
        table = torch.stack(stats, dim=1).tolist()  # the one read
        per_kind = {
            kind: _walk(found, [row[3 * k] for row in table], "n_tokens")
            for k, (kind, found) in enumerate(items.items())
        }
        samples = []
        for b, row in enumerate(table):
            spans = sorted((row[3 * k + 1], row[3 * k + 2], kind) for k, kind in enumerate(items) if row[3 * k])
            if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)):
                raise UnsupportedModelError(
                    f"sample {b} interleaves images and videos; vlmprune supports a prompt's images all before or "
                    "all after its videos"
                )
            samples.append([item for *_, kind in spans for item in per_kind[kind][b]])
        return samples

    # Interface ---------------------------------------------------------------------------------------------

    def has_images(self, forward_kwargs: dict) -> bool:
        return super().has_images(forward_kwargs) or bool(forward_kwargs.get("mm_encoder_outputs"))

    def image_token_mask(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Placeholder tokens that are not newlines: each kind's flattened placeholders follow its items' patterns."""
        ids = inputs["input_ids"]
        prunable = torch.zeros_like(ids, dtype=torch.bool)
        for kind, items in self._items(inputs).items():
            if not items:
                continue
            placeholder = ids == self._token_ids()[kind]
            pattern = torch.cat([item.prunable_pattern() for item in items]).to(ids.device)
            # the model scatters the features into the placeholders of the whole batch in row-major order
            index = (placeholder.flatten().long().cumsum(0) - 1).clamp(0, pattern.numel() - 1)
            prunable |= placeholder & pattern[index].view_as(ids)
        return prunable

    def image_grids(self, image_counts: list[int], inputs: Mapping[str, Any]) -> list[list[tuple[int, int]]]:
        samples = self._per_sample(self._items(inputs), inputs, image_counts)
        return [[grid for item in items for grid in item.grids] for items in samples]

    def split_vision_features(
        self,
        features: torch.Tensor,
        n_image_tokens: list[int],
        inputs: Mapping[str, Any],
        vision_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per sample, (N_b, channels): each item's crop values mapped to its prunable tokens (`_map_features`).

        `features` stack the crops of every image of the batch (batch order), then the frames of every video.
        `vision_features`, the features themselves when `features` is something else split alike (attention),
        identify the crops of pre-encoded images (`_with_crops`).
        """
        items = self._items(inputs)
        # captures of encodings before this prompt's (none, unless the vision tower ran alone in the block) go first
        crops = self._encoded_crops(items, inputs)
        features = features[features.shape[0] - crops :]
        reference = features if vision_features is None else vision_features[vision_features.shape[0] - crops :]
        items["image"] = self._with_crops(items["image"], reference, inputs)
        offsets, start = {}, 0  # by object: `_per_sample` hands back these very items
        for kind in ("image", "video"):
            for item in items.get(kind, []):
                offsets[id(item)] = start
                start += item.crops
        out = []
        for sample in self._per_sample(items, inputs, n_image_tokens):
            parts = [
                self._map_features(item, features[offsets[id(item)] : offsets[id(item)] + item.crops])
                for item in sample
            ]
            out.append(torch.cat(parts) if parts else features.new_zeros(0, features.shape[-1]))
        return out

    def _encoded_crops(self, items: dict[str, list[VisualItem]], inputs: Mapping[str, Any]) -> int:
        """Crops and frames the vision encoder ran on for this prompt."""
        encoded = inputs.get("mm_encoder_outputs") or {}
        if encoded:
            return sum(output.last_hidden_state.shape[0] for output in encoded.values() if output is not None)
        return sum(item.crops for found in items.values() for item in found)

    def _with_crops(
        self, images: list[VisualItem], features: torch.Tensor, inputs: Mapping[str, Any]
    ) -> list[VisualItem]:
        """`images` with their crops found where the forward got packed features only.

        Each such image takes the first crop layout (pinpoint, unpadded side, padding) that gives its grids and whose
        features, through the projector and `_map_features`, reproduce its packed features; crops are taken in
        order, each image's after the previous one's.
        """
        if all(item.crops for item in images):
            return images
        pooled = list(_pooled(inputs, "image"))
        projector = self.model.model.multi_modal_projector
        found, start = [], 0
        for item, packed in zip(images, pooled, strict=True):
            if not item.crops:
                target = packed[item.prunable_pattern().to(packed.device)]
                with torch.no_grad():
                    item = next(
                        (
                            candidate
                            for candidate in self._crop_layouts(item.grids[-1])
                            if start + candidate.crops <= features.shape[0]
                            and torch.allclose(
                                # `forward`, not a call: the session's capture hook must not see these
                                self._map_features(
                                    candidate, projector.forward(features[start : start + candidate.crops])
                                ),
                                target.to(features.dtype),
                                rtol=1e-3,
                                atol=1e-4,
                            )
                        ),
                        None,
                    )
                if item is None:
                    raise UnsupportedModelError(
                        "no crop layout of the config's image_grid_pinpoints reproduces an image's packed features; "
                        "pass image_sizes to the forward"
                    )
            found.append(item)
            start += item.crops
        return found

    def _crop_layouts(self, grid: tuple[int, int]) -> list[VisualItem]:
        """Every crop layout whose unpadded (and resized) grid is `grid`: a pinpoint, and padding cut from its rows or
        columns, as `unpad_image` cuts it (the same on both ends)."""
        image_size = self.model.config.vision_config.image_size
        layouts = []
        for height, width in self.model.config.image_grid_pinpoints:
            crop_rows, crop_cols = height // image_size, width // image_size
            big_rows, big_cols = crop_rows * self.side, crop_cols * self.side
            cuts = (
                [(0, 0)] + [(p, 0) for p in range(1, big_rows // 2 + 1)] + [(0, p) for p in range(1, big_cols // 2 + 1)]
            )
            for top, left in cuts:
                unpadded = (top, left, big_rows - 2 * top, big_cols - 2 * left)
                if self._resized(*unpadded[2:]) == tuple(grid):
                    layouts.append(self._crop_item(crop_rows, crop_cols, unpadded))
        return layouts

    def _map_features(self, item: VisualItem, crops: torch.Tensor) -> torch.Tensor:
        """(item.n_prunable, channels) from (item.crops, side², channels): the base crop's patches, then the
        crops' patches on the big grid, unpadded, as `pack_image_features` arranges the projected ones."""
        side, channels = self.side, crops.shape[-1]
        if item.crop_grid is None:
            return crops.reshape(-1, channels)
        crop_rows, crop_cols = item.crop_grid
        top, left, rows, cols = item.unpadded
        big = crops[1:].reshape(crop_rows, crop_cols, side, side, channels).permute(0, 2, 1, 3, 4)
        big = big.reshape(crop_rows * side, crop_cols * side, channels)[top : top + rows, left : left + cols]
        return torch.cat([crops[0], self._resize_features(big).reshape(-1, channels)])

    def _resize_features(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows', cols', channels) the unpadded grid's features as the LLM's grid holds them (NeXT: unchanged)."""
        return grid


def _pooled(inputs: Mapping[str, Any], kind: str) -> Any:
    """The packed features of `kind` that `generate` encoded before the forward (`mm_encoder_outputs`), or None."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get(kind)
    return None if encoded is None else encoded.pooler_output


def _host_list(values: Any) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else [list(v) for v in values]


def _walk(items: Sequence[VisualItem], counts: list[int], measure: str) -> list[list[VisualItem]]:
    """`items` (batch order) grouped per sample: sample b takes the next items whose `measure` sums to counts[b]."""
    groups, i = [], 0
    for b, count in enumerate(counts):
        group, total = [], 0
        while total < count and i < len(items):
            group.append(items[i])
            total += getattr(items[i], measure)
            i += 1
        if total != count:
            raise UnsupportedModelError(
                f"sample {b} has {count} image tokens, which its images' grids "
                f"({', '.join(str(item.grids) for item in group)}) do not add up to; are `image_sizes` those the "
                "processor returned with these `input_ids`?"
            )
        groups.append(group)
    if i != len(items):
        raise UnsupportedModelError(f"the batch has {len(items)} images but its prompts' tokens hold only {i}")
    return groups
