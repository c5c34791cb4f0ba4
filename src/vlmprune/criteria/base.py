"""The criterion interface: what a pruning stage asks to choose image tokens.

Selection is batched: the image tokens still present are laid out as (batch, m) slots, left-aligned per sample
in ascending token order (`SelectionContext.image_ids`, -1 in the padding slots past a sample's count), and a
criterion answers with a (batch, m) bool keep mask over those slots. Nothing on this path waits for the device:
budgets and counts are host integers, and scores stay in device tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from vlmprune.errors import VlmpruneError
from vlmprune.tensors import on_device

__all__ = [
    "AttentionFn",
    "Criterion",
    "MergeSpace",
    "ScoredCriterion",
    "SelectionContext",
    "keep_top",
    "kept_positions",
]

QueryPolicy = Literal["last", "text_mean", "all"]
SoftmaxDomain = Literal["sequence", "image", "none"]
ScoreDtype = Literal["model", "float32"]
# "auto": the vision features where the model can project them again (`ModelAdapter.projects_vision_features`),
# else the hidden states
MergeSpace = Literal["hidden", "vision_features", "auto"]
AttentionFn = Callable[[QueryPolicy, SoftmaxDomain, bool, bool, ScoreDtype], torch.Tensor]
RowsAttentionFn = Callable[[torch.Tensor, SoftmaxDomain, bool, ScoreDtype], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SelectionContext:
    """Everything a criterion may read to choose among the image tokens still present.

    Attributes:
        image_ids: (batch, m) LongTensor: slot j of sample b holds the index, into the sample's original image
            tokens, of its j-th present image token (ascending; raster order, several images numbered one after
            another); -1 in padding slots (j >= counts[b]).
        counts: per sample, present image tokens (host integers).
        image_grids: per sample, (rows, cols) of each image, in prompt order.
        n_original: per sample, image tokens before any pruning.
        stage_index: 0-based index of the stage being run (seeds per-stage randomness).
        hidden_states_fn: returns the stage layer's input hidden states of the image slots, (batch, m, hidden);
            read through `hidden_states()`.
        instruction_fn: returns the stage layer's input rows (batch, n, hidden) and which of them are the
            instruction (batch, n) bool; read through `instruction()`.
        keys_fn: returns the scoring layer's keys of the image slots and of every row; read through `keys()`.
        final_norm_fn: the language model's final norm (the one before its head); read through `final_norm()`.
        vision_keys_fn: per sample, (N_b, head_dim) the vision-encoder keys (mean over heads) at the layer whose
            attention `vision_attention` reads; read through `vision_keys()`.
        rows_attention_fn: the scoring layer's attention from chosen query rows to the image slots; read through
            `rows_attention()`.
        input_embeddings_fn: the language model's input embeddings of every original image token and of the
            current rows; read through `input_embeddings()`.
    """

    image_ids: torch.Tensor
    counts: list[int]
    image_grids: list[list[tuple[int, int]]]
    n_original: list[int]
    stage_index: int = 0
    attention_fn: AttentionFn | None = None
    vision_features_fn: Callable[[], list[torch.Tensor]] | None = None
    hidden_states_fn: Callable[[], torch.Tensor] | None = None
    vision_attention_fn: Callable[[], list[torch.Tensor]] | None = None
    instruction_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    keys_fn: Callable[[bool], tuple[torch.Tensor, torch.Tensor]] | None = None
    final_norm_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    vision_keys_fn: Callable[[], list[torch.Tensor]] | None = None
    rows_attention_fn: RowsAttentionFn | None = None
    input_embeddings_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_lists(cls, image_ids: list[torch.Tensor], **kwargs) -> SelectionContext:
        """A context from per-sample (n_b,) ascending id tensors (for tests and hand-built inputs)."""
        counts = [int(ids.numel()) for ids in image_ids]
        padded = torch.nn.utils.rnn.pad_sequence(list(image_ids), batch_first=True, padding_value=-1)
        return cls(image_ids=padded.long(), counts=counts, **kwargs)

    @property
    def batch_size(self) -> int:
        return len(self.counts)

    @property
    def present(self) -> torch.Tensor:
        """(batch, m) bool: which slots hold a present image token."""
        return self.image_ids >= 0

    def budgets_tensor(self, budgets: list[int]) -> torch.Tensor:
        """(batch, 1) LongTensor of `budgets`, on the slots' device (a queued host-to-device copy, no wait)."""
        return on_device(budgets, self.image_ids.device).unsqueeze(1)

    def attention(
        self,
        query: QueryPolicy,
        softmax: SoftmaxDomain,
        rope: bool,
        full_map: bool = False,
        score_dtype: ScoreDtype = "float32",
    ) -> torch.Tensor:
        """(batch, m) attention each present image token receives at the stage's scoring layer.

        The query's attention probabilities (or raw logits with `softmax="none"`), averaged over heads (and over
        query tokens for `query="text_mean"` and `"all"`); 0 in padding slots. In float32, or with
        `score_dtype="model"` in the model's dtype, rounded where the official codes round (see
        `AttentionProbe`). Computed once per policy and shared by every criterion of the stage. With `full_map`
        the whole attention map is computed first (the cost of eager `output_attentions`).
        """
        if self.attention_fn is None:
            raise RuntimeError("this stage has no scoring layer: the criterion needs LLM attention")
        key = ("attention", query, softmax, rope, full_map, score_dtype)
        if key not in self._cache:
            self._cache[key] = self.attention_fn(query, softmax, rope, full_map, score_dtype)
        return self._cache[key]

    def rows_attention(
        self, rows: torch.Tensor, softmax: SoftmaxDomain, rope: bool, score_dtype: ScoreDtype = "float32"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of the query rows `rows` ((batch, n) bool over the current rows, as in `instruction()`)
        to the image slots at the stage's scoring layer: ((batch, q, m) per query row, averaged over heads, 0 in
        padding; (batch, q) bool, which of the q query slots hold a row). Reads each sample's row count once."""
        if self.rows_attention_fn is None:
            raise RuntimeError("this stage has no scoring layer: the criterion needs LLM attention")
        return self.rows_attention_fn(rows, softmax, rope, score_dtype)

    def input_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The language model's input embeddings: (every original image token's, (batch, N, hidden) in image-token
        order, slots past `n_original[b]` holding another row's; the current rows', (batch, n, hidden), rows as in
        `instruction()`, a merged or kept image row holding its own token's embedding)."""
        if self.input_embeddings_fn is None:
            raise RuntimeError("this context holds no input embeddings (built outside a stage)")
        if "input_embeddings" not in self._cache:
            self._cache["input_embeddings"] = self.input_embeddings_fn()
        return self._cache["input_embeddings"]

    def vision_features(self) -> torch.Tensor:
        """(batch, m, channels) vision-encoder features of the present image tokens (before the projector).

        Padding slots hold the features of token 0; criteria mask them with `present`.
        """
        if self.vision_features_fn is None:
            raise RuntimeError("vision features were not captured for this model")
        if "vision" not in self._cache:
            features = torch.nn.utils.rnn.pad_sequence(list(self.vision_features_fn()), batch_first=True)
            features = features.to(self.image_ids.device)
            index = self.image_ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, features.shape[-1])
            self._cache["vision"] = torch.gather(features, 1, index)
        return self._cache["vision"]

    def vision_keys(self) -> torch.Tensor:
        """(batch, m, head_dim) float32 vision-encoder keys of the present image tokens, averaged over heads, at the
        layer `vision_attention` reads (VisionZip's `metric`); padding slots hold token 0's."""
        if self.vision_keys_fn is None:
            raise VlmpruneError(
                "the vision encoder's keys were not captured: this criterion needs the model to encode the images "
                "(pixel_values) in the same forward as the prompt"
            )
        if "vision_keys" not in self._cache:
            keys = torch.nn.utils.rnn.pad_sequence(list(self.vision_keys_fn()), batch_first=True)
            index = self.image_ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, keys.shape[-1])
            self._cache["vision_keys"] = torch.gather(keys.to(self.image_ids.device).float(), 1, index)
        return self._cache["vision_keys"]

    def hidden_states(self) -> torch.Tensor:
        """(batch, m, hidden) the hidden states of the present image tokens entering the stage's layer.

        The rows the cut is applied to, before it (BTP's diversity reads them). Padding slots hold some other
        row's states; criteria mask them with `present`.
        """
        if self.hidden_states_fn is None:
            raise RuntimeError("this context holds no hidden states (built outside a stage)")
        if "hidden" not in self._cache:
            self._cache["hidden"] = self.hidden_states_fn()
        return self._cache["hidden"]

    def instruction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The instruction's hidden states entering the stage's layer: (rows (batch, n, hidden), mask (batch, n)).

        `rows` are every row of the current sequence (text, image and padding); `mask` marks the instruction, the
        text rows after each sample's last image token (the prompt's question and what follows it; the last row
        when no text follows the image). At a stage before the language model these are the input embeddings.
        """
        if self.instruction_fn is None:
            raise RuntimeError("this context holds no instruction rows (built outside a stage)")
        if "instruction" not in self._cache:
            self._cache["instruction"] = self.instruction_fn()
        return self._cache["instruction"]

    def keys(self, rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The scoring layer's keys, heads concatenated: (image slots (batch, m, heads·head_dim), every row of the
        current sequence (batch, n, heads·head_dim)), rows as in `instruction()`; RoPE applied with `rope`.

        Keys are repeated to the number of query heads (GQA), so norms compare across models alike."""
        if self.keys_fn is None:
            raise RuntimeError("this stage has no scoring layer: the criterion needs LLM keys")
        key = ("keys", rope)
        if key not in self._cache:
            self._cache[key] = self.keys_fn(rope)
        return self._cache[key]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` (..., hidden) through the language model's final norm (identity if the model has none)."""
        return hidden if self.final_norm_fn is None else self.final_norm_fn(hidden)

    def vision_attention(self) -> torch.Tensor:
        """(batch, m) float32 vision-encoder attention each present image token receives (see
        `ModelAdapter.vision_attention`); 0 in padding slots."""
        if self.vision_attention_fn is None:
            raise VlmpruneError(
                "the vision encoder's attention was not captured: this criterion needs the model to encode the "
                "images (pixel_values) in the same forward as the prompt"
            )
        if "vision_attention" not in self._cache:
            scores = torch.nn.utils.rnn.pad_sequence(list(self.vision_attention_fn()), batch_first=True)
            scores = torch.gather(scores.to(self.image_ids.device), 1, self.image_ids.clamp(min=0))
            self._cache["vision_attention"] = scores.float().masked_fill(~self.present, 0.0)
        return self._cache["vision_attention"]


def keep_top(order: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """(batch, m) keep mask of the first `budgets[b]` slots of each row of `order` (slots, best first)."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.zeros_like(order, dtype=torch.bool).scatter(1, order, ranks < budgets)


def kept_positions(keep: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the ascending slots a (batch, m) keep mask keeps (reads the mask: for tests and reports)."""
    return [torch.nonzero(row).flatten() for row in keep.cpu()]


class Criterion(ABC):
    """Chooses which present image tokens a stage keeps.

    `requires` names the inputs the engine must capture: "attention" (queries and keys of the scoring
    layer), "vision_features" (the vision encoder's features before the projector), "vision_attention"
    (the attention image tokens receive in the vision encoder, `ModelAdapter.vision_attention`) and/or
    "vision_keys" (that layer's keys, `ModelAdapter.vision_keys`).

    A merging criterion sets `merges` and implements `merge_weights`: each kept token's new state is then a
    weighted sum of the stage's image tokens, in the stage's hidden states (`"hidden"`) or, before the language
    model, in the vision features before the projector, projected again (`"vision_features"`), or the first where
    the model's adapter can project merged features and the second elsewhere (`"auto"`).
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    merges: ClassVar[MergeSpace | None] = None

    @abstractmethod
    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        """(batch, m) bool keep mask over `ctx`'s slots; False in padding slots.

        `budgets[b]` is the stage's token budget for sample b; criteria that fix their own count (a uniform
        grid with a stride, an ensemble without top-up) may keep a different number.
        """

    def merge_weights(self, ctx: SelectionContext, budgets: list[int], keep: torch.Tensor) -> torch.Tensor:
        """(batch, m, m) float32: row i of a kept slot i holds the weight of each slot j in its new state (rows of
        slots not kept are ignored); `keep` is what `select` returned. Only merging criteria (`merges`) implement
        it."""
        raise NotImplementedError(f"{type(self).__name__} keeps a subset of the tokens and merges none")

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int] | None:
        """Per sample, how many tokens `select` keeps, if known on the host without reading its result.

        None when the count depends on the data (the engine then reads it once per stage). Criteria that keep
        exactly the budget need not override this.
        """
        return list(budgets)

    def expected_count(self, budget: int, n_present: int, n_original: int, grids: list[tuple[int, int]]) -> float:
        """Tokens this criterion is expected to keep, without running it (for cost projections).

        Criteria that keep exactly the budget need not override this.
        """
        return float(budget)

    def ranking(self, ctx: SelectionContext) -> torch.Tensor | None:
        """(batch, m) slots from most to least worth keeping (padding last), or None if there is no order."""
        return None


class ScoredCriterion(Criterion):
    """A criterion that scores every present token and keeps the top `budget` of them.

    Ties go to the earlier token (a stable sort), so a sample keeps the same tokens alone or in any batch.
    """

    @abstractmethod
    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """(batch, m) scores aligned with `ctx.image_ids`; higher means more worth keeping. Padding is ignored."""

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        return keep_top(self.ranking(ctx), ctx.budgets_tensor(budgets))

    def ranking(self, ctx: SelectionContext) -> torch.Tensor:
        scores = self.scores(ctx).float().masked_fill(~ctx.present, float("-inf"))
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
