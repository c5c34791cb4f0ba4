"""The method interface: a named, documented schedule of pruning stages."""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from vlmprune.budget import Keep, Rounding
from vlmprune.criteria.base import Criterion
from vlmprune.stage import Stage

__all__ = ["PARAMETER_HELP", "Method", "OneStageMethod", "PreLLMMethod"]

# One line per method parameter, shared by every method that has it (`vlmprune methods` prints them).
PARAMETER_HELP: dict[str, str] = {
    "layer": "the first decoder layer that runs on the kept tokens (0 = before the language model)",
    "layers": "the layers before which each stage prunes, increasing",
    "ratio": "fraction of the image tokens dropped (the papers' R)",
    "positions": "'original' keeps each kept token's position id; 'renumbered' closes the gaps",
    "query": "'last': the prompt's last token scores the image; 'text_mean': the text after the image, averaged; "
    "'all': every other token, averaged (FastV's paper)",
    "softmax": "attention normalised over the sequence ('sequence') or the image keys ('image'), or raw ('none')",
    "rope": "rotary embeddings on the scoring q and k; false is FEATHER's phi-R, without RoPE's bottom-row bias",
    "scoring": "'before': the previous layer's q and k score the stage (FastV); 'after': the stage's own layer",
    "seed": "random seed of random scores (and of FastV at layer 0)",
    "full_map": "score from the whole attention map, at the cost of the original eager FastV (benchmarks)",
    "lam": "PyramidDrop's lambda: each stage keeps lam of the tokens the previous stage kept",
    "keep": "image tokens kept, a count overriding ratio/lam (pdrop, feather: per stage or the last's; "
    "btp: per stage or the first's; sparsevlm: the budget naming its schedule, 192/128/96/64)",
    "keep_fractions": "each stage's fraction of the original image tokens kept (PyramidDrop: overrides lam; BTP)",
    "score_dtype": "'model': attention rounded to the model's dtype as the official code does; 'float32': exact",
    "stride": "uniform grid: keep every stride-th row and column of each image (None: spread the budget evenly)",
    "top_up": "fill each sample's union to the members' total count, so every sample keeps as many tokens",
    "k": "neighbours per density estimate (DPC-KNN)",
    "variant": "BTP: 'code' (the released LLaVA code) or 'paper' (its stages and lambda); fills the fields left None",
    "calibration": "BTP: a `vlmprune calibrate` file whose proposed layers replace the default ones",
    "attention": "BTP: per stage, the share of its budget chosen by rebalanced attention (the paper's lambda)",
    "diversity": "BTP: per stage, the share chosen first by max-min diversity of the hidden states",
    "spatial": "BTP: per stage, the share started by farthest points on the image grid",
    "oversample": "BTP: per stage, attention candidates per attention pick (1 = no positional rebalancing)",
    "scale": "BTP: multiplies every stage's kept fraction (the budget knob of FLOPs matching); SparseVLM: multiplies "
    "the rank in the adaptive rule",
    "spatial_metric": "BTP: grid distance of the spatial start, 'manhattan' (code) or 'euclidean'",
    "important_ratio": "VisPruner's r: the budget's share chosen by vision-encoder attention, the rest for diversity",
    "per_sample": "each sample of a batch draws its own random scores (otherwise a sample draws the same alone)",
    "pivot_image": "DART: image pivots, the image tokens with the largest key L1 norm (kept, on top of the budget)",
    "pivot_text": "DART: text pivots, the instruction tokens with the largest key L1 norm",
    "key_rope": "DART: rotary embeddings on the keys whose L1 norm picks the pivots",
    "final_norm": "DART: compare hidden states after the language model's final norm, as its code does",
    "negate_relevance": "CDPruner: relevance is minus the mean image-instruction cosine, as its code computes it",
    "contextual_share": "VisionZip: the budget's share of contextual (merged) tokens; the rest are dominant tokens",
    "size": "pooling: the side of the square window averaged into one token (2: a quarter of the tokens)",
    "space": "merging in the stage's hidden states ('hidden'), the vision features before the projector "
    "('vision_features'), or the second where the model can project them again, else the first ('auto')",
    "counts": "SparseVLM: each stage's tokens kept by relevance (overrides keep's schedule)",
    "recycle": "SparseVLM: cluster part of the pruned tokens into merged tokens added back",
    "recycle_share": "SparseVLM: the share of the pruned tokens recycled (the most relevant; int(p * share) + 1)",
    "tokens_per_cluster": "SparseVLM: recycled tokens per cluster token (r // tokens_per_cluster + 1 clusters)",
    "adaptive": "SparseVLM: each count from the rank of the raters' attention matrix (its first release)",
    "bias": "SparseVLM: added to rank * scale by the adaptive rule",
    "theta": "CDPruner: relevance exp(theta/(2(1-theta)) r) (its code's commented option); None: r itself",
}


