"""A uniform grid over each image: FEATHER's φuniform."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vlmprune.budget import split_budget
from vlmprune.criteria.base import Criterion, SelectionContext
from vlmprune.errors import BudgetError
from vlmprune.tensors import on_device

__all__ = ["Uniform"]


@dataclass(frozen=True)
class Uniform(Criterion):
    """Keeps image tokens on a regular 2-D grid, ignoring what they show (FEATHER's φuniform).

    With a `stride` (FEATHER, arXiv 2412.13180, official code `s=<stride>`): keep the cells
    `grid[::stride, ::stride]` of every image, anchored at the top-left (row r, column c with
    `r % stride == 0` and `c % stride == 0`), that are still present. The stage budget is ignored:
    a 24×24 grid keeps 64 tokens at stride 3 and 144 at stride 2, a 27×27 grid 81 at stride 3.

    With `stride=None`: keep exactly the stage budget. The budget is split over a sample's images in
    proportion to their present tokens (largest remainder, ties to the earlier image); each image then takes
    the largest stride s whose grid `[::s, ::s]` holds at least its share k of present cells, and from
    those m cells, in raster order, keeps the ones at indices `floor((j + 1/2)·m/k)` for j < k (evenly
    spaced, centred). Deterministic.

    Image i of a sample occupies ids `[offset_i, offset_i + rows_i·cols_i)` of the original image tokens,
    in raster order, with images numbered one after another (`ctx.image_grids[b]`).
    """

    stride: int | None = 3

    def __post_init__(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, or None to keep the stage budget, got {self.stride}")

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        """The grid's cells still present, if the tokens pruned so far were spread evenly over the image."""
        if self.stride is None:
            return float(budget)
        cells = sum(-(-rows // self.stride) * -(-cols // self.stride) for rows, cols in grids)
        return cells * n_present / n_original

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        for b, grids in enumerate(ctx.image_grids):
            total = sum(rows * cols for rows, cols in grids)
            if total != ctx.n_original[b]:
                raise ValueError(
                    f"sample {b}: image grids {grids} hold {total} tokens but the sample had "
                    f"{ctx.n_original[b]} image tokens; a uniform grid needs every image token on a grid"
                )
        if self.stride is None:
            return self._select_budget(ctx, budgets)
        tables = [_on_grid(tuple(grids), self.stride) for grids in ctx.image_grids]
        table = on_device(torch.nn.utils.rnn.pad_sequence(tables, batch_first=True), ctx.image_ids.device)
        return torch.gather(table, 1, ctx.image_ids.clamp(min=0)) & ctx.present

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int] | None:
        if self.stride is None:
            return list(budgets)
        if ctx.counts == ctx.n_original:  # nothing pruned yet: every grid cell is present
            return [sum(-(-rows // self.stride) * -(-cols // self.stride) for rows, cols in g) for g in ctx.image_grids]
        return None  # the grid cells still present depend on earlier stages' choices

    def _select_budget(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        """`stride=None`, one sample at a time (an ablation, not a hot path: it reads counts from the device)."""
        keep = torch.zeros_like(ctx.image_ids, dtype=torch.bool)
        for b, (count, budget) in enumerate(zip(ctx.counts, budgets, strict=True)):
            ids, grids = ctx.image_ids[b, :count], ctx.image_grids[b]
            if budget > count:
                raise BudgetError(f"sample {b}: budget {budget} exceeds the {count} image tokens left")
            present = torch.zeros(ctx.n_original[b], dtype=torch.bool, device=ids.device)
            present[ids] = True
            offsets = [sum(r * c for r, c in grids[:i]) for i in range(len(grids))]
            images = list(zip(offsets, grids, strict=True))
            masks = [present[off : off + r * c].view(r, c) for off, (r, c) in images]
            shares = split_budget(budget, [int(m.sum()) for m in masks])
            parts = [off + _spread(m, k) for (off, _), m, k in zip(images, masks, shares, strict=True)]
            keep[b, torch.searchsorted(ids, torch.cat([ids[:0], *parts]))] = True
        return keep


@functools.lru_cache(maxsize=64)
def _on_grid(grids: tuple[tuple[int, int], ...], stride: int) -> torch.Tensor:
    """(sum of rows·cols,) bool over a sample's original image tokens: each image's `[::stride, ::stride]` cells."""
    on = torch.zeros(sum(rows * cols for rows, cols in grids), dtype=torch.bool)
    offset = 0
    for rows, cols in grids:
        on[offset + _grid(rows, cols, stride, on.device)] = True
        offset += rows * cols
    return on


def _grid(rows: int, cols: int, stride: int, device: torch.device) -> torch.Tensor:
    """Raster ids, within one rows×cols image, of the cells `[::stride, ::stride]`; ascending."""
    r = torch.arange(0, rows, stride, device=device)
    c = torch.arange(0, cols, stride, device=device)
    return (r[:, None] * cols + c[None, :]).flatten()


def _spread(present: torch.Tensor, k: int) -> torch.Tensor:
    """k present cells of a (rows, cols) mask, spread evenly: raster ids, ascending."""
    rows, cols = present.shape
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=present.device)
    for stride in range(max(rows, cols), 0, -1):
        cells = _grid(rows, cols, stride, present.device)
        cells = cells[present.flatten()[cells]]
        m = cells.numel()
        if m >= k:
            picks = [((2 * j + 1) * m) // (2 * k) for j in range(k)]
            return cells[torch.tensor(picks, device=present.device)]
    raise BudgetError(f"cannot keep {k} cells of an image with {int(present.sum())} present")
