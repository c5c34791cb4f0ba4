"""The model-adapter interface: where a family keeps its image tokens, grids, layers and positions.

The engine asks the adapter; nothing else knows a model's layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

__all__ = ["ModelAdapter", "vit_attention", "vit_keys"]


class ModelAdapter(ABC):
    """Answers the engine's questions about one model family, from the model's own config and ids.

    Subclasses name the transformers classes they accept in `model_classes`.
    """

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    #: whether the multimodal forward derives its own position ids from the prompt (M-RoPE's 3-D positions), so
    #: callers (the references) pass none; otherwise they pass `generate`'s, from the attention mask
    computes_positions: ClassVar[bool] = False
    #: the multimodal forward's arguments that carry images: a call with one is a new prompt, never a decode step
    image_arguments: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: whether `split_vision_features` needs the vision features to split the vision-encoder attention
    attention_needs_features: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    # Module lookup -----------------------------------------------------------------------------------------

    @property
    def multimodal_module(self) -> nn.Module:
        """The module whose forward receives `input_ids` and the images (hooked to find image tokens).

        transformers 5 puts it at `model.model` in every VLM family vlmprune supports."""
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        """The decoder stack: has `.layers`, `.rotary_emb` and `.config` (`model.model.language_model`)."""
        return self.model.model.language_model

    @property
    def vision_feature_module(self) -> nn.Module | None:
        """A module whose first positional input is the vision features before the projector, or None."""
        return None

    @property
    def vision_attention_layer(self) -> nn.Module | None:
        """The vision-encoder layer whose attention ranks the image tokens (VisPruner), or None if unknown.

        A forward pre-hook on it hands the layer's input to `vision_attention`; nothing else of the tower changes.
        """
        return None

    def vision_attention(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """(images, image tokens of one image) float32: the attention each image token receives at `layer`.

        Computed from the layer's input `hidden` (images, tokens, width) with the layer's own norm and q/k
        projections, for the rows needed only; columns in image-token order (a [CLS] column dropped).
        `layer_kwargs` are the keyword arguments the layer was called with (a packed tower's sequence bounds and
        rotary embeddings). Any shape whose flattening `split_vision_features` splits per sample will do.
        """
        raise NotImplementedError(f"{self.family} models expose no vision-encoder attention")

    def vision_keys(self, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """(images, image tokens of one image, head_dim) float32 keys of `layer` (the `vision_attention_layer`)
        averaged over heads, from its input `hidden` and keyword arguments `layer_kwargs` (as for `vision_attention`);
        image tokens only (VisionZip's `metric`)."""
        raise NotImplementedError(f"{self.family} models expose no vision-encoder keys")

    # Whether `project_vision_features` maps one token's merged vision features to its input embedding.
    projects_vision_features: ClassVar[bool] = True

    def project_vision_features(self, features: torch.Tensor) -> torch.Tensor:
        """(..., hidden) the language model's input embeddings of vision features (..., channels) taken before
        the projector (a merging criterion's merged features); by default the `vision_feature_module` itself."""
        if self.vision_feature_module is None:
            raise NotImplementedError(f"{self.family} models expose no projector of vision features")
        return self.vision_feature_module.forward(features)  # not a call: no capture hook may see these

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self):
        return self.text_model.config

    # Image tokens ------------------------------------------------------------------------------------------

    def has_images(self, forward_kwargs: dict) -> bool:
        """Whether a multimodal forward with these keyword arguments was given images."""
        return any(forward_kwargs.get(name) is not None for name in self.image_arguments)

    @abstractmethod
    def image_token_mask(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """(batch, seq) bool: which tokens are prunable image tokens.

        `inputs` are the multimodal forward's keyword arguments (`input_ids` always among them, and what the family
        passes with its images: `image_sizes`, `image_grid_thw`, ...). Tokens of an image that are never pruned
        (LLaVA-NeXT's row-end newlines) are not image tokens here: the engine keeps them as it keeps text.
        """

    @abstractmethod
    def image_grids(self, image_counts: list[int], inputs: Mapping[str, Any]) -> list[list[tuple[int, int]]]:
        """Per sample, (rows, cols) of each image's (or crop's, or frame's) grid of image tokens, in prompt order.

        `image_counts[b]` is sample b's number of image tokens; `inputs` as for `image_token_mask`, with the position
        ids the decoder stack got as `decoder_position_ids`. The grids of a sample cover its image tokens in order:
        their rows x cols sum to its count.
        """

    def split_vision_features(
        self,
        features: torch.Tensor,
        n_image_tokens: list[int],
        inputs: Mapping[str, Any],
        vision_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per sample, (N_b, channels) vision features in image-token order, from what the vision module got.

        `features` (crops, tokens per crop, channels) are the vision feature module's inputs of the forward, its
        calls stacked on the first axis in call order; `inputs` as for `image_token_mask`. The vision-encoder
        attention (crops, tokens per crop) is split the same way, as one channel, with the vision features given
        as `vision_features` to adapters that map with them (`attention_needs_features`).
        """
        flat = features.reshape(-1, features.shape[-1])
        return list(torch.split(flat, n_image_tokens))

    @property
    def final_norm(self) -> nn.Module | None:
        """The decoder stack's norm after its last layer (`norm` in transformers' decoders), or None (DART reads
        hidden states through it)."""
        return getattr(self.text_model, "norm", None)

    # Queries, keys and positions ---------------------------------------------------------------------------

    def normed_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's attention input for these hidden-state rows (its pre-attention norm)."""
        return layer.input_layernorm(hidden)

    def project(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        which: str,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Queries or keys of `layer` for normed rows `x` (batch, rows, hidden).

        Returns (batch, heads, rows, head_dim); keys are repeated to the number of query heads (GQA). RoPE is
        applied when `position_embeddings` (cos, sin), each (batch, rows, head_dim), is given.
        """
        attn = layer.self_attn
        proj = attn.q_proj if which == "q" else attn.k_proj
        out = proj(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)
        norm = getattr(attn, "q_norm" if which == "q" else "k_norm", None)
        if norm is not None:
            out = norm(out)
        if position_embeddings is not None:
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            out = out * cos + _rotate_half(out) * sin
        if which == "k":
            out = out.repeat_interleave(attn.num_key_value_groups, dim=1)
        return out

    def scaling(self, layer: nn.Module) -> float:
        return float(layer.self_attn.scaling)

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `position_ids`, as the decoder stack computes them."""
        return self.text_model.rotary_emb(hidden, position_ids=position_ids)

    def default_position_ids(
        self, batch: int, length: int, past: int | torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """The position ids the decoder stack uses when the caller passes none (`past` may be a device scalar)."""
        return (torch.arange(length, device=device) + past).unsqueeze(0).expand(batch, -1)

    def decode_position_ids(
        self,
        position_ids: torch.Tensor | None,
        inputs: Mapping[str, Any],
        batch: int,
        length: int,
        past: int | torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """The original positions of a decode step's `length` new tokens, `past` tokens after the prompt's start.

        `position_ids` are those the decoder stack got (None: it derives them from the cache's length, which
        pruning shortens), `inputs` the multimodal forward's keyword arguments for this step.
        """
        if position_ids is not None:
            return position_ids
        return self.default_position_ids(batch, length, past, device)

    def rope_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The rows of `position_ids` that the rotary embedding reads ((..., batch, seq); a text-only row dropped)."""
        return position_ids

    def layer_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """What a decoder layer gets as `position_ids` for rows at these positions (flash attention reads them)."""
        return position_ids

    # Additions to the hidden states ------------------------------------------------------------------------

    @property
    def addition_layers(self) -> int:
        """How many first decoder layers have per-token additions to their output (Qwen3-VL's DeepStack)."""
        return 0

    def take_layer_additions(self, kwargs: dict) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """Removes from the decoder stack's keyword arguments what it would add to its first layers' outputs.

        Returns the (batch, seq) bool mask of the prefill columns that get additions and, per layer from the first,
        the (columns with an addition, in row-major order, hidden) rows added after that layer; None when the
        stack was given none. The engine then adds them itself to the rows it keeps (see `PruningSession`).
        """
        return None

    def addition_kwargs(self, mask: torch.Tensor, additions: list[torch.Tensor]) -> dict[str, Any]:
        """The decoder stack's keyword arguments that make it add `additions` itself (`take_layer_additions`'s
        inverse; the references run the unmodified stack with them)."""
        raise NotImplementedError(f"{self.family} decoder stacks take no per-token additions")


def vit_attention(
    layer: nn.Module, hidden: torch.Tensor, query: Literal["first", "mean"], chunk: int = 256
) -> torch.Tensor:
    """(images, tokens) float32 attention each token receives at a ViT layer (CLIP, SigLIP), mean over heads.

    `layer` is a pre-norm encoder layer with `layer_norm1` and `self_attn` (`q_proj`, `k_proj`, `head_dim`,
    `scale`); `hidden` (images, tokens, width) is its input. `query="first"` is the first token's ([CLS]) attention
    row; `"mean"` averages every query's row (the attention a token receives), `chunk` query rows at a time so
    the whole (heads, tokens, tokens) map never exists at once. The softmax runs in float32 over every key (these
    towers attend without a mask), as eager attention's `attentions[layer]` would give it.
    """
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.layer_norm1(hidden)
        images, tokens = x.shape[:2]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (images, rows, width) -> (images, heads, rows, head_dim)
            return t.view(images, t.shape[1], -1, attn.head_dim).transpose(1, 2).float()

        keys = heads(attn.k_proj(x))
        rows = x[:, :1] if query == "first" else x
        received = keys.new_zeros(images, keys.shape[1], tokens)
        for start in range(0, rows.shape[1], chunk):
            q = heads(attn.q_proj(rows[:, start : start + chunk]))
            received += torch.softmax(q @ keys.transpose(-1, -2) * attn.scale, dim=-1).sum(dim=2)
        return (received / rows.shape[1]).mean(dim=1)


def vit_keys(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(images, tokens, head_dim) float32 keys of a pre-norm ViT layer (CLIP, SigLIP) for its input `hidden`
    (images, tokens, width), averaged over heads: VisionZip's `raw_key_states.mean(1)`, before any scaling."""
    attn = layer.self_attn
    with torch.no_grad():
        keys = attn.k_proj(layer.layer_norm1(hidden))
        return keys.view(*keys.shape[:2], -1, attn.head_dim).float().mean(dim=2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
