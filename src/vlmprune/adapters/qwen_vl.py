"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic image grids of 2x2-merged patches, 3-D M-RoPE positions, DeepStack.

Layout, as the models' own code defines it:
- Each image is `<|vision_start|>` + (t·h·w / merge²) `<|image_pad|>` tokens + `<|vision_end|>`, where (t, h, w)
  is its row of `image_grid_thw` (patches; t = 1 for an image) and merge = `spatial_merge_size` (2). Its grid of
  image tokens is (h / merge, w / merge), in raster order; images of one prompt, and of one batch, may differ in
  size. Video tokens (`<|video_pad|>`) are not pruned: they run as text, with a one-line notice.
- Positions are M-RoPE's (temporal, height, width) rows, (3, batch, seq), from the model's `get_rope_index`;
  `generate` passes a 4th, text-only, row first (4, batch, seq). Pruning with original positions keeps each kept
  token's (t, h, w); a decode step continues at the model's own next positions (the prompt's last position + 1 on
  every row, which `rope_deltas` encodes), never at the pruned cache's length.
- Renumbered positions (a method's `positions="renumbered"`) are defined for 3-D positions as the positions of a
  text-only prompt: each kept row's rank among the real rows, the same on all three axes (so the t/h/w structure
  of the kept image tokens is dropped, as 1-D renumbering drops a LLaVA token's place), and decoding continues
  at the next rank.
- Qwen3-VL's DeepStack: the decoder stack adds merged features of intermediate vision layers to its first layers'
  outputs at the visual positions. The adapter takes them off the stack's call (`take_layer_additions`) and the
  engine adds to each kept row its own token's addition after those layers.

Vision-encoder criteria (VisPruner, and any criterion that reads vision features or attention). The towers have no
[CLS] token and attend over each image's patches (packed, bounded by `cu_seqlens`), so the rule for encoders
without [CLS] is used on the merged grid (reference notes, vispruner-btp.md §1.2: "apply the same merging
operation [as PatchMerger] to the attention"): the attention each patch receives at the tower's last layer
(mean over the same image's queries and over heads), then the mean over each 2x2 merge group; the features are
the merger's input, averaged over each merge group in the same way. Qwen2.5-VL attends in windows except at its
`fullatt_block_indexes`: the attention is read at the last full-attention layer (the last layer in the released
models), and the window order of its patches is undone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from vlmprune.adapters.base import ModelAdapter
from vlmprune.errors import UnsupportedModelError

__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter", "QwenVLAdapter"]

_QUERY_CHUNK = 256  # vision query rows scored at once


class QwenVLAdapter(ModelAdapter):
    """Common layout of the Qwen-VL families (see the module docstring)."""

    # the patch merger takes 2x2 patch groups: one merged token's features cannot be projected alone
    projects_vision_features: ClassVar[bool] = False
    image_arguments: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
    computes_positions: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.merge = int(config.vision_config.spatial_merge_size)
        self._image_grid_thw: list[list[int]] = []  # the last prompt's (t, h, w) per image, for undoing windows

    @property
    def _visual(self) -> nn.Module:
        return self.model.model.visual

    @property
    def vision_feature_module(self) -> nn.Module:
        return self._visual.merger

    @property
    def vision_attention_layer(self) -> nn.Module | None:
        return self._visual.blocks[-1]

    # Image tokens ------------------------------------------------------------------------------------------

    def image_token_mask(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return inputs["input_ids"] == self.image_token_id

    def image_grids(self, image_counts: list[int], inputs: Mapping[str, Any]) -> list[list[tuple[int, int]]]:
        encoded = inputs.get("mm_encoder_outputs") or {}  # `generate` (transformers >= 5.2x) encodes videos first
        if inputs.get("video_grid_thw") is not None or encoded.get("video") is not None:
            warnings.warn(
                "vlmprune: video tokens are not pruned (no method defines video pruning); they run unpruned",
                stacklevel=2,
            )
        grid_thw = inputs.get("image_grid_thw")
        if grid_thw is None:  # `generate` (transformers >= 5.2x) encodes the images first and drops their grids
            return self._grids_from_positions(image_counts, inputs)
        self._image_grid_thw = grid_thw.tolist()
        frames = [(h // self.merge, w // self.merge) for t, h, w in self._image_grid_thw for _ in range(t)]
        grids, start = [], 0
        for b, count in enumerate(image_counts):
            sample, covered = [], 0
            while covered < count and start < len(frames):
                sample.append(frames[start])
                covered += frames[start][0] * frames[start][1]
                start += 1
            if covered != count:
                raise UnsupportedModelError(
                    f"sample {b} has {count} image tokens, which image_grid_thw's grids do not cover exactly"
                )
            grids.append(sample)
        return grids

    def _grids_from_positions(self, image_counts: list[int], inputs: Mapping[str, Any]) -> list[list[tuple[int, int]]]:
        """Each image's grid read off its tokens' M-RoPE positions: a run of image tokens is one image, its
        (t, h, w) positions span (frames, rows, cols); one host read for the batch."""
        positions = self.rope_position_ids(inputs["decoder_position_ids"])
        if positions.dim() != 3:
            raise UnsupportedModelError(f"{self.family} prompts need the model's 3-D positions or image_grid_thw")
        mask = self.image_token_mask(inputs)
        grid_thw: list[list[int]] = []
        grids = []
        for is_image, (t, h, w) in zip(mask.tolist(), positions.transpose(0, 1).tolist(), strict=True):
            sample, run = [], []
            for column, image in enumerate([*is_image, False]):
                if image:
                    run.append(column)
                elif run:
                    frames = len({t[c] for c in run})
                    rows = max(h[c] for c in run) - min(h[c] for c in run) + 1
                    cols = max(w[c] for c in run) - min(w[c] for c in run) + 1
                    sample += [(rows, cols)] * frames
                    grid_thw.append([frames, rows * self.merge, cols * self.merge])
                    run = []
            grids.append(sample)
        for b, (sample, count) in enumerate(zip(grids, image_counts, strict=True)):
            if sum(r * c for r, c in sample) != count:
                raise UnsupportedModelError(f"sample {b}'s image-token positions do not form whole grids")
        self._image_grid_thw = grid_thw
        return grids

    # Vision-encoder features and attention (merged grid) ---------------------------------------------------

    def vision_attention(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """(patches,) float32: the attention each patch receives from its own image's patches at `layer`, averaged
        over those queries and the heads; `split_vision_features` merges it to the token grid.

        `hidden` (patches, width) is the layer's packed input; images are bounded by `layer_kwargs["cu_seqlens"]`
        (a block-diagonal mask, so nothing waits for the device), rotary embeddings from its
        `position_embeddings`. Softmax in float32 over every key of the image, as eager attention gives it.
        """
        attn = layer.attn
        with torch.no_grad():
            n = hidden.shape[0]
            cos, sin = (t.float().unsqueeze(-2) for t in layer_kwargs["position_embeddings"])  # (n, 1, head_dim)
            qkv = attn.qkv(layer.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).float()
            keys = qkv[:, 1] * cos + _rotate_half(qkv[:, 1]) * sin  # (n, heads, head_dim)
            bounds = layer_kwargs["cu_seqlens"].to(hidden.device)
            image_of = torch.searchsorted(bounds[1:], torch.arange(n, device=hidden.device), right=True)
            received = keys.new_zeros(attn.num_heads, n)
            for start in range(0, n, _QUERY_CHUNK):
                rows = slice(start, start + _QUERY_CHUNK)
                q = qkv[rows, 0] * cos[rows] + _rotate_half(qkv[rows, 0]) * sin[rows]
                scores = torch.einsum("qhd,khd->hqk", q, keys) * attn.scaling
                same_image = image_of[rows, None] == image_of[None, :]
                received += torch.softmax(scores.masked_fill(~same_image, float("-inf")), dim=-1).sum(dim=1)
            queries = (bounds[1:] - bounds[:-1])[image_of]  # each patch's image's patch count
            return (received / queries).mean(dim=0)

    def vision_keys(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """(patches, head_dim) float32: `layer`'s keys of each patch before the rotary embedding, averaged over the
        heads (content only, as VisionZip's CLIP keys); `split_vision_features` merges them to the token grid."""
        attn = layer.attn
        with torch.no_grad():
            qkv = attn.qkv(layer.norm1(hidden)).reshape(hidden.shape[0], 3, attn.num_heads, -1)
            return qkv[:, 1].float().mean(dim=1)

    def split_vision_features(
        self,
        features: torch.Tensor,
        n_image_tokens: list[int],
        inputs: Mapping[str, Any],
        vision_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per sample, (N_b, channels): the per-patch rows averaged over each 2x2 merge group, in token order."""
        patches = features.reshape(-1, features.shape[-1])
        merged = patches.view(-1, self.merge**2, patches.shape[-1]).mean(dim=1)
        merged = merged[: sum(n_image_tokens)]  # a tower run on video too: its rows follow the images'
        return list(torch.split(self._token_order(merged), n_image_tokens))

    def _token_order(self, merged: torch.Tensor) -> torch.Tensor:
        """The tower's merged rows in image-token order (Qwen2.5-VL's windows undone)."""
        return merged

    # Positions -------------------------------------------------------------------------------------------

    def rope_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids[1:] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else position_ids

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        return None  # the stack hands its layers text positions only for packed sequences, which it never gets here

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rope_position_ids(position_ids)
        if rows.dim() == 2:  # text-like positions: the same on the three axes
            rows = rows.unsqueeze(0).expand(3, -1, -1)
        return self.text_model.rotary_emb(hidden, rows)

    def project(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        which: str,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        if position_embeddings is not None and position_embeddings[0].dim() == 4:
            # transformers < 5.x keeps one (cos, sin) per axis, (3, batch, rows, head_dim), and interleaves the
            # axes' frequency sections in the attention, as done here (`apply_multimodal_rotary_pos_emb`)
            sections = list(self.text_config.rope_parameters["mrope_section"]) * 2
            position_embeddings = tuple(
                torch.cat([part[i % 3] for i, part in enumerate(t.split(sections, dim=-1))], dim=-1)
                for t in position_embeddings
            )
        return super().project(layer, x, which, position_embeddings)

    def decode_position_ids(
        self,
        position_ids: torch.Tensor | None,
        inputs: Mapping[str, Any],
        batch: int,
        length: int,
        past: int | torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """Without the caller's positions or mask, the model derives a step's positions from the cache's length,
        which pruning before the LLM shortens: they are the prompt's length + `past` + `rope_deltas` instead."""
        deltas = getattr(self.model.model, "rope_deltas", None)
        if inputs.get("position_ids") is not None or inputs.get("attention_mask") is not None or deltas is None:
            return super().decode_position_ids(position_ids, inputs, batch, length, past, device)
        text = self.default_position_ids(batch, length, past, device)
        return (text + deltas.to(device).view(-1, 1)).unsqueeze(0).expand(3, -1, -1)


class Qwen2VLAdapter(QwenVLAdapter):
    family: ClassVar[str] = "qwen2-vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: the tower attends in windows except at `fullatt_block_indexes`, on patches in window order."""

    family: ClassVar[str] = "qwen2.5-vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)

    @property
    def vision_attention_layer(self) -> nn.Module | None:
        full = self._visual.fullatt_block_indexes
        return self._visual.blocks[max(full)] if full else None

    def _token_order(self, merged: torch.Tensor) -> torch.Tensor:
        return merged[torch.argsort(self._window_index().to(merged.device))]

    def _window_index(self) -> torch.Tensor:
        """(merged tokens,) the tower's window order of the last prompt's images (`get_window_index` of the model's
        code), computed on the host from their grids so that nothing waits for the device."""
        visual = self._visual
        side = visual.window_size // self.merge // visual.patch_size  # a window's side in merged tokens
        order, start = [], 0
        for t, h, w in self._image_grid_thw:
            rows, cols = h // self.merge, w // self.merge
            index = torch.arange(t * rows * cols).view(t, rows, cols)
            pad_rows, pad_cols = -rows % side, -cols % side
            index = torch.nn.functional.pad(index, (0, pad_cols, 0, pad_rows), value=-1)
            blocks = index.view(t, (rows + pad_rows) // side, side, (cols + pad_cols) // side, side)
            flat = blocks.permute(0, 1, 3, 2, 4).reshape(-1)
            real = torch.sort((flat < 0).to(torch.uint8), stable=True).indices[: t * rows * cols]  # padding last
            order.append(flat[real] + start)
            start += t * rows * cols
        return torch.cat(order)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: DeepStack additions to the first decoder layers (see the module docstring)."""

    family: ClassVar[str] = "qwen3-vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)

    @property
    def addition_layers(self) -> int:
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def take_layer_additions(self, kwargs: dict) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        mask = kwargs.pop("visual_pos_masks", None)
        additions = kwargs.pop("deepstack_visual_embeds", None)
        if mask is None or additions is None:
            return None
        return mask, list(additions)

    def addition_kwargs(self, mask: torch.Tensor, additions: list[torch.Tensor]) -> dict[str, Any]:
        return {"visual_pos_masks": mask, "deepstack_visual_embeds": additions}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
