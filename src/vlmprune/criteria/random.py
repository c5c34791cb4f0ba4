"""Random scores: the φrand baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmprune.criteria.base import ScoredCriterion, SelectionContext
from vlmprune.tensors import on_device

__all__ = ["RandomScore"]


@dataclass(frozen=True)
class RandomScore(ScoredCriterion):
    """Uniform random scores, so a stage keeps a random subset of the present image tokens.

    FastV's φrand (its `K=0` branch) and the random baseline of UniPruneBench, which finds random pruning a
    strong baseline. Each sample draws `torch.rand(n_original)` over its original image tokens from a CPU
    generator seeded with `seed·1000003 + stage_index`, then reads the present tokens' values: a sample's pick
    depends only on the seed, the stage and its own tokens, never on its place in the batch or on the other
    samples (a padded batch picks what each sample picks alone), and stages draw differently.

    With `per_sample=True` every sample of a batch draws its own scores instead (row b of one
    `torch.rand(batch, n)` draw), so samples with the same image tokens keep different ones; a sample's pick
    then depends on its place in the batch.

    Returns (batch, m) float32 scores on the device of `ctx.image_ids`.
    """

    seed: int = 0
    per_sample: bool = False

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        seed = self.seed * 1000003 + ctx.stage_index
        if self.per_sample:
            table = torch.rand(ctx.batch_size, max(ctx.n_original), generator=torch.Generator().manual_seed(seed))
        else:  # each sample draws from the same seed: it picks the same tokens alone or in any batch
            draws = {n: torch.rand(n, generator=torch.Generator().manual_seed(seed)) for n in set(ctx.n_original)}
            table = torch.nn.utils.rnn.pad_sequence([draws[n] for n in ctx.n_original], batch_first=True)
        table = on_device(table, ctx.image_ids.device)
        return torch.gather(table, 1, ctx.image_ids.clamp(min=0))
