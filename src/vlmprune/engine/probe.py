"""Attention scores from a decoder layer's own queries and keys, computed only for the rows needed."""

from __future__ import annotations

import torch
from torch import nn

from vlmprune.adapters.base import ModelAdapter
from vlmprune.criteria.base import QueryPolicy, SoftmaxDomain
from vlmprune.engine.layout import Layout, compact, gather_rows

__all__ = ["AttentionProbe"]


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

    def __call__(self, query: QueryPolicy, softmax: SoftmaxDomain, rope: bool, full_map: bool = False) -> torch.Tensor:
        """(batch, m) float32 attention received by each image row, in the layout's image slots; 0 in padding.

        `full_map=True` computes the whole (heads, seq, seq) map and reads the query rows from it, the cost of
        eager attention with `output_attentions` (original FastV); the scores are the same.
        """
        layout, device = self.layout, self.hidden.device
        image_cols, image_valid = layout.image_slots()
        query_cols, query_valid = self._query_rows(query, image_cols, image_valid)
        if full_map:
            picked = self._from_full_map(query_cols, query_valid, softmax, rope)
            return torch.gather(picked, 1, image_cols).masked_fill(~image_valid, 0.0)
        if softmax == "sequence":
            n = layout.valid.shape[1]
            key_cols = torch.arange(n, device=device).expand(len(image_cols), n)
            key_valid = layout.valid
        else:
            key_cols, key_valid = image_cols, image_valid

        q = self._project("q", query_cols, rope)  # (batch, heads, queries, head_dim)
        k = self._project("k", key_cols, rope)  # (batch, heads, keys, head_dim)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.adapter.scaling(self.layer)
        allowed = key_valid[:, None, :] & (key_cols[:, None, :] <= query_cols[:, :, None])  # (batch, q, k)
        if softmax == "none":
            weights = logits.masked_fill(~allowed[:, None], 0.0)
        else:
            weights = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        weights = weights.mean(dim=1)  # over heads -> (batch, queries, keys)
        # padding query rows see no key (their softmax is NaN): drop them before averaging over queries
        weights = torch.where(query_valid[..., None], weights, 0.0).sum(dim=1)
        weights = weights / query_valid.sum(dim=1, keepdim=True)
        if softmax == "sequence":
            weights = torch.gather(weights, 1, image_cols)
        return weights.masked_fill(~image_valid, 0.0)

    def _from_full_map(
        self, query_cols: torch.Tensor, query_valid: torch.Tensor, softmax: SoftmaxDomain, rope: bool
    ) -> torch.Tensor:
        """(batch, seq) attention each row receives from the query rows, read off the whole attention map."""
        n = self.layout.valid.shape[1]
        rows = torch.arange(n, device=self.hidden.device).expand(len(query_cols), n)
        q, k = self._project("q", rows, rope), self._project("k", rows, rope)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.adapter.scaling(self.layer)
        allowed = self.layout.valid[:, None, :] & (rows[:, None, :] <= rows[:, :, None])  # (batch, seq, seq)
        if softmax == "image":
            allowed = allowed & (self.layout.image_id >= 0)[:, None, :]
        if softmax == "none":
            weights = logits.masked_fill(~allowed[:, None], 0.0)
        else:
            weights = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        weights = weights.mean(dim=1).nan_to_num(0.0)  # (batch, seq, seq); padding rows see nothing
        picked = torch.gather(weights, 1, query_cols[:, :, None].expand(-1, -1, n))  # (batch, queries, seq)
        return torch.where(query_valid[..., None], picked, 0.0).sum(dim=1) / query_valid.sum(dim=1, keepdim=True)

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
        after = torch.where(image_valid, image_cols, -1).max(dim=1, keepdim=True).values
        text = layout.valid & (layout.image_id < 0) & (cols > after)
        text |= ~text.any(dim=1, keepdim=True) & (cols == last[:, None])  # no text after the image: the last row
        return compact(text, text.sum(dim=1).tolist())

    def _project(self, which: str, cols: torch.Tensor, rope: bool) -> torch.Tensor:
        x = self.adapter.normed_input(self.layer, gather_rows(self.hidden, cols))
        pe = tuple(gather_rows(t, cols) for t in self.position_embeddings) if rope else None
        return self.adapter.project(self.layer, x, which, pe)
