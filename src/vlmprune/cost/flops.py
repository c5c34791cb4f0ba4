"""FLOPs and KV-cache size of a token schedule: the papers' formulas and an exact count.

All counts are multiply-accumulates, the convention of the papers' "FLOPs" (FastV's Eq. 5 counts 4nd²
for the four attention projections of n tokens), so the two can be compared line by line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from vlmprune.cost.schedule import TokenSchedule
from vlmprune.cost.shapes import ModelShape
from vlmprune.errors import VlmpruneError

__all__ = ["FORMULAS", "CostReport", "decode_step_flops", "estimate", "kv_cache_bytes", "prefill_flops"]

Formula = Literal["paper", "paper-3ndm", "exact"]
FORMULAS: tuple[str, ...] = ("paper", "paper-3ndm", "exact")


def _layer_prefill(shape: ModelShape, n: float, formula: Formula) -> float:
    """One decoder layer over n tokens in prefill.

    "paper" is FastV's 4nd² + 2n²d + 2ndm; "paper-3ndm" counts LLaMA's three MLP projections (PyramidDrop,
    BTP); "exact" counts grouped-query projections, causal attention (n(n+1)/2 query-key pairs, for the
    scores and again for the weighted values) and the MLP's actual projections.
    """
    d, m = shape.hidden, shape.intermediate
    if formula == "paper":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if formula == "paper-3ndm":
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = n * d * (2 * q_width + 2 * kv_width)
    attention = q_width * n * (n + 1)
    return projections + attention + shape.mlp_projections * n * d * m


def _layer_decode(shape: ModelShape, keys: float, formula: Formula) -> float:
    """One decoder layer for one new token attending to `keys` cached keys (itself included)."""
    d, m = shape.hidden, shape.intermediate
    if formula == "paper":
        return 4 * d * d + 2 * keys * d + 2 * d * m
    if formula == "paper-3ndm":
        return 4 * d * d + 2 * keys * d + 3 * d * m
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return d * (2 * q_width + 2 * kv_width) + 2 * q_width * keys + shape.mlp_projections * d * m


def _encoder_flops(shape: ModelShape) -> float:
    """Vision tower (all images) and projector (all image tokens): pruning leaves them as they are, also before the
    LLM (VisPruner), where the projector still runs on every image token and the LLM gets the kept rows."""
    vision = shape.vision
    if vision is None:
        return 0.0
    t, h = vision.tokens, vision.hidden
    tower = vision.layers * (4 * t * h * h + 2 * t * t * h + 2 * t * h * vision.intermediate)
    projector = sum(i * o for i, o in vision.projector) * shape.image_tokens
    return shape.images * tower + projector


def prefill_flops(shape: ModelShape, schedule: TokenSchedule, formula: Formula = "paper") -> float:
    """Prefill multiply-accumulates of one prompt. The papers' formulas count the decoder layers only; "exact"
    adds the vision tower, the projector and the LM head for the last token."""
    _check(shape, schedule, formula)
    total = sum(_layer_prefill(shape, schedule.tokens(i), formula) for i in range(shape.layers))
    if formula == "exact":
        total += _encoder_flops(shape) + shape.hidden * shape.vocab
    return total


def decode_step_flops(
    shape: ModelShape, schedule: TokenSchedule, generated: int = 1, formula: Formula = "paper"
) -> float:
    """Multiply-accumulates of the `generated`-th decoded token (1 = the first after the prompt)."""
    _check(shape, schedule, formula)
    total = sum(_layer_decode(shape, schedule.tokens(i) + generated, formula) for i in range(shape.layers))
    if formula == "exact":
        total += shape.hidden * shape.vocab
    return total


def kv_cache_bytes(shape: ModelShape, schedule: TokenSchedule, generated: int = 0, dtype_bytes: int = 2) -> float:
    """Bytes of keys and values cached for one prompt after prefill and `generated` decoded tokens."""
    per_token = 2 * shape.kv_heads * shape.head_dim * dtype_bytes
    return sum((schedule.tokens(i) + generated) * per_token for i in range(shape.layers))


@dataclass(frozen=True)
class CostReport:
    """A schedule's cost next to the unpruned model's, for one prompt."""

    shape: str
    formula: str
    schedule: str
    text_tokens: float
    image_tokens_per_layer: list[float]
    mean_image_tokens: float
    baseline_prefill_flops: float
    prefill_flops: float
    ratio: float  # pruned over unpruned prefill FLOPs
    reduction: float  # 1 - ratio
    baseline_decode_step_flops: float
    decode_step_flops: float
    baseline_kv_cache_bytes: float
    kv_cache_bytes: float

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(shape: ModelShape, schedule: TokenSchedule, formula: Formula = "paper") -> CostReport:
    """Prefill and first-decode-step FLOPs and the KV cache of `schedule`, and of the unpruned model with the
    same text tokens."""
    baseline = TokenSchedule.unpruned(shape, schedule.text_tokens)
    base_prefill = prefill_flops(shape, baseline, formula)
    pruned_prefill = prefill_flops(shape, schedule, formula)
    return CostReport(
        shape=shape.name,
        formula=formula,
        schedule=schedule.source,
        text_tokens=schedule.text_tokens,
        image_tokens_per_layer=list(schedule.image_tokens),
        mean_image_tokens=sum(schedule.image_tokens) / schedule.layers,
        baseline_prefill_flops=base_prefill,
        prefill_flops=pruned_prefill,
        ratio=pruned_prefill / base_prefill,
        reduction=1.0 - pruned_prefill / base_prefill,
        baseline_decode_step_flops=decode_step_flops(shape, baseline, formula=formula),
        decode_step_flops=decode_step_flops(shape, schedule, formula=formula),
        baseline_kv_cache_bytes=kv_cache_bytes(shape, baseline),
        kv_cache_bytes=kv_cache_bytes(shape, schedule),
    )


def _check(shape: ModelShape, schedule: TokenSchedule, formula: str) -> None:
    if formula not in FORMULAS:
        raise VlmpruneError(f"unknown formula {formula!r}; valid: {', '.join(FORMULAS)}")
    if schedule.layers != shape.layers:
        raise VlmpruneError(f"the schedule covers {schedule.layers} layers but {shape.name} has {shape.layers}")
