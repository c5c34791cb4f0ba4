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

    Returns per sample (n_b,) float32 scores on the device of `ctx.image_ids[b]`.
    """

    seed: int = 0

    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        out = []
        for ids, n in zip(ctx.image_ids, ctx.n_original, strict=True):
            generator = torch.Generator().manual_seed(self.seed * 1000003 + ctx.stage_index)
            out.append(torch.rand(n, generator=generator)[ids.cpu()].to(ids.device))
        return out