class Method(ABC):
    """A pruning method: a small dataclass whose fields are its parameters.

    Subclasses set `name` (the registry key) and `paper`, validate their fields in `__post_init__`, and
    build their schedule in `stages()`. A method knows nothing of the model it runs on.
    """

    name: ClassVar[str]
    paper: ClassVar[str]

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The pruning stages, in increasing layer order."""

    def check_model(self, depth: int, image_grids: list[list[tuple[int, int]]]) -> None:
        """Raises a `VlmpruneError` if the method was made for another model (e.g. a calibration file's).

        `depth` is the language model's number of decoder layers, `image_grids` per sample the (rows, cols) of
        each image. Called before each prefill and each cost projection; any model fits by default.
        """
        return None

    def parameters(self) -> dict[str, Any]:
        """Every parameter (dataclass field) with its value, as JSON values (tuples become lists); {} if none."""
        if not dataclasses.is_dataclass(self):
            return {}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps(values, default=str))


@dataclass
class OneStageMethod(Method):
    """A method that prunes once, before `layer`, keeping `1 - ratio` of the original image tokens.

    The budget is `keep` image tokens when given (a count, which overrides `ratio`), else
    `rounding(N · (1 − ratio))` of a sample's N image tokens, `rounding` being the method's official code's
    (see `vlmprune.budget.round_budget`). Subclasses redeclare fields to change defaults, add their own, and say
    which criterion scores.
    """

    layer: int = 2
    ratio: float = 0.5  # fraction of the image tokens dropped (FastV's R)
    positions: Literal["original", "renumbered"] = "original"
    keep: int | None = None  # image tokens kept, a count instead of `ratio` (e.g. 64 of 576)

    #: which layer's q/k score, for criteria that need LLM attention (see `Stage.scoring`)
    scoring: ClassVar[Literal["before", "after"]] = "before"
    #: how `N · (1 − ratio)` becomes a count: `int()` of the float product unless the official code says otherwise
    rounding: ClassVar[Rounding] = "int"

    def __post_init__(self) -> None:
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of image tokens dropped) must be in [0, 1), got {self.ratio}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (0 = before the LLM), got {self.layer}")
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")
        if self.keep is not None and self.keep < 0:
            raise ValueError(f"keep (image tokens kept) must be >= 0, got {self.keep}")

    @abstractmethod
    def criterion(self) -> Criterion:
        """What chooses the kept tokens."""

    def budget(self) -> Keep:
        """`keep` tokens, or `1 − ratio` of the original image tokens rounded as the official code rounds."""
        return _keep_or_ratio(self.keep, self.ratio, self.rounding)

    def stages(self) -> list[Stage]:
        return [
            Stage(
                layer=self.layer,
                criterion=self.criterion(),
                budget=self.budget(),
                scoring=self.scoring,
                positions=self.positions,
            )
        ]


@dataclass
class PreLLMMethod(Method):
    """A method that prunes once, before the language model (a stage at layer 0), to `keep` tokens or `1 - ratio`.

    Exactly one of `keep` (image tokens kept per prompt, a count) and `ratio` (the fraction dropped, rounded as
    the official code rounds: `rounding`) is given. Pruning before the language model spends no decoder layer
    or cache entry on a dropped token; the kept tokens stay in order and, as the official codes that mask the
    projected features do, their positions are renumbered consecutively (`positions="original"` keeps each
    one's position id). Subclasses redeclare fields to change defaults and say which criterion chooses.
    """

    keep: int | None = 128
    ratio: float | None = None
    positions: Literal["original", "renumbered"] = "renumbered"

    rounding: ClassVar[Rounding] = "int"

    def __post_init__(self) -> None:
        if self.keep is None and self.ratio is None:
            raise ValueError("give keep (image tokens kept) or ratio (fraction dropped), got neither")
        if self.keep is not None and self.ratio is not None:
            raise ValueError(
                f"give keep (image tokens kept) or ratio (fraction dropped), not both: got keep={self.keep}, "
                f"ratio={self.ratio} (set keep=None to use ratio)"
            )
        if self.keep is not None and self.keep < 0:
            raise ValueError(f"keep (image tokens kept) must be >= 0, got {self.keep}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio (fraction of image tokens dropped) must be in [0, 1), got {self.ratio}")
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")

    @abstractmethod
    def criterion(self) -> Criterion:
        """What chooses the kept tokens."""

    def budget(self) -> Keep:
        return _keep_or_ratio(self.keep, self.ratio, self.rounding)

    def stages(self) -> list[Stage]:
        return [Stage(layer=0, criterion=self.criterion(), budget=self.budget(), positions=self.positions)]


def _keep_or_ratio(keep: int | None, ratio: float | None, rounding: Rounding) -> Keep:
    """`keep` image tokens, or `1 − ratio` of the original ones rounded by `rounding`."""
    if keep is not None:
        return Keep.count(keep)
    return Keep.fraction_of_original(1.0 - ratio, rounding=rounding)
