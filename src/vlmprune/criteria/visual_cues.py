"""Visual cues from the vision encoder: its attention (FasterVLM's [CLS] score) and VisPruner's selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmprune.criteria.base import Criterion, ScoredCriterion, SelectionContext, keep_top
from vlmprune.tensors import on_device

__all__ = ["ImportantDiverse", "VisionAttention", "deduplicate"]


@dataclass(frozen=True)
class VisionAttention(ScoredCriterion):
    """Scores image tokens by the attention they receive in the vision encoder (`SelectionContext.vision_attention`).

    On LLaVA-1.5's CLIP: the [CLS] query's softmaxed attention to each patch at the layer whose output is the
    features (layer -2), averaged over heads (FasterVLM, VisPruner). Without [CLS] (SigLIP): the attention each
    token receives at the last layer, averaged over queries and heads (VisPruner's `siglip_encoder.py`). Ties go
    to the earlier token.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"vision_attention"})

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return ctx.vision_attention()


@dataclass(frozen=True)
class ImportantDiverse(Criterion):
    """VisPruner's selection: important tokens by vision attention, then diverse ones by de-duplication.

    Official code `llava/model/llava_arch.py::encode_images` (Theia-4869/VisPruner, `aefa01a`), per sample of
    budget T: `T_imp = int(T·important_ratio)` tokens with the highest `VisionAttention`; the rest, in descending
    attention order, is the residual list, cut down to `T_div = T − T_imp` by rounds of de-duplication on the
    vision features before the projector (`deduplicate`). Kept: the important and the surviving residual tokens.
    With `T_div = 0` only the important ones.

    Differences from the official code, only where it leaves the result to chance or fails:
    - sorts are stable, ties going to the earlier token (`argsort` there is not stable);
    - attention, features and cosines are float32 (the model's dtype there, fp16), the cosines computed once
      rather than every round: two scores equal up to rounding may come out in the other order;
    - a residual list of odd length works, A being its ceil(R/2) even positions (the code's `R // 2` indexing
      raises there, so only even lengths ever ran);
    - a round asked to drop more than A holds drops all of A (the code raises; `T_div < 8` reaches such a round).
    """

    important_ratio: float = 0.5
    drop_per_round: int = 8

    requires: ClassVar[frozenset[str]] = frozenset({"vision_attention", "vision_features"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {self.important_ratio}")
        if self.drop_per_round < 1:
            raise ValueError(f"drop_per_round must be >= 1, got {self.drop_per_round}")

    def split(self, budget: int) -> tuple[int, int]:
        """(T_imp, T_div) of a budget T, as the official code computes them (`int(T * r)`, no rounding guard)."""
        important = int(budget * self.important_ratio)
        return important, budget - important

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        order = VisionAttention().ranking(ctx)  # (batch, m) present slots by attention, best first; padding last
        important = [self.split(b)[0] for b in budgets]
        diverse = [self.split(b)[1] for b in budgets]
        starts = ctx.budgets_tensor(important)
        keep = keep_top(order, starts)
        if max(diverse) == 0:
            return keep
        # the residual list: the present slots after the important ones, in descending attention
        lengths = [n - i for n, i in zip(ctx.counts, important, strict=True)]
        batch, m = order.shape
        columns = torch.arange(max(lengths), device=order.device)
        residual = torch.gather(order, 1, (starts + columns).clamp(max=m - 1))
        residual = residual.masked_fill(columns >= ctx.budgets_tensor(lengths), -1)
        features = torch.nn.functional.normalize(ctx.vision_features().float(), dim=-1)
        residual = deduplicate(features, residual, lengths, diverse, self.drop_per_round)
        spare = residual.masked_fill(residual < 0, m)  # padding goes to a spare column, then dropped
        diverse_keep = torch.zeros(batch, m + 1, dtype=torch.bool, device=order.device).scatter(1, spare, True)
        return keep | diverse_keep[:, :m]


def deduplicate(
    features: torch.Tensor, residual: torch.Tensor, lengths: list[int], targets: list[int], drop: int = 8
) -> torch.Tensor:
    """VisPruner's iterative de-duplication of residual lists, batched: (batch, targets) slots, -1 padded.

    Args:
        features: (batch, m, C) unit-norm features of the slots.
        residual: (batch, W) slots, sample b's list in its first `lengths[b]` columns, -1 after.
        lengths, targets: per sample, the list's length R and the length T_div to cut it to (T_div <= R).
        drop: the most tokens dropped per round (the official 8).

    Each round, per sample, while `k = min(drop, R − T_div) > 0`: split the current list into its even
    positions A and odd positions B; score each A token by its highest cosine similarity to a B token; the new
    list is the A tokens in descending score, less the first k (the most duplicated), then all of B in order.
    A round drops at most all of A (the official code fails there instead: T_div < 8 reaches such a round).
    Rounds and counts are host integers known in advance; a sample that is done keeps its list as it is. The
    cosines of every pair of slots are computed once, (batch, m, m); each round reads its (|A|, |B|) block.
    """
    batch = residual.shape[0]
    widths, rounds, current = [], [], list(lengths)
    while True:
        # at most all of A goes in one round (the official code fails when k exceeds |A|: T_div < 8 at the end)
        drops = [
            max(0, min(drop, r - target, (r + 1) // 2)) if target > 0 else 0
            for r, target in zip(current, targets, strict=True)
        ]
        if not any(drops):
            break
        widths.append(max(current))
        rounds.append([[(r + 1) // 2 for r in current], [r // 2 for r in current], drops])
        current = [r - k for r, k in zip(current, drops, strict=True)]
    widths.append(max(current))
    # (rounds, 3, batch) host counts in one copy to the device: A's length, B's length and each round's drop
    counts = on_device(rounds, residual.device) if rounds else None
    # every cosine a round can ask for, computed once: (batch, m, m); a round gathers its (|A|, |B|) block
    similarity = features @ features.transpose(1, 2) if rounds else None
    samples = torch.arange(batch, device=residual.device)[:, None, None]
    for t in range(len(rounds)):
        n_a, n_b, k = counts[t, 0, :, None], counts[t, 1, :, None], counts[t, 2, :, None]
        width, new_width = widths[t], widths[t + 1]
        cur = residual[:, :width]
        a, b = cur[:, 0::2], cur[:, 1::2]
        valid_a = torch.arange(a.shape[1], device=cur.device) < n_a
        valid_b = torch.arange(b.shape[1], device=cur.device) < n_b
        block = similarity[samples, a.clamp(min=0)[:, :, None], b.clamp(min=0)[:, None, :]]  # (batch, |A|, |B|)
        best = block.masked_fill(~valid_b[:, None, :], float("-inf")).amax(dim=-1)
        best = best.masked_fill(~valid_a, float("-inf"))  # padding sorts last, behind every real A token
        ranked = torch.sort(best, dim=1, descending=True, stable=True).indices
        a_sorted = torch.gather(a, 1, ranked)
        # the A token ranked p goes to p − k unless dropped (p < k); B token i goes after the kept A tokens
        p = torch.arange(a.shape[1], device=cur.device).expand(batch, -1)
        i = torch.arange(b.shape[1], device=cur.device).expand(batch, -1)
        to_a = torch.where((p >= k) & (p < n_a), p - k, new_width)
        to_b = torch.where(i < n_b, n_a - k + i, new_width)
        new = torch.full((batch, new_width + 1), -1, dtype=residual.dtype, device=cur.device)
        new = new.scatter(1, torch.cat([to_a, to_b], dim=1), torch.cat([a_sorted, b], dim=1))[:, :new_width]
        residual = torch.where(k > 0, new, cur[:, :new_width])  # samples already done keep their list
    # a sample with T_div = 0 never ran a round: nothing of its list is kept
    residual = residual[:, : max(targets)]
    columns = torch.arange(residual.shape[1], device=residual.device)
    return residual.masked_fill(columns >= on_device(targets, residual.device)[:, None], -1)
