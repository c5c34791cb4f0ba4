"""What a pruned call did: the kept tokens of each stage and the tokens each layer processed.

Cost accounting, pictures and evaluation read the trace; none of them re-run selection logic.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

__all__ = ["StageRecord", "StageTimer", "Trace"]


class StageTimer:
    """Times a stretch of a forward pass without making the host wait for the device.

    On a CUDA device two timing events are queued in the stream and read only when `seconds` is asked for
    (after the forward); elsewhere the host clock is read at `start` and `stop`.
    """

    def __init__(self, device: torch.device) -> None:
        self._events = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._started = time.perf_counter()
        self._seconds = 0.0

    def stop(self) -> StageTimer:
        if self._events is not None:
            self._events[1].record()
        else:
            self._seconds = time.perf_counter() - self._started
        return self

    @property
    def seconds(self) -> float:
        if self._events is not None:
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000.0
        return self._seconds


@dataclass
class StageRecord:
    """One pruning stage of one prefill.

    Attributes:
        layer: 0-based index of the first decoder layer that runs on the reduced set (0 = before the LLM).
        grid: (rows, cols) of the first image's token grid; `image_grids` has every image's.
        kept_ids: (batch, max kept) LongTensor on the model's device: row b holds sample b's kept indices into
            its image tokens, ascending, then -1. The engine never waits to copy it; `kept` reads it.
        n_kept: per sample, image tokens kept (counts may differ between samples).
        image_grids: per sample, the (rows, cols) of each of its images, in prompt order.
        n_before: per sample, image tokens present just before this stage.
        scoring_layer: the decoder layer whose queries and keys scored the tokens (None if no LLM score).
        timer: when the stage started and ended, on the device's own clock (`seconds` reads it).
        merge_space: for a merging stage, where the kept tokens were merged ("hidden": the stage's hidden
            states; "vision_features": the vision features before the projector, projected again); else None.
        merge_weights: for a merging stage, (batch, max kept, m) float32 on the model's device: row k of sample b
            holds the weight of each of the stage's m image slots in its k-th kept token's new state (0 past
            `n_kept[b]`); `sources` reads it.
        merge_ids: (batch, m) the image-token index of each of those slots (-1 for padding).
    """

    layer: int
    grid: tuple[int, int]
    kept_ids: torch.Tensor
    n_kept: list[int]
    image_grids: list[list[tuple[int, int]]]
    n_before: list[int]
    scoring_layer: int | None = None
    timer: StageTimer | None = field(default=None, repr=False, compare=False)
    merge_space: str | None = None
    merge_weights: torch.Tensor | None = field(default=None, repr=False)
    merge_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seconds(self) -> float:
        """Time spent scoring, choosing and gathering the kept rows (0.0 if not timed)."""
        return self.timer.seconds if self.timer is not None else 0.0

    @functools.cached_property
    def kept(self) -> list[torch.Tensor]:
        """Per sample, a sorted 1-D CPU LongTensor of indices into that sample's image tokens (raster order of
        the original grid; with several images, the images' tokens are numbered one after another)."""
        host = self.kept_ids.cpu()
        return [host[b, :n] for b, n in enumerate(self.n_kept)]

    @functools.cached_property
    def sources(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """For a merging stage, per sample and per kept token (in `kept` order): the image-token indices that fed
        it and their weights, as two 1-D CPU tensors; None for a stage that keeps a subset."""
        if self.merge_weights is None:
            return None
        weights, ids = self.merge_weights.float().cpu(), self.merge_ids.cpu()
        out = []
        for b, n in enumerate(self.n_kept):
            per_token = []
            for k in range(n):
                fed = torch.nonzero(weights[b, k]).flatten()
                per_token.append((ids[b, fed], weights[b, k, fed]))
            out.append(per_token)
        return out


@dataclass
class Trace:
    """The record of the last prefill run inside a `vlmprune.prune` context.

    Attributes:
        stages: one `StageRecord` per pruning stage, in order.
        image_tokens: per sample, image tokens before pruning.
        tokens_per_layer: (batch, num_layers) LongTensor, the real (non-padding) tokens each decoder layer
            processed in prefill.
        image_tokens_per_layer: (batch, num_layers) LongTensor, the image tokens among them.
        output_index: (batch, seq_out) LongTensor on the model's device, mapping each row of the language
            model's output sequence to its column in the input sequence (-1 for padding). Pruned calls return
            fewer rows than the input had; the last row is always each sample's last token.
        calls: number of prefills traced since the context was entered.
        method: the method's name and every one of its parameters, so that a saved trace says what made it.
    """

    stages: list[StageRecord] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    tokens_per_layer: torch.Tensor | None = None
    image_tokens_per_layer: torch.Tensor | None = None
    output_index: torch.Tensor | None = None
    calls: int = 0
    method: dict = field(default_factory=dict)  # {"name": ..., "params": {every parameter}} of the pruning method

    def reset(self) -> None:
        self.stages = []
        self.image_tokens = []
        self.tokens_per_layer = None
        self.image_tokens_per_layer = None
        self.output_index = None

    def to_dict(self) -> dict:
        """A JSON-ready copy: per stage the layer, grids and kept indices; per sample the tokens per layer."""

        def listed(tensor: torch.Tensor | None) -> list | None:
            return None if tensor is None else tensor.tolist()

        return {
            "method": self.method,
            "stages": [
                {
                    "layer": s.layer,
                    "grid": list(s.grid),
                    "image_grids": [[list(g) for g in grids] for grids in s.image_grids],
                    "kept": [k.tolist() for k in s.kept],
                    "n_before": s.n_before,
                    "scoring_layer": s.scoring_layer,
                    "seconds": s.seconds,
                    **(
                        {
                            "merge_space": s.merge_space,
                            "sources": [
                                [{"ids": i.tolist(), "weights": w.tolist()} for i, w in sample] for sample in s.sources
                            ],
                        }
                        if s.sources is not None
                        else {}
                    ),
                }
                for s in self.stages
            ],
            "image_tokens": self.image_tokens,
            "tokens_per_layer": listed(self.tokens_per_layer),
            "image_tokens_per_layer": listed(self.image_tokens_per_layer),
        }

    def summary(self) -> str:
        """One line per stage: layer and kept tokens per sample."""
        if not self.stages:
            return "no pruning stage ran"
        lines = []
        for i, stage in enumerate(self.stages):
            counts = ", ".join(f"{k}/{n}" for k, n in zip(stage.n_kept, stage.n_before, strict=True))
            where = " (before the language model; the projector ran on every image token)" if stage.layer == 0 else ""
            kind = f"merged into {counts} image tokens" if stage.sources is not None else f"kept {counts} image tokens"
            lines.append(f"stage {i}: before layer {stage.layer}{where}, {kind}")
        return "\n".join(lines)
