"""DART's selection: the image tokens least similar to a few pivot tokens (Wen et al., arXiv 2502.11494)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vlmprune.criteria.base import Criterion, SelectionContext, keep_top

__all__ = ["PivotDissimilarity"]


@dataclass(frozen=True)
class PivotDissimilarity(Criterion):
    """Keeps pivot image tokens and, for each pivot in turn, the remaining image tokens least similar to it.

    Official code (DART, `get_retained_image_token` of its LLaVA `modeling_llama.py`), per sample with budget B
    (the code's `max_num_trunction`):

    1. pivots: the `pivot_image` image tokens and the `pivot_text` instruction tokens (the text after the image)
       whose keys at the scoring layer (heads concatenated, RoPE applied) have the largest L1 norm;
    2. every image pivot is kept; each of the `pivot_image + pivot_text` pivots in turn then keeps the
       `B // (pivot_image + pivot_text)` image tokens, not yet kept, least cosine-similar to it, similarity taken
       between the stage layer's input hidden states passed through the language model's final norm
       (`final_norm`, as the code's `self.norm(layer_outputs[0])`).

    So a sample keeps `pivot_image + (pivot_image + pivot_text) · (B // (pivot_image + pivot_text))` image tokens:
    132 for B = 128 with 4 + 4 pivots, the image pivots on top of the budget as in the code. A sample with fewer
    instruction tokens than `pivot_text` has that many text pivots (the code fails there), so the kept count is
    read once from the device. Pivots take their turns image pivots first, then text pivots, each by descending
    key norm: the code iterates a Python `set` of row indices, an order that follows hashing, not the method.
    Ties go to the earlier token. Needs no attention map: keys and hidden states only.
    """

    pivot_image: int = 4
    pivot_text: int = 4
    key_rope: bool = True
    final_norm: bool = True

    requires: ClassVar[frozenset[str]] = frozenset({"attention"})  # the scoring layer's keys

    def __post_init__(self) -> None:
        if self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text == 0:
            raise ValueError(
                f"pivot_image and pivot_text must be >= 0 and not both 0, got {self.pivot_image}, {self.pivot_text}"
            )

    def per_pivot(self, budget: int) -> int:
        """Image tokens each pivot keeps: the code's `int(MAX_NUM_TRUNCTION // (pivot_image + pivot_text))`."""
        return budget // (self.pivot_image + self.pivot_text)

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int] | None:
        return None  # the number of text pivots depends on the instruction's length, on the device

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        return float(min(n_present, self.pivot_image + (self.pivot_image + self.pivot_text) * self.per_pivot(budget)))

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        present = ctx.present
        image_keys, row_keys = ctx.keys(self.key_rope)  # (batch, m, D), (batch, n, D)
        rows, instruction = ctx.instruction()  # (batch, n, hidden), (batch, n)
        # 1. pivots by the keys' L1 norm, largest first (ties to the earlier token)
        image_norm = image_keys.float().abs().sum(dim=-1).masked_fill(~present, float("-inf"))
        image_order = torch.sort(image_norm, dim=1, descending=True, stable=True).indices
        n_image_pivots = [min(self.pivot_image, n) for n in ctx.counts]
        keep = keep_top(image_order, ctx.budgets_tensor(n_image_pivots)) & present
        text_norm = row_keys.float().abs().sum(dim=-1).masked_fill(~instruction, float("-inf"))
        text_pivots = torch.sort(text_norm, dim=1, descending=True, stable=True).indices[:, : self.pivot_text]
        text_valid = torch.gather(instruction, 1, text_pivots)
        # 2. each pivot in turn keeps the least similar image tokens not yet kept
        image_states = ctx.hidden_states()
        text_states = _rows(rows, text_pivots)
        if self.final_norm:
            image_states, text_states = ctx.final_norm(image_states), ctx.final_norm(text_states)
        unit = F.normalize(image_states.float(), dim=-1)  # (batch, m, hidden)
        image_pivots = image_order[:, : self.pivot_image]
        pivots = torch.cat([_rows(unit, image_pivots), F.normalize(text_states.float(), dim=-1)], dim=1)
        ranks = torch.arange(image_pivots.shape[1], device=present.device)
        pivot_valid = torch.cat([ranks < ctx.budgets_tensor(n_image_pivots), text_valid], dim=1)  # (batch, P)
        similarity = pivots @ unit.transpose(1, 2)  # (batch, P, m)
        per_pivot = ctx.budgets_tensor([self.per_pivot(b) for b in budgets])
        available = present & ~keep
        for p in range(pivots.shape[1]):
            dissimilar = (-similarity[:, p]).masked_fill(~available, float("-inf"))
            order = torch.sort(dissimilar, dim=1, descending=True, stable=True).indices
            taken = keep_top(order, per_pivot) & available & pivot_valid[:, p : p + 1]
            keep |= taken
            available &= ~taken
        return keep


def _rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(batch, k, d) rows `index` (batch, k) of `tensor` (batch, n, d)."""
    return torch.gather(tensor, 1, index[:, :, None].expand(-1, -1, tensor.shape[-1]))
