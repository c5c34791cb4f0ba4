"""The criterion interface: what a pruning stage asks to choose image tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

__all__ = ["AttentionFn", "Criterion", "ScoredCriterion", "SelectionContext"]

QueryPolicy = Literal["last", "text_mean"]
SoftmaxDomain = Literal["sequence", "image", "none"]
AttentionFn = Callable[[QueryPolicy, SoftmaxDomain, bool, bool], list[torch.Tensor]]


@dataclass
class SelectionContext:
    """Everything a criterion may read to choose among the image tokens still present.

    Per-sample lists, because samples of a batch may hold different numbers of image tokens.

    Attributes:
        image_ids: per sample, (n_b,) ascending LongTensor of the image tokens still present, as indices into
            the sample's original image tokens (raster order; several images numbered one after another).
        image_grids: per sample, (rows, cols) of each image, in prompt order.
        n_original: per sample, image tokens before any pruning.
        stage_index: 0-based index of the stage being run (seeds per-stage randomness).
    """

    image_ids: list[torch.Tensor]
    image_grids: list[list[tuple[int, int]]]
    n_original: list[int]
    stage_index: int = 0
    attention_fn: AttentionFn | None = None
    vision_features_fn: Callable[[], list[torch.Tensor]] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.image_ids)

    def attention(
        self, query: QueryPolicy, softmax: SoftmaxDomain, rope: bool, full_map: bool = False
    ) -> list[torch.Tensor]:
        """Attention each present image token receives at the stage's scoring layer.

        Returns per sample a (n_b,) float32 tensor aligned with `image_ids[b]`: the query's attention
        probabilities (or raw logits with `softmax="none"`), averaged over heads (and over query tokens for
        `query="text_mean"`). Computed once per policy and shared by every criterion of the stage. With
        `full_map` the whole attention map is computed first (the cost of eager `output_attentions`).
        """
        if self.attention_fn is None:
            raise RuntimeError("this stage has no scoring layer: the criterion needs LLM attention")
        key = ("attention", query, softmax, rope, full_map)
        if key not in self._cache:
            self._cache[key] = self.attention_fn(query, softmax, rope, full_map)
        return self._cache[key]

    def vision_features(self) -> list[torch.Tensor]:
        """Per sample, (n_b, channels) vision-encoder features of the present image tokens (before the projector)."""
        if self.vision_features_fn is None:
            raise RuntimeError("vision features were not captured for this model")
        if "vision" not in self._cache:
            features = self.vision_features_fn()
            self._cache["vision"] = [f[ids.to(f.device)] for f, ids in zip(features, self.image_ids, strict=True)]
        return self._cache["vision"]


class Criterion(ABC):
    """Chooses which present image tokens a stage keeps.

    `requires` names the inputs the engine must capture: "attention" (queries and keys of the scoring
    layer) and/or "vision_features" (the vision encoder's features before the projector).
    """

    requires: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def select(self, ctx: SelectionContext, budgets: list[int]) -> list[torch.Tensor]:
        """Per sample, a sorted 1-D LongTensor of positions into `ctx.image_ids[b]` to keep.

        `budgets[b]` is the stage's token budget for sample b; criteria that fix their own count (a uniform
        grid with a stride, an ensemble without top-up) may keep a different number.
        """

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        """Tokens this criterion is expected to keep, without running it (for cost projections).

        Criteria that keep exactly the budget need not override this.
        """
        return float(budget)

    def ranking(self, ctx: SelectionContext) -> list[torch.Tensor] | None:
        """Per sample, all positions from most to least worth keeping, or None if the criterion has no order."""
        return None


class ScoredCriterion(Criterion):
    """A criterion that scores every present token and keeps the top `budget` of them."""

    @abstractmethod
    def scores(self, ctx: SelectionContext) -> list[torch.Tensor]:
        """Per sample, (n_b,) scores aligned with `ctx.image_ids[b]`; higher means more worth keeping."""

    def select(self, ctx: SelectionContext, budgets: list[int]) -> list[torch.Tensor]:
        return [
            torch.topk(s, k, sorted=False).indices.sort().values
            if k < s.numel()
            else torch.arange(s.numel(), device=s.device)
            for s, k in zip(self.scores(ctx), budgets, strict=True)
        ]

    def ranking(self, ctx: SelectionContext) -> list[torch.Tensor]:
        return [torch.argsort(s, descending=True, stable=True) for s in self.scores(ctx)]
