"""SparseVLM's selection: image tokens rated by the attention of relevant text tokens, the pruned ones partly recycled
(Zhang et al., ICML 2025, arXiv 2410.04417)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vlmprune.criteria.base import Criterion, MergeSpace, ScoreDtype, SelectionContext, keep_top
from vlmprune.tensors import on_device

__all__ = ["TextRaterAttention", "text_raters"]


def text_raters(ctx: SelectionContext) -> torch.Tensor:
    """(batch, n) bool over the current rows: SparseVLM's text raters (§3.2), the instruction tokens most relevant to
    the image.

    Official code (`LlamaDynamicvitModel.forward`, before the first layer): `m_v_t = v_t @ t_t.T` between the input
    embeddings of every image token (v_t, (N, hidden)) and of the text after the image (t_t, (T, hidden)), softmax
    over the text, mean over the image tokens: (T,); the raters are the text tokens above the mean. Computed here in
    float32 (the code in the model's dtype). A sample whose scores are all equal (one instruction token) would have
    no rater, and the code would average an empty set (NaN): its raters are then all its instruction tokens.
    """
    image, rows = ctx.input_embeddings()  # (batch, N, hidden), (batch, n, hidden)
    _, instruction = ctx.instruction()  # (batch, n)
    n_image = on_device(ctx.n_original, image.device)[:, None]
    image_valid = torch.arange(image.shape[1], device=image.device)[None, :] < n_image  # (batch, N)
    logits = image.float() @ rows.float().transpose(1, 2)  # (batch, N, n)
    relevance = logits.masked_fill(~instruction[:, None, :], float("-inf")).softmax(dim=-1)
    relevance = torch.where(image_valid[:, :, None], relevance, 0.0).sum(dim=1) / n_image  # (batch, n)
    mean = torch.where(instruction, relevance, 0.0).sum(dim=1, keepdim=True) / instruction.sum(dim=1, keepdim=True)
    raters = instruction & (relevance > mean)
    return torch.where(raters.any(dim=1, keepdim=True), raters, instruction)


@dataclass(frozen=True)
class TextRaterAttention(Criterion):
    """Keeps the image tokens the text raters attend to most; recycles some pruned ones into cluster tokens.

    Official code: Gumpest/SparseVLMs (`26a5f48`, `USE_VERSION=1_0`, the default), `llava/model/language_model/
    modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`), `score.py` (`attn_postprocess_topk`,
    `attn_postprocess_rank` of the first release `91fb6d9`) and `utils.py` (`cluster_and_merge`). Per sample with n
    image tokens present, at the scoring layer (the code's pruning layer, whose output is cut):

    1. relevance: the raters' (`text_raters`) softmax attention over the sequence (causal, RoPE applied), averaged
       over heads, to each image token, averaged over the raters;
    2. the top `min(count, n - 1)` image tokens by relevance are kept (the code's `topk`; always one fewer than n at
       most). With `adaptive` (the first release's rule) the count is `int(rank · scale + bias)`, rank being the
       rank of the (raters, n) attention matrix (`torch.linalg.matrix_rank`, float32); a rank equal to n keeps
       every token and recycles none. `count` is ignored then;
    3. recycling (`recycle`): of the p pruned tokens, the `int(p · recycle_share) + 1` most relevant are clustered
       by DPC-kNN over the stage's hidden states (the code's `layer_outputs[0]`: the input of the next layer) into
       `r // tokens_per_cluster + 1` clusters (k = that many neighbours per density, d_ij = ‖x_i − x_j‖/√C, the
       densest point's δ the global max of d, centres the largest ρ·δ, every token to its nearest centre); each
       cluster becomes one token, the mean of its members.

    Differences from the code: a cluster token takes its centre's slot, in raster order among the kept tokens, and
    its position (the code appends the cluster tokens after the kept ones, in centre order, before renumbering);
    the code's 1e-6 noise on densities and its mean's `+ 1e-6` are left out: density ties go to the earlier token,
    and a token equally near two centres to the one earlier in raster order. Several samples run batched (the code
    runs one). Scores in the model's dtype (`score_dtype="model"`) round as the code's sdpa path does up to its
    scaling (`q·kᵀ·(1/√d)` there, `/√d` here); the clustering runs in float32.
    """

    count: int | None = None
    recycle: bool = True
    recycle_share: float = 0.3
    tokens_per_cluster: int = 10
    adaptive: bool = False
    scale: float = 13.5
    bias: float = 0.0
    score_dtype: ScoreDtype = "model"

    requires: ClassVar[frozenset[str]] = frozenset({"attention"})

    def __post_init__(self) -> None:
        if not self.adaptive and (self.count is None or self.count < 0):
            raise ValueError(f"count must be a non-negative token count unless adaptive, got {self.count!r}")
        if not 0.0 <= self.recycle_share <= 1.0:
            raise ValueError(f"recycle_share must be in [0, 1], got {self.recycle_share}")
        if self.tokens_per_cluster < 1:
            raise ValueError(f"tokens_per_cluster must be >= 1, got {self.tokens_per_cluster}")
        if self.adaptive and self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.score_dtype not in ("model", "float32"):
            raise ValueError(f"score_dtype must be 'model' or 'float32', got {self.score_dtype!r}")

    @property
    def merges(self) -> MergeSpace | None:  # type: ignore[override]
        return "hidden" if self.recycle else None

    # Counts, on the host when the count is fixed ---------------------------------------------------------------

    def plan(self, n_present: int) -> tuple[int, int, int]:
        """(kept by relevance, recycled, clusters) of a sample with `n_present` image tokens, for a fixed count."""
        kept = max(min(self.count, n_present - 1), 0)
        if not self.recycle or n_present - kept == 0:
            return kept, 0, 0
        recycled = int((n_present - kept) * self.recycle_share) + 1  # the code's `int(p * 0.3) + 1`
        return kept, recycled, recycled // self.tokens_per_cluster + 1

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int] | None:
        if self.adaptive:
            return None  # the rank of the attention matrix sets the count, on the device
        return [kept + clusters for kept, _, clusters in map(self.plan, ctx.counts)]

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        if self.adaptive:
            return float(n_present)  # unknown without the attention: assume nothing is cut
        kept, _, clusters = self.plan(n_present)
        return float(kept + clusters)

    # Selection ---------------------------------------------------------------------------------------------------

    def _roles(self, ctx: SelectionContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept, recycled, centres) (batch, m) bool masks and the (batch, m) float32 relevance."""
        if "sparsevlm" in ctx._cache:
            return ctx._cache["sparsevlm"]
        present = ctx.present
        weights, valid = ctx.rows_attention(text_raters(ctx), "sequence", True, self.score_dtype)  # (batch, q, m)
        relevance = torch.where(valid[:, :, None], weights.float(), 0.0).sum(dim=1) / valid.sum(dim=1, keepdim=True)
        if self.score_dtype == "model":
            relevance = relevance.to(weights.dtype).float()  # the code's mean over raters, in the model's dtype
        order = torch.sort(relevance.masked_fill(~present, float("-inf")), dim=1, descending=True, stable=True).indices
        n = on_device(ctx.counts, present.device)
        if self.adaptive:
            rank = _rank(weights.float(), valid, present)
            kept_count = torch.minimum((rank * self.scale + self.bias).floor().long().clamp(min=0), n - 1)
            cuts = rank != n  # the code keeps everything when the rank is n
            kept_count = torch.where(cuts, kept_count.clamp(min=0), n)
            pruned = n - kept_count
            recycled_count = torch.where(
                cuts & (pruned > 0), (pruned.double() * self.recycle_share).floor().long() + 1, 0
            )
            if not self.recycle:
                recycled_count = torch.zeros_like(recycled_count)
            clusters = torch.where(recycled_count > 0, recycled_count // self.tokens_per_cluster + 1, 0)
            kept_count, recycled_count, clusters = kept_count[:, None], recycled_count[:, None], clusters[:, None]
        else:
            plans = [self.plan(c) for c in ctx.counts]
            kept_count = ctx.budgets_tensor([p[0] for p in plans])
            recycled_count = ctx.budgets_tensor([p[1] for p in plans])
            clusters = ctx.budgets_tensor([p[2] for p in plans])
        kept = keep_top(order, kept_count) & present
        recycled = keep_top(order, kept_count + recycled_count) & present & ~kept  # the most relevant pruned ones
        if self.recycle:
            # distances among the recycled tokens only (a sample's width known on the host unless adaptive)
            width = present.shape[1] if self.adaptive else max((p[1] for p in plans), default=0)
            distance = _member_distances(ctx.hidden_states().float(), recycled, width)
            ctx._cache["sparsevlm_distances"] = distance
            centres = _density_peaks(distance, ctx.hidden_states().shape[-1], recycled, clusters, order)
        else:
            centres = torch.zeros_like(kept)
        roles = (kept, recycled, centres, relevance)
        ctx._cache["sparsevlm"] = roles
        return roles

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        kept, _, centres, _ = self._roles(ctx)
        return kept | centres

    def merge_weights(self, ctx: SelectionContext, budgets: list[int], keep: torch.Tensor) -> torch.Tensor:
        kept, recycled, centres, _ = self._roles(ctx)
        distance = ctx._cache["sparsevlm_distances"]  # among the recycled tokens, of which the centres are some
        distance = distance.masked_fill(~centres[:, None, :], float("inf"))
        slots = torch.arange(kept.shape[1], device=kept.device)
        own = centres[:, :, None] & (slots[None, :, None] == slots[None, None, :])
        nearest = distance.masked_fill(own, -1.0).argmin(dim=-1)  # (batch, m): each token's centre, itself if one
        assigned = F.one_hot(nearest, kept.shape[1]).float() * recycled[:, :, None].float()  # (member, centre)
        per_centre = assigned.sum(dim=1).clamp(min=1.0)  # (batch, m)
        weights = assigned.transpose(1, 2) / per_centre[:, :, None]  # row c: 1/size for each member of cluster c
        return weights + torch.diag_embed(kept.float())  # a token kept by relevance keeps its own state


def _rank(weights: torch.Tensor, valid: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(batch,) long: the rank of each sample's (raters, image tokens) attention matrix, as `torch.linalg.matrix_rank`
    computes it alone (singular values above σ_max · max(rows, cols) · eps), though the matrices are zero-padded."""
    singular = torch.linalg.svdvals(weights)  # zero rows and columns add only zero singular values
    size = torch.maximum(valid.sum(dim=1), present.sum(dim=1)).float()
    tolerance = singular[:, :1] * size[:, None] * torch.finfo(weights.dtype).eps
    return (singular > tolerance).sum(dim=1)


def _density_peaks(
    distance: torch.Tensor, channels: int, members: torch.Tensor, clusters: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """(batch, m) bool: the `clusters[b]` (batch, 1) DPC-kNN centres among each sample's `members` (batch, m), from
    the Euclidean `distance` (batch, m, m) between their states of `channels` channels (`_member_distances`),
    k = `clusters[b]` neighbours per density (the code's `cluster_and_merge`); `order` (batch, m) lists the slots
    by relevance, the order in which the code hands the recycled tokens over.

    ρ_i = exp(−mean of the k smallest d_ij²) over the members (itself included), d_ij = ‖x_i − x_j‖ / √C;
    δ_i = min d_ij over the members denser than i, or the largest d among the members for the densest; centres: the
    largest ρ·δ. Neighbour counts stay on the device (a full sort of each row, no host read). Ties in ρ and in ρ·δ
    go to the more relevant token instead of the code's 1e-6 noise: what the code's `topk` does without the noise,
    and what matters with one cluster, where k = 1 gives every token ρ = 1 (the centre is then the most relevant
    recycled token; the code's merged token is the same mean whatever the centre, but here the centre is its slot).
    """
    m = distance.shape[1]
    d = distance / math.sqrt(channels)
    pair = members[:, :, None] & members[:, None, :]
    nearest = torch.sort(d.masked_fill(~members[:, None, :], float("inf")), dim=-1).values
    rank = torch.arange(m, device=d.device)
    counted = rank[None, None, :] < clusters[:, :, None]  # (batch, 1, m)
    density = torch.exp(-torch.where(counted, nearest, 0.0).pow(2).sum(dim=-1) / clusters.clamp(min=1))
    ranks = torch.arange(m, device=d.device).expand_as(order)
    priority = torch.empty_like(order).scatter_(1, order, ranks)  # each slot's place in relevance order
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (priority[:, None, :] < priority[:, :, None])
    )
    denser &= members[:, None, :]
    fallback = d.masked_fill(~pair, float("-inf")).amax(dim=(1, 2))[:, None, None]
    delta = torch.where(denser, d, fallback).min(dim=-1).values
    score = torch.gather((density * delta).masked_fill(~members, float("-inf")), 1, order)  # in relevance order
    by_score = torch.gather(order, 1, torch.sort(score, dim=1, descending=True, stable=True).indices)
    return keep_top(by_score, clusters) & members


def _member_distances(x: torch.Tensor, members: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, m, m) Euclidean distances between the rows of x (batch, m, C) that are `members` (batch, m), at most
    `width` per sample; 0 where either is not a member. Computed pairwise on the members alone (a few dozen of the
    m slots), as the code's `(x1 - x2).norm()`: the matrix-product shortcut leaves the diagonal off zero, and k = 1
    densities (one cluster) then differ by rounding noise instead of tying."""
    batch, m, channels = x.shape
    width = min(width, m)
    slots = torch.sort(members.int(), dim=1, descending=True, stable=True).indices[:, :width]  # members first
    inside = torch.gather(members, 1, slots)
    rows = torch.gather(x, 1, slots[:, :, None].expand(-1, -1, channels))
    among = torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist")  # (batch, width, width)
    among = among.masked_fill(~(inside[:, :, None] & inside[:, None, :]), 0.0)
    flat = (slots[:, :, None] * m + slots[:, None, :]).flatten(1)  # (batch, width²) into the (m, m) grid
    return x.new_zeros(batch, m * m).scatter(1, flat, among.flatten(1)).view(batch, m, m)
