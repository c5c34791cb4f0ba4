"""Budget scope: a stage's budget over a whole sample ("global") or split over its images, crops or frames.

With `"per_image"` each grid of a sample (`SelectionContext.image_grids[b]`: an image, LLaVA-NeXT's base image and
its unpadded crops, a video frame) is selected on its own, as the official VisPruner and VisionZip codes prune each
crop of LLaVA-NeXT: the sample's budget is split over its grids in proportion to their present tokens (largest
remainder, ties to the earlier grid), and the criterion runs once on a batch whose rows are the (sample, grid)
pairs. Any criterion works unchanged: its scores, features, hidden states, keys and instruction rows are regrouped
into those rows, and a merging criterion merges within each grid.
"""

from __future__ import annotations

from typing import Literal

import torch

from vlmprune.budget import split_budget
from vlmprune.criteria.base import Criterion, SelectionContext
from vlmprune.tensors import on_device

__all__ = ["BUDGET_SCOPES", "BudgetScope", "select_per_image"]

BudgetScope = Literal["global", "per_image"]
BUDGET_SCOPES: tuple[str, ...] = ("global", "per_image")


def select_per_image(
    criterion: Criterion, ctx: SelectionContext, budgets: list[int], merges: bool = False
) -> tuple[torch.Tensor, list[int] | None, torch.Tensor | None]:
    """`criterion` run on each grid of each sample alone: ((batch, m) keep mask over `ctx`'s slots, counts or None,
    and with `merges` the criterion's merge weights (batch, m, m), each grid's own block, else None).

    A grid holds a contiguous range of a sample's original image ids, so its present tokens are a contiguous run
    of the sample's slots. How many are present per grid is known on the host before any pruning; after an
    earlier stage it is read from the device once.
    """
    device = ctx.image_ids.device
    owner, first_id, sizes, grids = [], [], [], []  # per group: its sample, first original id, tokens, grid
    for b, sample_grids in enumerate(ctx.image_grids):
        offset = 0
        for rows, cols in sample_grids:
            owner.append(b)
            first_id.append(offset)
            sizes.append(rows * cols)
            grids.append((rows, cols))
            offset += rows * cols
    present = _present_per_group(ctx, owner, first_id, sizes)
    shares = [0] * len(owner)
    for b, budget in enumerate(budgets):
        members = [g for g, o in enumerate(owner) if o == b]
        for g, share in zip(members, split_budget(budget, [present[g] for g in members]), strict=True):
            shares[g] = share
    first_slot, run = [], {}
    for g, b in enumerate(owner):  # a group's slots start after its sample's earlier groups' present tokens
        first_slot.append(run.get(b, 0))
        run[b] = first_slot[-1] + present[g]
    width = max(present, default=0)
    columns = torch.arange(width, device=device)
    slot = on_device(first_slot, device)[:, None] + columns  # (groups, width) slots of each group's sample
    valid = columns < on_device(present, device)[:, None]
    sample = on_device(owner, device)
    slot = torch.where(valid, slot, 0).clamp(max=max(ctx.image_ids.shape[1] - 1, 0))

    def regroup(values: torch.Tensor) -> torch.Tensor:
        """(batch, m, ...) per-slot values -> (groups, width, ...), zero in padding."""
        out = values[sample[:, None], slot]
        return out.masked_fill(~valid.view(*valid.shape, *([1] * (out.dim() - 2))), 0)

    ids = torch.where(valid, ctx.image_ids[sample[:, None], slot] - on_device(first_id, device)[:, None], -1)

    def split(per_sample: list[torch.Tensor]) -> list[torch.Tensor]:
        return [per_sample[b][f : f + n] for b, f, n in zip(owner, first_id, sizes, strict=True)]

    first_group = {}  # each sample's first group: the rows of a sample are its groups' rows
    for g, b in enumerate(owner):
        first_group.setdefault(b, g)

    def rows_attention(rows: torch.Tensor, *policy) -> tuple[torch.Tensor, torch.Tensor]:
        per_sample = rows[[first_group[b] for b in range(ctx.batch_size)]]
        attention, queries = ctx.rows_attention(per_sample, *policy)  # (batch, q, m), (batch, q)
        attention = torch.gather(attention[sample], 2, slot[:, None, :].expand(-1, attention.shape[1], -1))
        return attention.masked_fill(~valid[:, None, :], 0), queries[sample]

    def input_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
        originals, rows = ctx.input_embeddings()  # (batch, N, hidden), (batch, n, hidden)
        own = on_device(first_id, device)[:, None] + torch.arange(max(sizes, default=0), device=device)
        return originals[sample[:, None], own.clamp(max=originals.shape[1] - 1)], rows[sample]

    def keys(rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        image, rows = ctx.keys(rope)
        return regroup(image), rows[sample]

    def instruction() -> tuple[torch.Tensor, torch.Tensor]:
        rows, mask = ctx.instruction()
        return rows[sample], mask[sample]

    sub = SelectionContext(
        image_ids=ids,
        counts=present,
        image_grids=[[grid] for grid in grids],
        n_original=sizes,
        stage_index=ctx.stage_index,
        attention_fn=None if ctx.attention_fn is None else lambda *policy: regroup(ctx.attention(*policy)),
        vision_features_fn=None if ctx.vision_features_fn is None else lambda: split(ctx.vision_features_fn()),
        hidden_states_fn=None if ctx.hidden_states_fn is None else lambda: regroup(ctx.hidden_states()),
        vision_attention_fn=None if ctx.vision_attention_fn is None else lambda: split(ctx.vision_attention_fn()),
        instruction_fn=None if ctx.instruction_fn is None else instruction,
        keys_fn=None if ctx.keys_fn is None else keys,
        final_norm_fn=ctx.final_norm_fn,
        vision_keys_fn=None if ctx.vision_keys_fn is None else lambda: split(ctx.vision_keys_fn()),
        rows_attention_fn=None if ctx.rows_attention_fn is None else rows_attention,
        input_embeddings_fn=None if ctx.input_embeddings_fn is None else input_embeddings,
    )
    keep_groups = criterion.select(sub, shares) & valid
    batch, m = ctx.image_ids.shape
    flat = torch.where(valid, sample[:, None] * m + slot, batch * m)  # padding of a group goes to a spare entry
    keep = torch.zeros(batch * m + 1, dtype=torch.bool, device=device)
    keep = keep.scatter(0, torch.where(keep_groups, flat, batch * m).flatten(), True)
    counts = criterion.counts(sub, shares)
    if counts is not None:
        counts = [sum(c for c, o in zip(counts, owner, strict=True) if o == b) for b in range(ctx.batch_size)]
    weights = None
    if merges:  # each group's (width, width) block, at its slots' rows and columns of its sample
        blocks = criterion.merge_weights(sub, shares, keep_groups)
        weights = blocks.new_zeros(batch * m + 1, m + 1)
        rows = flat[:, :, None].expand_as(blocks)
        cols = torch.where(valid, slot, m)[:, None, :].expand_as(blocks)
        weights = weights.index_put((rows, cols), blocks)[: batch * m, :m].view(batch, m, m)
    return keep[: batch * m].view(batch, m), counts, weights


def _present_per_group(ctx: SelectionContext, owner: list[int], first_id: list[int], sizes: list[int]) -> list[int]:
    """Per group, its present tokens: its size before any pruning, else counted on the device and read once."""
    if ctx.counts == ctx.n_original:
        return list(sizes)
    device = ctx.image_ids.device
    starts = on_device(first_id, device)
    ends = starts + on_device(sizes, device)
    ids = ctx.image_ids[on_device(owner, device)]  # (groups, m)
    inside = (ids >= starts[:, None]) & (ids < ends[:, None])
    return inside.sum(dim=1).tolist()
