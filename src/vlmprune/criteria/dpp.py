"""CDPruner's selection: a conditional determinantal point process over the image tokens (arXiv 2506.10967)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmprune.criteria.base import Criterion, SelectionContext

__all__ = ["ConditionalDPP", "dpp_greedy_map", "instruction_relevance"]


@dataclass(frozen=True)
class ConditionalDPP(Criterion):
    """The image tokens a DPP conditioned on the instruction selects, by greedy MAP inference.

    Official code (Theia-4869/CDPruner, `llava/model/llava_arch.py::encode_images`), per sample:

    - similarity: cosine similarity between the image tokens' projected features (the language model's input
      embeddings of the image rows), (m, m);
    - relevance: the mean cosine similarity of each image token to the instruction's tokens, negated
      (`negate_relevance`, the code's `(-relevance).mean(dim=-1)`), then min-max normalised to (0, 1]
      (`(r - min + 1e-6) / (max - min)`); with `theta`, `exp(theta / (2(1 - theta)) · r)` (the code's
      commented-out option);
    - kernel `L = diag(r) · S · diag(r)`, and the budget's tokens chosen by the fast greedy MAP inference of a
      DPP (`dpp_greedy_map`): each step adds the token that most increases `log det L_S`.

    The official LLaVA code embeds the image tokens and the instruction (the raw question) with CLIP's joint
    image-text space (its vision projection and the CLIP text tower, which LLaVA checkpoints do not ship); here
    both come from the language model's input embeddings, the instruction being the text after the image.
    Min-max normalisation is per sample (the code normalises over the whole batch, which ran with batch 1).
    """

    negate_relevance: bool = True
    theta: float | None = None

    def __post_init__(self) -> None:
        if self.theta is not None and not 0.0 < self.theta < 1.0:
            raise ValueError(f"theta must be in (0, 1) or None, got {self.theta}")

    def kernel(self, ctx: SelectionContext) -> torch.Tensor:
        """(batch, m, m) float32 conditional kernel `diag(r) S diag(r)`; 0 on padding rows and columns."""
        present = ctx.present
        image = F.normalize(ctx.hidden_states().float(), dim=-1)
        rows, instruction = ctx.instruction()
        relevance = instruction_relevance(image, F.normalize(rows.float(), dim=-1), instruction, present)
        if not self.negate_relevance:
            relevance = -relevance
        low = relevance.masked_fill(~present, float("inf")).amin(dim=1, keepdim=True)
        high = relevance.masked_fill(~present, float("-inf")).amax(dim=1, keepdim=True)
        relevance = (relevance - low + 1e-6) / (high - low)
        if self.theta is not None:
            relevance = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)
        relevance = relevance.masked_fill(~present, 0.0)
        return relevance[:, :, None] * (image @ image.transpose(1, 2)) * relevance[:, None, :]

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        if max(budgets, default=0) == 0:
            return torch.zeros_like(ctx.present)
        order = dpp_greedy_map(self.kernel(ctx), ctx.present, max(budgets))
        steps = torch.arange(order.shape[1], device=order.device)
        picked = steps < ctx.budgets_tensor(budgets)
        # a sample whose tokens run out before the largest budget repeats slot 0 in `order`: writes add up, so a
        # later unpicked repeat never clears an earlier pick (a plain scatter's duplicate writes land in any order)
        keep = torch.zeros(order.shape[0], ctx.present.shape[1], dtype=torch.long, device=order.device)
        keep = keep.scatter_add(1, order, picked.long()) > 0
        return keep & ctx.present


def instruction_relevance(
    image: torch.Tensor, rows: torch.Tensor, instruction: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """(batch, m) minus the mean cosine similarity of each image token to the instruction's tokens.

    `image` (batch, m, d) and `rows` (batch, n, d) are unit rows; `instruction` (batch, n) marks the rows to average
    over. The sign is the official code's: `(-relevance).mean(dim=-1)`.
    """
    cosine = image @ rows.transpose(1, 2)  # (batch, m, n)
    weights = instruction.float() / instruction.sum(dim=1, keepdim=True).clamp(min=1)
    return -(cosine * weights[:, None, :]).sum(dim=-1).masked_fill(~present, 0.0)


def dpp_greedy_map(kernel: torch.Tensor, present: torch.Tensor, steps: int) -> torch.Tensor:
    """(batch, steps) slots in the order greedy MAP inference of a DPP with `kernel` (batch, m, m) picks them.

    The official loop (Chen et al.'s fast greedy MAP, as CDPruner's `encode_images` runs it), batched: `d²` starts
    as the kernel's diagonal; each step picks the slot j of largest `d²` (the gain in log det), computes its
    Cholesky row `e = (L[j] - cᵀ c_j) / sqrt(d²_j)`, and lowers every `d²` by `e²`. Padding and picked slots are
    never picked again. Once the kernel's rank is spent, every gain is 0: the square root is taken of at least
    1e-12 (the code would divide by 0 and produce NaN) and later picks follow the leftover numerical gains.
    """
    batch, m, _ = kernel.shape
    device = kernel.device
    samples = torch.arange(batch, device=device)
    steps = min(steps, m)
    cis = torch.zeros(steps, batch, m, dtype=kernel.dtype, device=device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    closed = ~present
    order = torch.zeros(batch, steps, dtype=torch.long, device=device)
    for i in range(steps):
        j = gains.masked_fill(closed, float("-inf")).argmax(dim=1)
        order[:, i] = j
        e = kernel[samples, j] - torch.einsum("tb,tbn->bn", cis[:i, samples, j], cis[:i])
        e = e / torch.sqrt(gains[samples, j].clamp(min=1e-12))[:, None]
        cis[i] = e
        gains = gains - e.square()
        closed = closed | F.one_hot(j, m).bool()
    return order
