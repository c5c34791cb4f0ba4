"""Criteria that merge image tokens instead of keeping a subset: VisionZip's contextual tokens and grid pooling.

Each keeps some slots (`select`) and gives each kept slot's new state as a weighted sum of the stage's image slots
(`merge_weights`); the engine applies the weights in the space the criterion names (`merges`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vlmprune.criteria.base import Criterion, MergeSpace, SelectionContext, keep_top
from vlmprune.criteria.visual_cues import VisionAttention
from vlmprune.tensors import on_device

__all__ = ["DominantContextual", "GridPool"]


@dataclass(frozen=True)
class DominantContextual(Criterion):
    """VisionZip's selection: dominant tokens by vision attention, plus contextual tokens merged from the rest.

    Official code (dvlab-research/VisionZip `3151f6d`, `visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward`
    and `utils.py::CLIPAttention_forward`), per sample of budget T, with `C = int(T · contextual_share)`:

    1. dominant: the `T - C` tokens the [CLS] query attends to most at the feature layer (CLIP's layer -2),
       summed over heads (`VisionAttention`, a mean: the same order);
    2. targets: of the other R tokens, in raster order, every `step = max(1, R // C)`-th from the first, at most C;
    3. every remaining token goes to the target whose key (the feature layer's keys averaged over heads, the
       code's `metric`) is most cosine-similar; a contextual token is its target's features plus the mean of the
       features assigned to it (`target_hidden + aggregated_hidden`: the target weighs 1, each assigned token
       1/count), merged in the vision features before the projector, then projected (`space="auto"`: where
       the model's adapter can project merged features; Qwen-VL's patch merger takes 2x2 patch groups, so there
       the merged tokens are averaged in the language model's input embeddings instead; the trace says which).

    Differences from the code: the code keeps the [CLS] token's features as one of its `dominant` tokens (54 =
    [CLS] + 53 patches); vlmprune prunes image tokens and the language model gets no [CLS] row, so all T - C
    dominant tokens are patches. Contextual tokens sit at their target's place in raster order with the
    dominant ones (the code appends them after the dominant tokens). Several images in one prompt are chosen from
    together. Ties go to the earlier token.
    """

    contextual_share: float = 10 / 64
    space: MergeSpace = "auto"

    requires: ClassVar[frozenset[str]] = frozenset({"vision_attention", "vision_keys", "vision_features"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.contextual_share <= 1.0:
            raise ValueError(f"contextual_share must be in [0, 1], got {self.contextual_share}")
        _check_space(self.space)

    @property
    def merges(self) -> MergeSpace:  # type: ignore[override]
        return self.space

    def split(self, budget: int, n_present: int) -> tuple[int, int, int]:
        """(dominant, contextual, step) of one sample: `T - C`, the number of targets, and the targets' stride."""
        contextual = int(budget * self.contextual_share)
        dominant = min(budget - contextual, n_present)
        rest = n_present - dominant
        if contextual == 0 or rest == 0:
            return dominant, 0, 1
        step = max(1, rest // contextual)
        return dominant, min(contextual, math.ceil(rest / step)), step

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int]:
        return [sum(self.split(b, n)[:2]) for b, n in zip(budgets, ctx.counts, strict=True)]

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        return float(sum(self.split(budget, n_present)[:2]))

    def _roles(self, ctx: SelectionContext, budgets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(dominant, target) (batch, m) bool masks."""
        plans = [self.split(b, n) for b, n in zip(budgets, ctx.counts, strict=True)]
        dominant = keep_top(VisionAttention().ranking(ctx), ctx.budgets_tensor([p[0] for p in plans])) & ctx.present
        rest = ctx.present & ~dominant
        rank = rest.long().cumsum(dim=1) - 1  # each remaining token's place in raster order
        step, count = ctx.budgets_tensor([p[2] for p in plans]), ctx.budgets_tensor([p[1] for p in plans])
        target = rest & (rank % step == 0) & (rank // step < count)
        return dominant, target

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        dominant, target = self._roles(ctx, budgets)
        return dominant | target

    def merge_weights(self, ctx: SelectionContext, budgets: list[int], keep: torch.Tensor) -> torch.Tensor:
        dominant, target = self._roles(ctx, budgets)
        merging = ctx.present & ~dominant & ~target
        keys = F.normalize(ctx.vision_keys(), dim=-1)
        similarity = (keys @ keys.transpose(1, 2)).masked_fill(~target[:, None, :], float("-inf"))
        assigned = F.one_hot(similarity.argmax(dim=-1), keys.shape[1]).float() * merging[:, :, None]  # (src, tgt)
        per_target = assigned.sum(dim=1).clamp(min=1.0)  # (batch, m)
        weights = assigned.transpose(1, 2) / per_target[:, :, None]  # row t: 1/count for each token assigned to t
        return weights + torch.diag_embed(keep.float())  # every kept token keeps its own state at weight 1


@dataclass(frozen=True)
class GridPool(Criterion):
    """Average pooling of each image's token grid in `size` x `size` windows: one token per window.

    Each window's token is the average of the window's present tokens, placed at its first present token
    (raster order); windows at the right and bottom edges of a grid not divisible by `size` are smaller (ceil
    mode, so no token's content is lost; LLaVA-OneVision's `get_2dPool` uses floor mode on its even grids).
    The stage budget is ignored: the grid fixes the count (ceil(rows/size) · ceil(cols/size) per image).
    """

    size: int = 2
    space: MergeSpace = "hidden"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size (the pooling window's side) must be >= 1, got {self.size}")
        _check_space(self.space)

    @property
    def merges(self) -> MergeSpace:  # type: ignore[override]
        return self.space

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"vision_features"}) if self.space != "hidden" else frozenset()

    def _windows_of(self, grids: list[tuple[int, int]]) -> int:
        return sum(math.ceil(r / self.size) * math.ceil(c / self.size) for r, c in grids)

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int] | None:
        if ctx.counts != ctx.n_original:
            return None  # after an earlier cut, a window may have lost every token
        return [self._windows_of(grids) for grids in ctx.image_grids]

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        return float(self._windows_of(grids)) * n_present / max(n_original, 1)

    def _same_window(self, ctx: SelectionContext) -> torch.Tensor:
        """(batch, m, m) bool: slots i and j are present tokens of one window."""
        device = ctx.image_ids.device
        tables = [_window_ids(tuple(grids), self.size) for grids in ctx.image_grids]
        table = on_device(torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=-1), device)
        window = torch.gather(table, 1, ctx.image_ids.clamp(min=0)).masked_fill(~ctx.present, -1)
        return (window[:, :, None] == window[:, None, :]) & ctx.present[:, :, None] & ctx.present[:, None, :]

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        same = self._same_window(ctx)
        slots = torch.arange(same.shape[1], device=same.device)
        earlier = same & (slots[None, None, :] < slots[None, :, None])  # j before i in i's window
        return ctx.present & ~earlier.any(dim=-1)

    def merge_weights(self, ctx: SelectionContext, budgets: list[int], keep: torch.Tensor) -> torch.Tensor:
        same = self._same_window(ctx).float()
        return same / same.sum(dim=-1, keepdim=True).clamp(min=1.0)


def _check_space(space: str) -> None:
    if space not in ("hidden", "vision_features", "auto"):
        raise ValueError(f"space must be 'hidden', 'vision_features' or 'auto', got {space!r}")


@functools.lru_cache(maxsize=64)
def _window_ids(grids: tuple[tuple[int, int], ...], size: int) -> torch.Tensor:
    """(n,) long: the pooling window of each of a sample's image tokens, windows numbered across its images."""
    parts, offset = [], 0
    for rows, cols in grids:
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        across = math.ceil(cols / size)
        parts.append((offset + (r // size) * across + c // size).reshape(-1))
        offset += math.ceil(rows / size) * across
    return torch.cat(parts)
