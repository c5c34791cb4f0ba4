"""Token schedules: how many image and text tokens each decoder layer runs on in prefill."""

from __future__ import annotations

from dataclasses import dataclass

from vlmprune.cost.shapes import ModelShape
from vlmprune.errors import BudgetError, LayerError, VlmpruneError
from vlmprune.methods.base import Method
from vlmprune.trace import Trace

__all__ = ["TokenSchedule"]


@dataclass(frozen=True)
class TokenSchedule:
    """Image tokens per decoder layer (fractional when projected or averaged over a batch), and text tokens.

    Text tokens are never pruned, so one count serves every layer.
    """

    image_tokens: tuple[float, ...]
    text_tokens: float = 0.0
    source: str = ""

    @property
    def layers(self) -> int:
        return len(self.image_tokens)

    def tokens(self, layer: int) -> float:
        return self.image_tokens[layer] + self.text_tokens

    @classmethod
    def unpruned(cls, shape: ModelShape, text_tokens: float = 0.0) -> TokenSchedule:
        return cls((float(shape.image_tokens),) * shape.layers, text_tokens, "unpruned")

    @classmethod
    def parse(cls, spec: str, layers: int, text_tokens: float = 0.0, image_tokens: int | None = None) -> TokenSchedule:
        """From `"576@0,288@8,144@16"`: image tokens from each given layer on (the first must be layer 0).

        Counts never rise from one step to the next, are not negative, and (given `image_tokens`, the prompt's
        image tokens) start at no more than there are; each layer appears once.
        """
        if text_tokens < 0:
            raise BudgetError(f"text tokens cannot be negative, got {text_tokens:g}")
        steps = []
        for part in spec.replace(" ", "").split(","):
            count, sep, layer = part.partition("@")
            try:
                steps.append((int(layer), float(count)))
            except ValueError:
                raise VlmpruneError(f"bad schedule step {part!r}: expected COUNT@LAYER, e.g. 576@0,288@8") from None
            if not sep:
                raise VlmpruneError(f"bad schedule step {part!r}: expected COUNT@LAYER, e.g. 576@0,288@8")
        steps.sort()
        layers_given = [layer for layer, _ in steps]
        if len(set(layers_given)) != len(layers_given):
            raise VlmpruneError(f"a schedule names each layer once, got {spec!r}")
        if any(count < 0 for _, count in steps):
            raise BudgetError(f"image-token counts cannot be negative, got {spec!r}")
        if image_tokens is not None and steps[0][1] > image_tokens:
            raise BudgetError(
                f"the schedule starts with {steps[0][1]:g} image tokens, but the prompt has {image_tokens}"
            )
        for (layer, count), (_, before) in zip(steps[1:], steps, strict=False):
            if count > before:
                raise BudgetError(f"pruning only removes tokens: {count:g}@{layer} follows {before:g} in {spec!r}")
        if steps[0][0] != 0:
            raise VlmpruneError(f"a schedule starts at layer 0 (the unpruned count), got {spec!r}")
        if steps[-1][0] >= layers:
            raise LayerError(f"schedule step at layer {steps[-1][0]}, but the model has {layers} layers")
        counts, current = [], steps[0][1]
        for layer in range(layers):
            current = next((c for lay, c in steps if lay == layer), current)
            counts.append(current)
        return cls(tuple(counts), text_tokens, spec)

    @classmethod
    def from_method(cls, method: Method, shape: ModelShape, text_tokens: float = 0.0) -> TokenSchedule:
        """The counts `method` is expected to keep on `shape`, projected without running a model.

        Budgets are exact; counts that depend on the data (a union of picks) use each criterion's
        `expected_count`.
        """
        grids = [shape.grid] * shape.images
        method.check_model(shape.layers, [grids])
        n_original = shape.image_tokens
        current = float(n_original)
        at_layer = {}
        for stage in method.stages():
            if stage.layer >= shape.layers:
                raise LayerError(
                    f"{type(method).__name__} prunes before layer {stage.layer}, but {shape.name} has "
                    f"{shape.layers} layers"
                )
            present = round(current)
            budget = stage.budget.resolve(n_original, present)
            current = stage.criterion.expected_count(budget, present, n_original, grids)
            at_layer[stage.layer] = current
        counts, current = [], float(n_original)
        for layer in range(shape.layers):
            current = at_layer.get(layer, current)
            counts.append(current)
        return cls(tuple(counts), text_tokens, f"{method.name}")

    @classmethod
    def from_trace(cls, trace: Trace) -> TokenSchedule:
        """The counts a traced prefill actually ran, averaged over its samples."""
        if trace.tokens_per_layer is None:
            raise VlmpruneError("the trace holds no prefill yet: run the model inside vlmprune.prune first")
        return cls.from_trace_dict(trace.to_dict())

    @classmethod
    def from_trace_dict(cls, data: dict) -> TokenSchedule:
        """As `from_trace`, from `Trace.to_dict()` (or the JSON `vlmprune generate --save-trace` writes)."""
        try:
            image, total = data["image_tokens_per_layer"], data["tokens_per_layer"]
        except (KeyError, TypeError):
            raise VlmpruneError("a trace needs 'image_tokens_per_layer' and 'tokens_per_layer'") from None
        layers = len(image[0])
        mean_image = tuple(sum(sample[i] for sample in image) / len(image) for i in range(layers))
        text = sum(t[0] - i[0] for t, i in zip(total, image, strict=True)) / len(image)
        return cls(mean_image, text, "trace")
