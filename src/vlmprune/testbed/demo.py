"""The demo: FEATHER's experiment on the testbed model, in minutes on a CPU.

Runs the unpruned model and the methods on the held-out split at matched FLOPs, and reports per method the
localization accuracy, the other-question accuracy, the FLOPs reduction of what the traces kept, the
measured prefill speed-up, the mean row of the first stage's kept tokens and the share of the referred object's
tokens it kept (FEATHER's "target box kept" diagnostic: why a method loses localization); draws where each
method's kept tokens lie on the image grid, averaged over the split.
Whatever the table shows is what this model does: nothing is tuned toward a result.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from vlmprune.cost import TokenSchedule, estimate, match_flops, shape_from_config
from vlmprune.engine import prune
from vlmprune.methods import (
    DART,
    BalancedTokenPruning,
    CDPruner,
    DivPrune,
    FasterVLM,
    FastV,
    Feather,
    KnnPrune,
    Method,
    Pooling,
    PyramidDrop,
    RandomPrune,
    SparseVLM,
    UniformPrune,
    VisionZip,
    VisPruner,
)
from vlmprune.testbed.evaluate import evaluate
from vlmprune.testbed.scenes import eval_questions
from vlmprune.viz.analysis import box_token_share, mean_vertical_position

__all__ = ["DemoRow", "demo_methods", "run_demo"]


@dataclass
class DemoRow:
    method: str
    params: dict[str, Any]
    localization_acc: float
    other_acc: float
    flops_reduction: float
    prefill_speedup: float  # median over timing rounds of the unpruned prefill time over this method's
    prefill_speedup_spread: tuple[float, float]  # (lowest, highest) of those per-round ratios
    first_stage_layer: int | None
    mean_vertical_position: float | None
    target_kept: float | None  # mean share of the referred object's box cells that the first stage kept

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def demo_methods(depth: int) -> dict[str, Method]:
    """The methods at the paper's schedules scaled to a `depth`-layer model, before FLOPs matching.

    FastV prunes early (about a tenth of the depth, the paper's K=3 of 32), and so do the single-stage
    criteria FEATHER ablates (uniform, KNN) and the random baseline; PyramidDrop at a quarter, half and three
    quarters; FEATHER at a quarter and a half (its 8 and 16 of 32); BTP at its code's 3, 6, 14 and 22 of 32;
    SparseVLM at its 3, 7 and 16 of 32;
    VisPruner, FasterVLM, DivPrune, CDPruner, VisionZip and pooling before the language model, as in their papers;
    DART at its layer 2. Every method of `list_methods()` is here.
    """
    early, quarter = max(1, round(depth / 10)), max(1, depth // 4)
    return {
        "fastv": FastV(layer=early),
        "fastv-no-rope": FastV(layer=early, rope=False, softmax="image"),
        "uniform": UniformPrune(layer=early, stride=None),
        "knn": KnnPrune(layer=early),
        "random": RandomPrune(layer=early),
        "pdrop": PyramidDrop(layers=(quarter, 2 * quarter, 3 * quarter)),
        "feather": Feather(layers=(quarter, 2 * quarter)),
        "btp": BalancedTokenPruning(layers=_scaled_layers((3, 6, 14, 22), depth)),
        "vispruner": VisPruner(),
        "fastervlm": FasterVLM(),
        "divprune": DivPrune(),
        "dart": DART(layer=min(2, depth - 1)),
        "cdpruner": CDPruner(),
        "visionzip": VisionZip(),
        "pooling": Pooling(),
        "sparsevlm": SparseVLM(layers=_scaled_layers((3, 7, 16), depth)),
    }


def _scaled_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """A 32-layer model's stage layers scaled to `depth` layers, kept increasing and within 1 .. depth - 1 (fewer
    stages on a very shallow model)."""
    scaled: list[int] = []
    for layer in layers:
        scaled.append(min(max(round(depth * layer / 32), scaled[-1] + 1 if scaled else 1), depth - 1))
    return tuple(sorted(set(scaled)))


def _prefill_seconds(model, processor, method: Method | None, images, questions, rounds: int) -> list[float]:
    inputs = processor(
        images=images, text=[f"USER: <image>\n{q} ASSISTANT:" for q in questions], return_tensors="pt", padding=True
    )
    times = []
    with torch.inference_mode(), prune(model, method) if method else nullcontext():
        for _ in range(rounds):
            started = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return times


def run_demo(
    model, processor, *, limit: int = 200, batch_size: int = 32, timing_rounds: int = 5, log=print
) -> tuple[list[DemoRow], dict[str, list[dict]]]:
    """Rows of the table, and per method the per-sample kept tokens (records `vlmprune.viz` reads)."""
    shape = shape_from_config(model.config, name="testbed")
    depth = shape.layers
    methods = demo_methods(depth)
    # comparable FLOPs: every method's budget matched to FEATHER's default reduction on this model
    text_tokens = 12.0
    target = estimate(shape, TokenSchedule.from_method(methods["feather"], shape, text_tokens), "paper").reduction
    methods = {name: match_flops(m, shape, target, text_tokens=text_tokens) for name, m in methods.items()}
    variants: dict[str, Method | None] = {"unpruned": None, **methods}

    scenes = [eval_questions("test", i) for i in range(limit)]
    images = [s.image() for s, _, _ in scenes[:16]]
    questions = [w.text for _, w, _ in scenes[:16]]
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for method in variants.values():
        _prefill_seconds(model, processor, method, images, questions, 1)  # warm-up
    for _ in range(timing_rounds):  # interleaved, so drift in the machine's speed hits every variant alike
        for name, method in variants.items():
            timings[name] += _prefill_seconds(model, processor, method, images, questions, 1)
    # Paired by round: each round times every variant back to back, so a round's ratio cancels its drift.
    ratios = {name: [b / t for b, t in zip(timings["unpruned"], times, strict=True)] for name, times in timings.items()}

    rows, records = [], {}
    for name, method in variants.items():
        log(f"{name}: answering {limit} held-out scenes x 2 questions ...")
        traces: list[dict] = []

        def run_pruned(run_batch, method=method, traces=traces):
            if method is None:
                return run_batch()
            with prune(model, method) as trace:
                answers = run_batch()
                record = trace.to_dict()
                for b in range(len(answers)):
                    traces.append(
                        {
                            "stages": [
                                {"layer": s["layer"], "grid": s["grid"], "kept": s["kept"][b]} for s in record["stages"]
                            ],
                            "image_tokens_per_layer": record["image_tokens_per_layer"][b],
                            "tokens_per_layer": record["tokens_per_layer"][b],
                        }
                    )
            return answers

        result = evaluate(model, processor, split="test", limit=limit, batch_size=batch_size, run_pruned=run_pruned)
        reduction, vertical, first, target = 0.0, None, None, None
        if traces:
            schedule = TokenSchedule.from_trace_dict(
                {
                    "image_tokens_per_layer": [t["image_tokens_per_layer"] for t in traces],
                    "tokens_per_layer": [t["tokens_per_layer"] for t in traces],
                }
            )
            reduction = estimate(shape, schedule, "paper").reduction
            first = traces[0]["stages"][0]["layer"]
            vertical = statistics.mean(
                mean_vertical_position(t["stages"][0]["kept"], t["stages"][0]["grid"]) for t in traces
            )
            records[name] = traces
            # `evaluate` asks scene i's localization question as item 2i, so trace 2i is its first stage
            target = statistics.mean(
                box_token_share(t["stages"][0]["kept"], t["stages"][0]["grid"], where.box, (scene.size,) * 2, "crop")
                for t, (scene, where, _) in zip(traces[::2], scenes, strict=True)
            )
        row = DemoRow(
            method=name,
            params={} if method is None else method.parameters(),
            localization_acc=result.localization_acc,
            other_acc=result.other_acc,
            flops_reduction=reduction,
            prefill_speedup=statistics.median(ratios[name]),
            prefill_speedup_spread=(min(ratios[name]), max(ratios[name])),
            first_stage_layer=first,
            mean_vertical_position=vertical,
            target_kept=target,
        )
        rows.append(row)
        log(
            f"{name:14s} localization {row.localization_acc:.3f}  other {row.other_acc:.3f}  "
            f"FLOPs -{row.flops_reduction:.0%}  prefill x{row.prefill_speedup:.2f} "
            f"({row.prefill_speedup_spread[0]:.2f}-{row.prefill_speedup_spread[1]:.2f} over {timing_rounds} rounds)"
        )
    return rows, records
