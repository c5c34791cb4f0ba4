"""The token layout of one stage: which original tokens occupy which row of the reduced sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from vlmprune.errors import VlmpruneError

__all__ = ["Layout", "attention_mask_for", "gather_rows"]


@dataclass
class Layout:
    """Rows of the sequence a group of decoder layers runs on, per sample, left-padded.

    Attributes:
        source: (batch, n) column of each row in the original prefill sequence; -1 for padding rows.
        valid: (batch, n) bool, False for padding rows.
        image_id: (batch, n) index of each row into its sample's image tokens; -1 for text and padding.
        position_ids: the rows' position ids, in the shape the decoder layers take.
        position_embeddings: the rows' (cos, sin); None while the model's own are in use.
        mask: the rows' prefill attention mask in the backend's format; None while the model's own is in use.
        decode_shift: (batch,) subtracted from a decode step's position ids; None with original positions.
    """

    source: torch.Tensor
    valid: torch.Tensor
    image_id: torch.Tensor
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    mask: Any = None
    decode_shift: torch.Tensor | None = None

    @property
    def is_original(self) -> bool:
        return self.position_embeddings is None

    def image_columns(self) -> list[torch.Tensor]:
        """Per sample, the rows holding image tokens, ascending."""
        return [torch.nonzero(row >= 0).flatten() for row in self.image_id]

    def real_tokens(self) -> torch.Tensor:
        """(batch,) rows that are not padding."""
        return self.valid.sum(dim=1)

    def image_tokens(self) -> torch.Tensor:
        """(batch,) rows that hold image tokens."""
        return (self.image_id >= 0).sum(dim=1)


def gather_rows(tensor: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows of `tensor` picked by `index` (batch, n) along the sequence axis `dim` (batch is axis `dim - 1`).

    Leading axes (M-RoPE's 3 position rows) and trailing axes (hidden size, head dim) are broadcast.
    """
    lead, trailing = tensor.shape[: dim - 1], tensor.shape[dim + 1 :]
    expanded = index.view(*([1] * len(lead)), *index.shape, *([1] * len(trailing)))
    return torch.gather(tensor, dim, expanded.expand(*lead, *index.shape, *trailing))


def attention_mask_for(config: Any, valid_keys: torch.Tensor, query_length: int, dtype: torch.dtype) -> Any:
    """The causal attention mask for the last `query_length` of the keys, in the format `config`'s backend takes.

    `valid_keys` is (batch, kv) bool, False for padding keys. Built with transformers' own mask registry, so
    eager gets a float mask, sdpa a bool mask (or None when plain causal suffices), flash a 2-D padding mask.
    """
    impl = config._attn_implementation
    if impl not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise VlmpruneError(
            f"attention implementation {impl!r} has no mask function; register one in "
            "transformers.masking_utils.AttentionMaskInterface (e.g. the sdpa or eager one)"
        )
    kv_length = valid_keys.shape[1]
    return ALL_MASK_ATTENTION_FUNCTIONS[impl](
        batch_size=valid_keys.shape[0],
        q_length=query_length,
        kv_length=kv_length,
        q_offset=kv_length - query_length,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=valid_keys,
        allow_is_causal_skip=True,
        dtype=dtype,
        config=config,
        use_vmap=False,
        device=valid_keys.device,
    )
