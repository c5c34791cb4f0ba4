"""Random scores: the φrand baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmprune.criteria.base import ScoredCriterion, SelectionContext

__all__ = ["RandomScore"]


@dataclass(frozen=True)
class RandomScore(ScoredCriterion):
    """Uniform random scores, so a stage keeps a random subset of the present image tokens.

    FastV's φrand (its `K=0` branch) and the random baseline of UniPruneBench, which finds random pruning a
    strong baseline. Each sample draws `torch.rand(n_original)` over its original image tokens from a CPU
    generator seeded with `seed·1000003 + stage_index`, then reads the present tokens' values: a sample's pick
    depends only on the seed, the stage and its own tokens, never on its place in the batch or on the other
    samples (a padded batch picks what each sample picks alone), and stages draw differently.

    Returns (batch, m) float32 scores on the device of `ctx.image_ids`.
    """

    seed: int = 0

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        draws = {n: self._draw(n, ctx.stage_index) for n in set(ctx.n_original)}  # one draw per image-token count
        table = torch.nn.utils.rnn.pad_sequence([draws[n] for n in ctx.n_original], batch_first=True)
        table = table.to(ctx.image_ids.device)  # a host-to-device copy: nothing waits
        return torch.gather(table, 1, ctx.image_ids.clamp(min=0))

    def _draw(self, n: int, stage_index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1000003 + stage_index)
        return torch.rand(n, generator=generator)
