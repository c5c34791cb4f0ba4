"""Balanced Token Pruning (Li et al., NeurIPS 2025, arXiv 2505.22038)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlmprune.budget import Keep
from vlmprune.criteria.balanced import Balanced
from vlmprune.methods.base import Method
from vlmprune.stage import Stage

__all__ = ["BalancedTokenPruning"]

# The official LLaVA-1.5 code (`llava/modeling_llama.py`, `LlamaModel.forward`): prune before 1-based layers
# 4, 7, 15 and 23; keep 576 // 2 = 288, then 288 // 2 = 144, then 144 // 3 = 48 (of 576: 1/2, 1/4, 1/12), then
# none. Stage 1: int(0.3k) by diversity, int(0.3k) by attention from int(3.7 a) candidates, a 144-token
# (= k/2) spatial start, filled by diversity; stage 2: int(0.1k) by diversity, int(0.9k) by attention from
# int(1.5 a) candidates, filled by diversity; stage 3: attention alone from int(1.2 k) candidates.
_CODE = {
    "layers": (3, 6, 14, 22),
    "keep_fractions": (1 / 2, 1 / 4, 1 / 12, 0.0),
    "attention": (0.3, 0.9, 1.0, 1.0),
    "diversity": (0.3, 0.1, 0.0, 0.0),
    "spatial": (0.5, 0.0, 0.0, 0.0),
    "oversample": (3.7, 1.5, 1.2, 1.2),
}
# The paper (§4, §5, Table 7): each stage keeps half of the previous one, the last drops everything; the
# attention share λ rises 0.6, 0.8, 1.0; the rest of each budget is max-min diversity started from the
# attention picks and, in the first stage, the spatial start. What the paper leaves open (layers, the spatial
# start's size, the over-selection) follows the code.
_PAPER = _CODE | {
    "keep_fractions": (1 / 2, 1 / 4, 1 / 8, 0.0),
    "attention": (0.6, 0.8, 1.0, 1.0),
    "diversity": (0.0, 0.0, 0.0, 0.0),
}
VARIANTS: dict[str, dict[str, tuple[float, ...]]] = {"code": _CODE, "paper": _PAPER}
_PER_STAGE = ("keep_fractions", "attention", "diversity", "spatial", "oversample")


@dataclass
class BalancedTokenPruning(Method):
    """BTP: staged pruning, diversity early and attention late, at layers a calibration set places.

    Official code (EmbodiedCity/NeurIPS2025-Balanced-Token-Pruning, `llava/modeling_llama.py`,
    `LlamaModel.forward`, `attn_prune`, `div_prune`, `get_div_initial_indices`), LLaVA-1.5-7B: before 0-based
    layers 3, 6, 14 and 22 keep 288, 144, 48 and 0 of 576 image tokens (`keep_fractions`, fractions of the original,
    floored). Each stage (`criteria.Balanced`) picks a share (`attention`, the paper's λ) by the last prompt
    token's raw attention logits at the layer before the cut (RoPE on, mean over heads), positionally rebalanced
    (`oversample`: candidates per pick; candidates among the first k present tokens first), a share
    (`diversity`) by max-min cosine diversity on the hidden states entering the layer, a spatial start
    (`spatial`, farthest points on the grid, Manhattan distance, from token 0) in the first stage, and fills
    the budget by max-min diversity started from those picks. Original positions are kept.

    `variant="paper"` takes the paper's values where they differ from the code: halving stages (1/2, 1/4, 1/8)
    and λ = 0.6, 0.8, 1.0, the rest by diversity. Fields left None take the variant's values (with another
    number of layers: its first stages' values, then its final drop). `calibration`
    reads the layers from a `vlmprune calibrate` file instead, and refuses to run on another model. `scale`
    multiplies every stage's kept fraction (the budget knob that FLOPs matching turns).

    Differences from the code, all deliberate: a token picked twice is kept once (the code's stage-2
    `set(div_indices)` iterates tensors, which hash by identity, so it can keep a token twice) and the
    budget is then filled; a union larger than the budget is cut to it, attention picks first (the code prints
    "Bug!" and keeps them all); ties go to the earlier token; batches and any grid, not one 24x24 image at
    fixed offsets.
    """

    name: ClassVar[str] = "btp"
    paper: ClassVar[str] = "Balanced Token Pruning, Li et al., NeurIPS 2025 (arXiv 2505.22038)"

    variant: Literal["code", "paper"] = "code"
    layers: tuple[int, ...] | None = None
    calibration: str | None = None
    keep_fractions: tuple[float, ...] | None = None
    keep: int | tuple[int, ...] | None = None  # image-token counts: one per stage, or the first stage's
    attention: tuple[float, ...] | None = None
    diversity: tuple[float, ...] | None = None
    spatial: tuple[float, ...] | None = None
    oversample: tuple[float, ...] | None = None
    scale: float = 1.0
    softmax: Literal["sequence", "image", "none"] = "none"
    spatial_metric: Literal["manhattan", "euclidean"] = "manhattan"
    positions: Literal["original", "renumbered"] = "original"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {self.variant!r}")
        defaults = VARIANTS[self.variant]
        self._calibration = None
        if self.calibration is not None:
            from vlmprune.calibrate import load_calibration

            calibration = load_calibration(self.calibration)
            if calibration.layers is None:
                raise ValueError(f"calibration file {self.calibration} proposes no layers: {calibration.note}")
            if self.layers is not None and tuple(int(x) for x in self.layers) != calibration.layers:
                raise ValueError(
                    f"layers {tuple(self.layers)} differ from the calibrated {calibration.layers} of "
                    f"{self.calibration}: give one or the other"
                )
            self.layers = calibration.layers
            self._calibration = calibration
        self.layers = tuple(int(x) for x in (self.layers if self.layers is not None else defaults["layers"]))
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ValueError(f"layers must be strictly increasing and >= 0, got {self.layers}")
        for name in _PER_STAGE:
            value = getattr(self, name)
            if value is None:
                value = defaults[name]
                if len(self.layers) != len(value):  # other layers (a calibration, by hand): fit the schedule
                    value = _fit(name, value, len(self.layers))
            value = tuple(float(x) for x in value)
            if len(value) != len(self.layers):
                raise ValueError(f"{name} has {len(value)} values for {len(self.layers)} layers")
            setattr(self, name, value)
        for name in ("keep_fractions", "attention", "diversity", "spatial"):
            if any(not 0.0 <= x <= 1.0 for x in getattr(self, name)):
                raise ValueError(f"{name} values must be in [0, 1], got {getattr(self, name)}")
        if list(self.keep_fractions) != sorted(self.keep_fractions, reverse=True):
            raise ValueError(f"keep fractions must not increase from stage to stage, got {self.keep_fractions}")
        if self.keep is not None:
            self.keep = self._stage_counts(self.keep)
        if any(x < 1.0 for x in self.oversample):
            raise ValueError(f"oversample values (attention candidates per pick) must be >= 1, got {self.oversample}")
        if not self.scale > 0.0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.softmax not in ("sequence", "image", "none"):
            raise ValueError(f"softmax must be 'sequence', 'image' or 'none', got {self.softmax!r}")
        if self.spatial_metric not in ("manhattan", "euclidean"):
            raise ValueError(f"spatial_metric must be 'manhattan' or 'euclidean', got {self.spatial_metric!r}")
        if self.positions not in ("original", "renumbered"):
            raise ValueError(f"positions must be 'original' or 'renumbered', got {self.positions!r}")
        for layer, share in zip(self.layers, self.attention, strict=True):
            if layer == 0 and share > 0:
                raise ValueError("a stage at layer 0 has no layer before it to score attention: set its share to 0")

    def _stage_counts(self, keep: int | tuple[int, ...]) -> tuple[int, ...]:
        """Per-stage counts from `keep`: as given, or from the first stage's count in the fractions' proportions."""
        if isinstance(keep, int):
            first = self.keep_fractions[0]
            counts = tuple(int(keep * f / first) if first else 0 for f in self.keep_fractions)
        else:
            counts = tuple(int(x) for x in keep)
        if len(counts) != len(self.layers):
            raise ValueError(f"keep has {len(counts)} counts for {len(self.layers)} layers (or give one count)")
        if any(c < 0 for c in counts) or list(counts) != sorted(counts, reverse=True):
            raise ValueError(f"keep counts must be >= 0 and not increase from stage to stage, got {counts}")
        return counts

    def stages(self) -> list[Stage]:
        stages = []
        for s, layer in enumerate(self.layers):
            drops_all = self.keep[s] == 0 if self.keep is not None else self.keep_fractions[s] == 0.0
            if drops_all:  # the last stage drops every image token: nothing to score
                criterion = Balanced(attention=0.0)
            else:
                criterion = Balanced(
                    attention=self.attention[s],
                    diversity=self.diversity[s],
                    spatial=self.spatial[s],
                    oversample=self.oversample[s],
                    softmax=self.softmax,
                    spatial_metric=self.spatial_metric,
                )
            if self.keep is not None:
                budget = Keep.count(self.keep[s])
            else:
                budget = Keep.fraction_of_original(min(1.0, self.keep_fractions[s] * self.scale))
            stages.append(Stage(layer, criterion, budget, scoring="before", positions=self.positions))
        return stages

    def check_model(self, depth: int, image_grids: list[list[tuple[int, int]]]) -> None:
        if self._calibration is not None:
            self._calibration.check_model(depth, image_grids)


def _fit(name: str, values: tuple[float, ...], n: int) -> tuple[float, ...]:
    """A variant's per-stage values for `n` stages: the first n - 1 stages' values, then the last (the drop).

    With fewer stages the middle ones go; with more, the last keeping stage repeats (halving `keep_fractions` again).
    """
    if n == 1:
        return values[-1:]
    body, last = list(values[:-1]), values[-1]
    while len(body) < n - 1:
        body.append(body[-1] / 2 if name == "keep_fractions" else body[-1])
    return (*body[: n - 1], last)
