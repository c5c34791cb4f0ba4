"""Balanced Token Pruning's selection: rebalanced attention, a spatial start and max-min diversity (BTP).

Li et al., "Balanced Token Pruning", NeurIPS 2025 (arXiv 2505.22038); official LLaVA code
`llava/modeling_llama.py` (`LlamaModel.attn_prune`, `div_prune`, `get_div_initial_indices`, `forward`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from vlmprune.criteria.base import Criterion, SelectionContext, SoftmaxDomain, keep_top
from vlmprune.tensors import on_device

__all__ = ["Balanced", "max_min_picks", "rebalanced_attention", "spatial_picks"]

SpatialMetric = Literal["manhattan", "euclidean"]


@dataclass(frozen=True)
class Balanced(Criterion):
    """One BTP stage: a share of the budget by rebalanced attention, the rest by diversity.

    With k the stage budget and n the tokens present (host integers, per sample):

    1. attention: a = int(k·attention) tokens by the last prompt token's attention (raw logits q·k/√d with
       RoPE, mean over heads, for `softmax="none"`, the LLaVA code), positionally rebalanced: the top
       c = int(a·oversample) tokens are the candidates; those among the first k present tokens come first,
       in attention order, then the others, and the first a are kept (`rebalanced_attention`). This undoes
       RoPE's pull towards the image's last rows.
    2. spatial: s = int(k·spatial) tokens by farthest-point sampling on the image grid (Manhattan distance,
       from the first present token; tokens of different images count as farthest apart).
    3. diversity: d = int(k·diversity) tokens by greedy max-min diversity (DivPrune's MMDP) on the cosine
       distance of the stage layer's input hidden states, started from the token whose nearest neighbour is
       farthest (`max_min_picks`).
    4. fill: the union of 1-3, each token once, is completed to k by max-min diversity started from it.

    s and d are capped at k - a, so the attention share is never displaced. The official code's union can
    exceed k (it prints "Bug!" and keeps them all); here it is cut to k, attention picks first, then spatial,
    then diversity, each in its pick order, so every sample keeps exactly k. Ties go to the earlier token.
    Everything runs batched over the (batch, m) slots, with loop lengths known on the host.
    """

    attention: float = 1.0
    diversity: float = 0.0
    spatial: float = 0.0
    oversample: float = 1.0
    softmax: SoftmaxDomain = "none"
    spatial_metric: SpatialMetric = "manhattan"

    def __post_init__(self) -> None:
        for name in ("attention", "diversity", "spatial"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} (share of the stage budget) must be in [0, 1], got {value}")
        if not self.oversample >= 1.0:
            raise ValueError(f"oversample (attention candidates per pick) must be >= 1, got {self.oversample}")
        if self.softmax not in ("sequence", "image", "none"):
            raise ValueError(f"softmax must be 'sequence', 'image' or 'none', got {self.softmax!r}")
        if self.spatial_metric not in ("manhattan", "euclidean"):
            raise ValueError(f"spatial_metric must be 'manhattan' or 'euclidean', got {self.spatial_metric!r}")

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"attention"}) if self.attention > 0 else frozenset()

    def shares(self, budget: int, n_present: int) -> tuple[int, int, int, int]:
        """(a, c, s, d): attention picks, attention candidates, spatial picks and diversity picks for one sample.

        The official arithmetic: `int(k * 0.3)`, `int(a * 3.7)`, on Python floats.
        """
        a = int(budget * self.attention)
        c = min(int(a * self.oversample), n_present)
        s = min(int(budget * self.spatial), budget - a)
        d = min(int(budget * self.diversity), budget - a)
        return a, c, s, d

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        present = ctx.present
        batch, m = present.shape
        if max(budgets, default=0) == 0:
            return torch.zeros_like(present)
        plans = [self.shares(k, n) for k, n in zip(budgets, ctx.counts, strict=True)]
        a, c, s, d = ([plan[i] for plan in plans] for i in range(4))
        device = present.device
        never = 3 * m  # priority of a token no step picked (each step's ranks are below m, offsets below 2m)
        priority = torch.full((batch, m), never, dtype=torch.long, device=device)
        if max(a) > 0:
            scores = ctx.attention("last", self.softmax, True)
            ranks = rebalanced_attention(scores, present, a, c, budgets)
            priority = torch.where(ranks >= 0, ranks, priority)
        if max(s) > 0:
            ranks = spatial_picks(ctx, s, self.spatial_metric)
            offset = ctx.budgets_tensor(a)
            priority = torch.where((ranks >= 0) & (priority == never), ranks + offset, priority)
        distances = None
        if max(d) > 0:
            distances = cosine_distances(ctx.hidden_states())
            none = torch.zeros_like(present)
            ranks = max_min_picks(distances, present, none, on_device(d, device), max(d))
            offset = ctx.budgets_tensor([x + y for x, y in zip(a, s, strict=True)])
            priority = torch.where((ranks >= 0) & (priority == never), ranks + offset, priority)
        # The union, each token once, cut to k in priority order.
        order = torch.sort(priority, dim=1, stable=True).indices
        keep = keep_top(order, ctx.budgets_tensor(budgets)) & (priority < never)
        # The union holds at least max(a, s, d) tokens: that bounds the diversity fill on the host.
        steps = max(k - max(x) for k, *x in zip(budgets, a, s, d, strict=True))
        if steps > 0:
            if distances is None:
                distances = cosine_distances(ctx.hidden_states())
            missing = on_device(budgets, device) - keep.sum(dim=1)
            keep |= max_min_picks(distances, present, keep, missing, steps) >= 0
        return keep & present


def spatial_picks(ctx: SelectionContext, counts: list[int], metric: SpatialMetric = "manhattan") -> torch.Tensor:
    """(batch, m) pick order of farthest-point sampling on the image grid, -1 where not picked.

    Official `get_div_initial_indices(24, 24, 144)`: greedy max-min on the grid distance between the present
    tokens, from the first one (token 0 of an unpruned image); sample b picks `counts[b]` tokens. Before any
    pruning the picks depend on the grids alone and are computed once per grid, as the official code does.
    """
    device = ctx.image_ids.device
    if ctx.counts == ctx.n_original:
        tables = [
            _grid_sampling(tuple(grids), count, metric) for grids, count in zip(ctx.image_grids, counts, strict=True)
        ]
        table = on_device(torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=-1), device)
        return torch.gather(table, 1, ctx.image_ids.clamp(min=0)).masked_fill(~ctx.present, -1)
    coords = [_coordinates(tuple(grids)) for grids in ctx.image_grids]
    coords = on_device(torch.nn.utils.rnn.pad_sequence(coords, batch_first=True), device)
    index = ctx.image_ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, 3)
    span = float(max(rows + cols for grids in ctx.image_grids for rows, cols in grids))
    distances = grid_distances(torch.gather(coords, 1, index), metric, span)
    return _seeded_at_first(distances, ctx.present, on_device(counts, device), max(counts))


def rebalanced_attention(
    scores: torch.Tensor, present: torch.Tensor, picks: list[int], candidates: list[int], threshold: list[int]
) -> torch.Tensor:
    """(batch, m) pick order of BTP's rebalanced attention selection, -1 where not picked.

    Official `attn_prune(image_attn, select_num, extra_num, k)`: of the top `candidates[b]` tokens by `scores`
    (batch, m), those at slots < `threshold[b]` come first, in score order, then the rest, in score order; the
    first `picks[b]` are kept. Padding slots are never picked; equal scores go to the earlier slot.
    """
    device = scores.device
    batch, m = scores.shape
    order = torch.sort(scores.float().masked_fill(~present, float("-inf")), dim=1, descending=True, stable=True)
    order = order.indices
    rank = torch.arange(m, device=device).expand(batch, m)
    candidate = rank < on_device(candidates, device)[:, None]
    early = order < on_device(threshold, device)[:, None]
    pre, post = candidate & early, candidate & ~early
    # Position in the official `cat(pre, post)`: early candidates first, then the others, each in score order.
    position = torch.where(
        pre,
        pre.long().cumsum(dim=1) - 1,
        torch.where(post, post.long().cumsum(dim=1) - 1 + pre.sum(dim=1, keepdim=True), m),
    )
    kept = torch.where(position < on_device(picks, device)[:, None], position, -1)
    return torch.full_like(kept, -1).scatter(1, order, kept)


def max_min_picks(
    distances: torch.Tensor, present: torch.Tensor, seeds: torch.Tensor, counts: torch.Tensor, steps: int
) -> torch.Tensor:
    """(batch, m) order in which greedy max-min diversity adds tokens to `seeds`, -1 where not added.

    DivPrune's MMDP as BTP's `div_prune` runs it: each step adds the present token, not yet chosen, whose
    distance to the nearest chosen token is largest. A sample without seeds starts from the token whose nearest
    other token is farthest. Sample b adds `counts[b]` (a device tensor) tokens; `steps` (a host integer, at least
    the largest count) bounds the loop, so nothing waits for the device. Ties go to the earlier slot.

    Args:
        distances: (batch, m, m) symmetric distances between slots.
        present: (batch, m) bool, the slots that may be chosen.
        seeds: (batch, m) bool, tokens already chosen.
        counts: (batch,) long, tokens to add per sample.
        steps: host bound on the loop.
    """
    batch, m = present.shape
    device = present.device
    inf = torch.tensor(float("inf"), device=device)
    # Distance of each token to its nearest other present token: the first pick of a sample without seeds.
    others = ~present[:, None, :] | torch.eye(m, dtype=torch.bool, device=device)
    nearest = distances.masked_fill(others, inf).amin(dim=-1)
    nearest_chosen = distances.masked_fill(~seeds[:, :, None], inf).amin(dim=1)
    started = seeds.any(dim=1, keepdim=True)
    chosen = seeds.clone()
    ranks = torch.full((batch, m), -1, dtype=torch.long, device=device)
    counts = counts.view(batch, 1)
    for step in range(steps):
        score = nearest_chosen if step else torch.where(started, nearest_chosen, nearest)
        pick = score.masked_fill(chosen | ~present, float("-inf")).argmax(dim=1, keepdim=True)
        active = counts > step
        ranks = ranks.scatter(1, pick, torch.where(active, step, torch.gather(ranks, 1, pick)))
        chosen = chosen | torch.zeros_like(chosen).scatter(1, pick, active)
        row = torch.gather(distances, 1, pick[:, :, None].expand(batch, 1, m)).squeeze(1)
        nearest_chosen = torch.where(active, torch.minimum(nearest_chosen, row), nearest_chosen)
    return ranks


def cosine_distances(hidden: torch.Tensor) -> torch.Tensor:
    """(batch, m, m) float32 1 - cosine similarity between the rows of `hidden` (batch, m, d)."""
    unit = F.normalize(hidden.float(), p=2, dim=-1)
    return 1.0 - unit @ unit.transpose(-1, -2)


def grid_distances(coords: torch.Tensor, metric: SpatialMetric, span: float) -> torch.Tensor:
    """(batch, m, m) distances between grid cells `coords` (batch, m, 3) of (image, row, col).

    Cells of different images are `span` (more than any distance within one image) farther apart.
    """
    delta = (coords[:, :, None, 1:] - coords[:, None, :, 1:]).float()
    within = delta.abs().sum(dim=-1) if metric == "manhattan" else delta.pow(2).sum(dim=-1).sqrt()
    return within + span * (coords[:, :, None, 0] != coords[:, None, :, 0])


def _seeded_at_first(distances: torch.Tensor, present: torch.Tensor, counts: torch.Tensor, steps: int) -> torch.Tensor:
    """Farthest-point sampling of `counts[b]` tokens from each sample's first present slot (the official seed 0)."""
    seeds = (torch.arange(present.shape[1], device=present.device) == 0) & (counts > 0)[:, None] & present
    ranks = max_min_picks(distances, present, seeds, (counts - 1).clamp(min=0), max(steps - 1, 0))
    return torch.where(seeds, 0, torch.where(ranks >= 0, ranks + 1, -1))


@functools.lru_cache(maxsize=64)
def _coordinates(grids: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """(n, 3) long (image, row, col) of a sample's image tokens, images numbered one after another."""
    parts = []
    for i, (rows, cols) in enumerate(grids):
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        parts.append(torch.stack([torch.full_like(r, i), r, c], dim=-1).reshape(-1, 3))
    return torch.cat(parts)


@functools.lru_cache(maxsize=64)
def _grid_sampling(grids: tuple[tuple[int, int], ...], count: int, metric: SpatialMetric) -> torch.Tensor:
    """(n,) pick order of farthest-point sampling on a sample's full grids, -1 where not picked (computed once)."""
    coords = _coordinates(grids)[None]
    present = torch.ones(1, coords.shape[1], dtype=torch.bool)
    span = float(max(rows + cols for rows, cols in grids))
    ranks = _seeded_at_first(grid_distances(coords, metric, span), present, torch.tensor([count]), count)
    return ranks[0]
