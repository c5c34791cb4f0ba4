"""Attention scores from a decoder layer's own queries and keys, computed only for the rows needed."""

from __future__ import annotations

import torch
from torch import nn

from vlmprune.adapters.base import ModelAdapter
from vlmprune.criteria.base import QueryPolicy, ScoreDtype, SoftmaxDomain
from vlmprune.engine.layout import Layout, compact, gather_rows

__all__ = ["AttentionProbe"]

_CHUNK = 256  # query rows scored at once by `query="all"`


class AttentionProbe:
    """The scoring layer's input, kept until the stage it scores for runs.

    Holds references only; queries and keys are projected when a criterion asks, for the query rows and the
    keys of the softmax domain, so no backend has to return attention weights.

    Args:
        hidden: (batch, n, hidden) the scoring layer's input hidden states.
        layout: the rows `hidden` holds.
        position_embeddings: (cos, sin), each (batch, n, head_dim), in effect at the scoring layer.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        layer: nn.Module,
        hidden: torch.Tensor,
        layout: Layout,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self.adapter = adapter
        self.layer = layer
        self.hidden = hidden
        self.layout = layout
        self.position_embeddings = position_embeddings

    def __call__(
        self,
        query: QueryPolicy,
        softmax: SoftmaxDomain,
        rope: bool,
        full_map: bool = False,
        score_dtype: ScoreDtype = "float32",
    ) -> torch.Tensor:
        """(batch, m) attention received by each image row, in the layout's image slots; 0 in padding.

        `full_map=True` computes the whole (heads, seq, seq) map and reads the query rows from it, the cost of
        eager attention with `output_attentions` (original FastV); the scores are the same. `query="all"` is
        the attention each image row receives from every other row, averaged over them (see
        `_received_from_all`). `score_dtype` (see `_head_mean`): "float32" scores in float32; "model" rounds as
        the official codes do and returns the model's dtype.
        """
        layout, device = self.layout, self.hidden.device
        image_cols, image_valid = layout.image_slots()
        if query == "all":
            received = self._received_from_all(softmax, rope, score_dtype)
            return torch.gather(received, 1, image_cols).masked_fill(~image_valid, 0.0)
        query_cols, query_valid = self._query_rows(query, image_cols, image_valid)
        if full_map:
            picked = self._from_full_map(query_cols, query_valid, softmax, rope, score_dtype)
            return torch.gather(picked, 1, image_cols).masked_fill(~image_valid, 0.0)
        if softmax == "sequence":
            n = layout.valid.shape[1]
            key_cols = torch.arange(n, device=device).expand(len(image_cols), n)
            key_valid = layout.valid
        else:
            key_cols, key_valid = image_cols, image_valid

        q = self._project("q", query_cols, rope)  # (batch, heads, queries, head_dim)
        k = self._project("k", key_cols, rope)  # (batch, heads, keys, head_dim)
        allowed = key_valid[:, None, :] & (key_cols[:, None, :] <= query_cols[:, :, None])  # (batch, q, k)
        weights = self._head_mean(q, k, allowed, softmax, score_dtype)  # (batch, queries, keys)
        # padding query rows see no key (their softmax is NaN): drop them before averaging over queries
        weights = _query_mean(weights, query_valid)
        if softmax == "sequence":
            weights = torch.gather(weights, 1, image_cols)
        return weights.masked_fill(~image_valid, 0.0)

    def rows_attention(
        self, rows: torch.Tensor, softmax: SoftmaxDomain, rope: bool, score_dtype: ScoreDtype = "float32"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of each query row in `rows` ((batch, n) bool) to the image rows, averaged over heads:
        ((batch, q, m) in the layout's image slots, 0 in padding; (batch, q) validity of the query slots).

        Reads each sample's number of query rows once (as `query="text_mean"` does)."""
        layout, device = self.layout, self.hidden.device
        image_cols, image_valid = layout.image_slots()
        query_cols, query_valid = compact(rows, rows.sum(dim=1).tolist())
        if softmax == "sequence":
            n = layout.valid.shape[1]
            key_cols, key_valid = torch.arange(n, device=device).expand(len(image_cols), n), layout.valid
        else:
            key_cols, key_valid = image_cols, image_valid
        q = self._project("q", query_cols, rope)
        k = self._project("k", key_cols, rope)
        allowed = key_valid[:, None, :] & (key_cols[:, None, :] <= query_cols[:, :, None])
        weights = self._head_mean(q, k, allowed, softmax, score_dtype)  # (batch, queries, keys)
        if softmax == "sequence":
            weights = torch.gather(weights, 2, image_cols[:, None, :].expand(-1, weights.shape[1], -1))
        # padding query rows see no key (NaN softmax): zeroed with the padding image slots
        return weights.masked_fill(~(query_valid[:, :, None] & image_valid[:, None, :]), 0.0), query_valid

    def _head_mean(
        self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, softmax: SoftmaxDomain, score_dtype: ScoreDtype
    ) -> torch.Tensor:
        """(batch, queries, keys) attention of queries q (batch, heads, queries, d) over keys k (batch, heads, keys,
        d), averaged over heads; `allowed` (batch, queries, keys) says which keys each query sees.

        "model" follows the official codes of FastV, PyramidDrop and FEATHER step by step: q·kᵀ in the model's
        dtype divided by √d, softmax in float32 cast back to the model's dtype, mean over heads in that dtype
        (torch accumulates it in float32 and rounds once). In bf16 the rounding creates ties and reorders close
        scores, so only this reproduces the official selections. "float32" computes everything in float32.
        """
        scaling = self.adapter.scaling(self.layer)
        if score_dtype == "model":
            logits = torch.matmul(q, k.transpose(-1, -2)) / (1.0 / scaling)  # the official `/ math.sqrt(head_dim)`
        else:
            logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
        if softmax == "none":
            weights = logits.masked_fill(~allowed[:, None], 0.0)
        else:
            weights = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1, dtype=torch.float32)
            weights = weights.to(logits.dtype)
        return weights.mean(dim=1)

    def _from_full_map(
        self,
        query_cols: torch.Tensor,
        query_valid: torch.Tensor,
        softmax: SoftmaxDomain,
        rope: bool,
        score_dtype: ScoreDtype = "float32",
    ) -> torch.Tensor:
        """(batch, seq) attention each row receives from the query rows, read off the whole attention map."""
        n = self.layout.valid.shape[1]
        rows = torch.arange(n, device=self.hidden.device).expand(len(query_cols), n)
        q, k = self._project("q", rows, rope), self._project("k", rows, rope)
        allowed = self.layout.valid[:, None, :] & (rows[:, None, :] <= rows[:, :, None])  # (batch, seq, seq)
        if softmax == "image":
            allowed = allowed & (self.layout.image_id >= 0)[:, None, :]
        weights = self._head_mean(q, k, allowed, softmax, score_dtype).nan_to_num(0.0)  # padding rows see nothing
        picked = torch.gather(weights, 1, query_cols[:, :, None].expand(-1, -1, n))  # (batch, queries, seq)
        return _query_mean(picked, query_valid)

    def _received_from_all(self, softmax: SoftmaxDomain, rope: bool, score_dtype: ScoreDtype) -> torch.Tensor:
        """(batch, seq) attention each row receives from every other real row, averaged over those n - 1 rows.

        FastV's paper: "the average attention-score one token received from all other tokens". Each query row
        keeps its own softmax (itself included, as the model attends); only its attention to itself is left out
        of the sum. Under the causal mask the rows before a token give it nothing and count as 0. Query rows are
        taken `_CHUNK` at a time, so at most (batch, heads, _CHUNK, seq) logits exist at once; no host reads.
        """
        layout, device = self.layout, self.hidden.device
        valid = layout.valid
        batch, n = valid.shape
        cols = torch.arange(n, device=device)
        rows = cols.expand(batch, n)
        q, k = self._project("q", rows, rope), self._project("k", rows, rope)
        keys = valid & (layout.image_id >= 0) if softmax == "image" else valid
        total = torch.zeros(batch, n, dtype=torch.float32, device=device)
        for start in range(0, n, _CHUNK):
            chunk = cols[start : start + _CHUNK]
            causal = cols[None, :] <= chunk[:, None]  # (chunk, seq)
            allowed = keys[:, None, :] & causal
            weights = self._head_mean(q[:, :, start : start + _CHUNK], k, allowed, softmax, score_dtype)
            counted = valid[:, start : start + _CHUNK, None] & (cols[None, :] != chunk[:, None])  # real rows, not self
            total += torch.where(counted, weights.float().nan_to_num(0.0), 0.0).sum(dim=1)
        others = (valid.sum(dim=1, keepdim=True) - 1).clamp(min=1)
        return (total / others).to(q.dtype if score_dtype == "model" else torch.float32)

    def _query_rows(
        self, query: QueryPolicy, image_cols: torch.Tensor, image_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, queries) query rows and their validity.

        "last" needs nothing from the host. "text_mean" reads how many text rows follow each sample's last image
        token, once per stage (an option, not the papers' default).
        """
        layout = self.layout
        n = layout.valid.shape[1]
        cols = torch.arange(n, device=layout.valid.device)
        last = torch.where(layout.valid, cols, -1).max(dim=1).values
        if query == "last":
            return last[:, None], torch.ones_like(last[:, None], dtype=torch.bool)
        text = layout.instruction_rows()  # the text after the last image (no text there: the last row)
        return compact(text, text.sum(dim=1).tolist())

    def keys(self, rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys, heads concatenated: (image slots (batch, m, heads·head_dim), rows (batch, n, ...)).

        Keys are repeated to the query heads (GQA); `rope` applies the rows' rotary embeddings."""
        batch, n = self.layout.valid.shape
        rows = torch.arange(n, device=self.hidden.device).expand(batch, n)
        keys = self._project("k", rows, rope).transpose(1, 2).flatten(2)  # (batch, n, heads * head_dim)
        image_cols, _ = self.layout.image_slots()
        return gather_rows(keys, image_cols), keys

    def _project(self, which: str, cols: torch.Tensor, rope: bool) -> torch.Tensor:
        x = self.adapter.normed_input(self.layer, gather_rows(self.hidden, cols))
        pe = tuple(gather_rows(t, cols, dim=t.dim() - 2) for t in self.position_embeddings) if rope else None
        return self.adapter.project(self.layer, x, which, pe)


def _query_mean(weights: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """(batch, keys): the mean of (batch, queries, keys) `weights` over the valid queries, in float32, returned in
    the weights' dtype (one rounding, as `torch.mean` in bf16 does; exact for a single query)."""
    summed = torch.where(query_valid[..., None], weights.float(), 0.0).sum(dim=1)
    return (summed / query_valid.sum(dim=1, keepdim=True)).to(weights.dtype)
