"""The token layout of one stage: which original tokens occupy which row of the reduced sequence."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import masking_utils

from vlmprune.errors import VlmpruneError
from vlmprune.tensors import on_device

__all__ = ["Layout", "attention_mask_for", "compact", "full_attention_mask", "gather_rows", "valid_keys_of"]


@dataclass
class Layout:
    """Rows of the sequence a group of decoder layers runs on, per sample, left-padded.

    Attributes:
        source: (batch, n) column of each row in the original prefill sequence; -1 for padding rows.
        valid: (batch, n) bool, False for padding rows.
        image_id: (batch, n) index of each row into its sample's image tokens; -1 for text and padding.
        position_ids: the rows' position ids, (..., batch, n) as the decoder stack takes them (M-RoPE's axes lead;
            `ModelAdapter.layer_position_ids` says what a layer gets of them).
        position_embeddings: the rows' (cos, sin), each (..., batch, n, head_dim); None while the model's own are
            in use.
        mask: the rows' prefill attention mask in the backend's format; None while the model's own is in use.
        decode_shift: (batch,) subtracted from a decode step's position ids; None with original positions.
        n_real: per sample, rows that are not padding (host integers, so that no step waits for the device).
        n_image: per sample, rows that hold image tokens (host integers).
    """

    source: torch.Tensor
    valid: torch.Tensor
    image_id: torch.Tensor
    position_ids: torch.Tensor
    n_real: list[int]
    n_image: list[int]
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    mask: Any = None
    decode_shift: torch.Tensor | None = None

    @property
    def is_original(self) -> bool:
        return self.position_embeddings is None

    @property
    def width(self) -> int:
        """Rows per sample, padding included."""
        return self.valid.shape[1]

    @property
    def padded(self) -> bool:
        """Whether some row is padding (known on the host)."""
        return min(self.n_real) < self.valid.shape[1]

    def image_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, m) rows holding each sample's image tokens, ascending and left-aligned, and their validity.

        m is the largest image-token count; slots past a sample's count hold row 0 and are invalid.
        """
        return compact(self.image_id >= 0, self.n_image)

    def instruction_rows(self) -> torch.Tensor:
        """(batch, n) bool: the text rows after each sample's last image token (the prompt's instruction); the last
        real row when no text follows the image. Computed on the device, nothing read on the host."""
        cols = torch.arange(self.valid.shape[1], device=self.valid.device)
        last = torch.where(self.valid, cols, -1).max(dim=1, keepdim=True).values
        after = torch.where(self.image_id >= 0, cols, -1).max(dim=1, keepdim=True).values
        text = self.valid & (self.image_id < 0) & (cols > after)
        return text | (~text.any(dim=1, keepdim=True) & (cols == last))


def compact(mask: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, max(counts)) columns where `mask` (batch, n) is True, ascending, left-aligned, and their validity.

    `counts[b]` is the number of True in row b, known on the host, so nothing waits for the device: a stable
    descending sort brings each row's True columns first, in order. Slots past a row's count hold column 0.
    """
    width = max(counts, default=0)
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device) < on_device(counts, mask.device)[:, None]
    return order.masked_fill(~valid, 0), valid


def gather_rows(tensor: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows of `tensor` picked by `index` (batch, n) along the sequence axis `dim` (batch is axis `dim - 1`).

    Leading axes (M-RoPE's 3 position rows) and trailing axes (hidden size, head dim) are broadcast.
    """
    lead, trailing = tensor.shape[: dim - 1], tensor.shape[dim + 1 :]
    expanded = index.view(*([1] * len(lead)), *index.shape, *([1] * len(trailing)))
    return torch.gather(tensor, dim, expanded.expand(*lead, *index.shape, *trailing))


