"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
ICML 2025, arXiv 2410.04417)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria import TextRaterAttention
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["SCHEDULES", "SparseVLM"]

# Image tokens kept by relevance at each of the three cuts, per budget (the code's `sparse_token_dict`, score.py of
# Gumpest/SparseVLMs `26a5f48` with USE_VERSION=1_0, the same for 192/128/64 as the ICML-era release `535f8ba`).
# The budget is the average image-token count over LLaVA-1.5-7B's 32 layers: 192 ≈ (2·576 + 4·300 + 9·200 + 17·110)/32
# plus the recycled tokens.
SCHEDULES: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}


@dataclass
class SparseVLM(Method):
    """SparseVLM: three cuts inside the language model, image tokens rated by the attention of relevant text tokens,
    part of the pruned tokens recycled into cluster tokens.

    Official code: Gumpest/SparseVLMs (`26a5f48`, default `USE_VERSION=1_0`), `llava/model/language_model/
    modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`: `pruning_loc=[2, 6, 15]`, raters, recycling),
    `score.py` (`sparse_token_dict`, `attn_postprocess_topk`), `utils.py` (`cluster_and_merge`); the rank rule from
    the first release (`91fb6d9`, `attn_postprocess_rank`, `scale=13.5`, `bias=0`). See `TextRaterAttention` for
    the rule. LightCompress (ModelTC, `llmc/compression/token_reduction/sparsevlm.py`) uses the same table and
    layers.

    Layers: the code scores with the attention of layers 2, 6 and 15 and cuts their output, so layers 3, 7 and 16
    are the first to run on the kept tokens: `layers` are those (vlmprune's stage layers), scored by the layer before
    each (`scoring="before"`). Positions are renumbered after each cut, as the code's `position_ids[:, :n]` does
    (LightCompress keeps the original ones: `positions="original"`).

    Budget: `keep` names the schedule (192, 128, 96 or 64: `SCHEDULES`), each stage keeping that many tokens by
    relevance (at most n − 1) plus its cluster tokens; any other `keep` scales the nearest listed budget's counts by
    keep / that budget (`int()`, at least 1; the code supports only the listed ones). `counts` gives each stage's
    count directly (any number of layers). `adaptive=True` is the first release's rule instead: each count is
    `int(rank · scale + bias)` of the rank of the raters' attention matrix (the release's scripts use scale 13.5,
    9 + bias 6, 0.8 per benchmark); the counts and `keep` are then ignored.

    Paper vs code: the paper (§3.3) sets each layer's count from the rank of the attention matrix and the
    recycling share by a hyperparameter; the current code replaced the rank rule by the fixed table above (kept as
    the default here), and the first release pruned at layers 2, 6, 15 and 19.
    """

    name: ClassVar[str] = "sparsevlm"
    paper: ClassVar[str] = "SparseVLM, Zhang et al., ICML 2025 (arXiv 2410.04417)"

    layers: tuple[int, ...] = (3, 7, 16)
    keep: int = 192
    counts: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_share: float = 0.3
    tokens_per_cluster: int = 10
    adaptive: bool = False
    scale: float = 13.5
    bias: float = 0.0
    positions: Literal["original", "renumbered"] = "renumbered"
    score_dtype: Literal["model", "float32"] = "model"

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
            raise ValueError(
                f"layers must be strictly increasing and >= 1 (each scored by the layer before it), got {self.layers}"
            )
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"keep must be a positive image-token budget (192, 128, 96, 64), got {self.keep!r}")
        if self.counts is not None:
            self.counts = tuple(self.counts)
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.counts):
                raise ValueError(f"counts must be non-negative integers, got {self.counts!r}")
            if len(self.counts) != len(self.layers):
                raise ValueError(f"counts has {len(self.counts)} values for {len(self.layers)} layers {self.layers}")
        elif not self.adaptive and len(self.layers) != 3:
            raise ValueError(
                f"the schedule of keep={self.keep} has 3 counts, for 3 layers; got layers {self.layers}: give counts"
            )
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")
        self.criteria()  # validates the criterion's fields

    def stage_counts(self) -> tuple[int, ...] | None:
        """Each stage's count of tokens kept by relevance (before cluster tokens); None with `adaptive`."""
        if self.adaptive:
            return None
        if self.counts is not None:
            return self.counts
        if self.keep in SCHEDULES:
            return SCHEDULES[self.keep]
        nearest = min(SCHEDULES, key=lambda budget: (abs(budget - self.keep), budget))
        return tuple(max(1, int(c * self.keep / nearest)) for c in SCHEDULES[nearest])

    def criteria(self) -> list[TextRaterAttention]:
        counts = self.stage_counts() or (None,) * len(self.layers)
        return [
            TextRaterAttention(
                count=count,
                recycle=self.recycle,
                recycle_share=self.recycle_share,
                tokens_per_cluster=self.tokens_per_cluster,
                adaptive=self.adaptive,
                scale=self.scale,
                bias=self.bias,
                score_dtype=self.score_dtype,
            )
            for count in counts
        ]

    def stages(self) -> list[Stage]:
        # The criterion sets its own count (the code's `min(count, n - 1)` never asks for more than is present).
        budget = Keep.fraction_of_current(1.0)
        return [
            Stage(layer=layer, criterion=criterion, budget=budget, scoring="before", positions=self.positions)
            for layer, criterion in zip(self.layers, self.criteria(), strict=True)
        ]