def attention_mask_for(
    config: Any,
    valid_keys: torch.Tensor,
    query_length: int,
    dtype: torch.dtype,
    padded: bool | None,
    query_start: int | torch.Tensor | None = None,
) -> Any:
    """The causal attention mask of `query_length` queries over `valid_keys`, in the format `config`'s backend takes.

    `valid_keys` is (batch, kv) bool, False for padding keys. Query i sits at key `query_start + i`: by default the
    queries are the last keys; a static cache's keys run past them to its capacity, and the unused slots are
    excluded by causality (`query_start` may then be a device scalar, so that a compiled decode step reads no
    changing host value). `padded` says whether a key the queries can reach is padding, from host-side counts so
    that choosing the format does not wait for the device; None when the host does not know: eager and sdpa then
    get the full mask (right either way), flash attention asks the device.

    The format is that of the mask function transformers registers for the backend (`AttentionMaskInterface`):
    eager gets an additive float mask and sdpa a bool mask, each (batch, 1, q, kv), or None for sdpa when its own
    causal path (top-left aligned) is the same; flash attention gets the 2-D padding mask, or None without
    padding. The mask is built here rather than by calling the registered function, whose arguments have changed
    between transformers releases.
    """
    kind = _mask_kind(config._attn_implementation)
    device = valid_keys.device
    kv_length = valid_keys.shape[1]
    if query_start is None:
        query_start = kv_length - query_length
    static_start = isinstance(query_start, int)
    if kind == "flash":
        if static_start and query_start + query_length == kv_length:
            if padded is None:
                padded = not bool(valid_keys.all())
            return valid_keys if padded else None
        return valid_keys & (torch.arange(kv_length, device=device) < query_start + query_length)
    if padded is None:
        padded = True
    if kind == "sdpa" and not padded and static_start:
        if (query_start == 0 and query_length > 1) or query_length == kv_length:
            return None  # sdpa's is_causal: query i sees keys 0..i, and a static cache's unused slots lie beyond
        if query_length == 1 and query_start == kv_length - 1:
            return None  # one query that sees every key
    query_at = torch.arange(query_length, device=device) + query_start
    causal = torch.arange(kv_length, device=device)[None, :] <= query_at[:, None]  # (q, kv)
    allowed = (causal[None] & valid_keys[:, None, :])[:, None]  # (batch, 1, q, kv)
    if kind == "eager":
        return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    # A padding query sees no key; let it see every key so no torch version's sdpa kernel returns NaN for it.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def valid_keys_of(attention_mask: Any, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(batch, length) bool, False for the prompt's padding tokens, from the mask the decoder stack was given.

    That is the caller's 2-D mask, None (no padding), or the 4-D mask `generate` builds for a static cache: a key
    is real when the prompt's last query may attend to it (with left or right padding, that query sees every real
    key; the first rows may have been unmasked entirely to keep sdpa from returning NaN).
    """
    attention_mask = full_attention_mask(attention_mask)
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise VlmpruneError(
            f"vlmprune needs a (batch, seq) attention mask or transformers' (batch, 1, query, key) one, got "
            f"{type(attention_mask).__name__}"
        )
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:].bool()
    last_query = attention_mask[:, 0, -1, :length]
    return last_query if last_query.dtype == torch.bool else last_query == 0


def full_attention_mask(attention_mask: Any) -> Any:
    """The mask of the full-attention layers when `generate` hands the decoder stack one mask per layer type
    ({"full_attention": ..., "sliding_attention": ...}, e.g. Qwen2-VL with a static cache); else `attention_mask`."""
    if isinstance(attention_mask, Mapping):
        return attention_mask.get("full_attention")
    return attention_mask


def _mask_kind(implementation: str) -> str:
    """'eager', 'sdpa' or 'flash': which of transformers' mask formats `implementation` takes."""
    kinds = {masking_utils.eager_mask: "eager", masking_utils.sdpa_mask: "sdpa"}
    kinds[masking_utils.flash_attention_mask] = "flash"
    registry = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    kind = kinds.get(registry[implementation]) if implementation in registry else None
    if kind is None:
        raise VlmpruneError(
            f"attention implementation {implementation!r} is not supported: vlmprune builds the masks of the eager, "
            "sdpa and flash-attention backends (and of kernels registered with their mask functions)"
        )
    return kind
