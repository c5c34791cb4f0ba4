"""Measured speed: prefill latency, decode throughput, end-to-end latency, memory and KV cache, per method.

Baseline and methods run on the same inputs, interleaved round by round after a warm-up, so drift in the
machine's speed hits all of them alike. Each method's measured prefill speed-up is reported next to the
ideal one, the cost model's exact FLOPs ratio of what the trace says the run kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vlmprune.cost import ModelShape, TokenSchedule, estimate
from vlmprune.engine import prune
from vlmprune.engine.compat import find_cache
from vlmprune.methods.base import Method

__all__ = ["BenchResult", "Variant", "run_benchmark"]


@dataclass
class Variant:
    """One configuration to time: a label, a method (None = unpruned) and the attention backend it runs on."""

    label: str
    method: Method | None
    attn: str | None = None  # None: the model's own


@dataclass
class BenchResult:
    """Medians (and min/max) over the measured rounds of one variant at one batch size."""

    label: str
    batch: int
    prefill_s: float
    prefill_spread_s: tuple[float, float]
    end_to_end_s: float
    decode_tokens_per_s: float
    scoring_s: float
    scoring_share: float  # of prefill time
    kv_cache_bytes: int
    peak_memory_bytes: int | None
    measured_speedup: float = 1.0
    ideal_speedup: float = 1.0  # exact FLOPs of the unpruned prefill over the traced run's
    token_layer_ratio: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _synchronize(device)
    started = time.perf_counter()
    out = fn()
    _synchronize(device)
    return time.perf_counter() - started, out


@contextmanager
def _compiled(model: nn.Module, options: dict[str, Any]) -> Iterator[None]:
    """Compiles `model.forward` for the block (each variant's hooks get their own graphs, hence the larger limit)."""
    model.forward = torch.compile(model.forward, dynamic=False, **options)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            yield
    finally:
        del model.forward  # the class's forward again
        torch._dynamo.reset()


def _is_compiled(model: nn.Module) -> bool:
    return "forward" in vars(model)


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def run_benchmark(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    variants: list[Variant],
    shape: ModelShape,
    *,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    log: Callable[[str], None] = lambda _: None,
    compile_options: dict[str, Any] | None = None,
) -> list[BenchResult]:
    """Times every variant on `inputs`; the first variant is the baseline the speed-ups are relative to.

    With `compile_options` (arguments of `torch.compile`, e.g. `{"mode": "reduce-overhead"}` for CUDA graphs) the
    model's forward is compiled with the pruning hooks inside it, and `generate` decodes on a static cache through
    that compiled forward: vlmprune's documented compiled path, for prefill and decode alike.
    """
    if compile_options is not None:
        with _compiled(model, compile_options):
            return run_benchmark(
                model, inputs, variants, shape, new_tokens=new_tokens, repeats=repeats, warmup=warmup, log=log
            )
    device = next(model.parameters()).device
    batch = int(inputs["input_ids"].shape[0])
    default_attn = model.config._attn_implementation
    samples: dict[str, dict[str, list[float]]] = {v.label: {"prefill": [], "e2e": [], "scoring": []} for v in variants}
    facts: dict[str, dict[str, Any]] = {v.label: {} for v in variants}
    generate_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if _is_compiled(model):  # decode through the compiled forward (not transformers' own compile) on a static cache
        generate_kwargs |= {"cache_implementation": "static", "disable_compile": True}

    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for variant in variants:
                model.set_attn_implementation(variant.attn or default_attn)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                scope = prune(model, variant.method) if variant.method else nullcontext()
                with scope as trace:
                    prefill_s, out = _timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device)
                    scoring_s = sum(stage.seconds for stage in trace.stages) if trace is not None else 0.0
                    schedule = TokenSchedule.from_trace(trace) if trace is not None else None
                    e2e_s, _ = _timed(lambda: model.generate(**inputs, **generate_kwargs), device)
                if round_ < warmup:
                    continue
                record = samples[variant.label]
                record["prefill"].append(prefill_s)
                record["e2e"].append(e2e_s)
                record["scoring"].append(scoring_s)
                facts[variant.label].update(
                    kv_cache_bytes=_cache_bytes(find_cache(out)),
                    peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                    schedule=schedule,
                )
                del out
            log(f"round {round_ + 1}/{warmup + repeats} done" + (" (warm-up)" if round_ < warmup else ""))
    model.set_attn_implementation(default_attn)

    text_tokens = float(inputs["attention_mask"].sum(dim=1).float().mean()) - shape.image_tokens
    baseline_schedule = TokenSchedule.unpruned(shape, text_tokens)
    results = []
    for variant in variants:
        record, fact = samples[variant.label], facts[variant.label]
        prefill = statistics.median(record["prefill"])
        e2e = statistics.median(record["e2e"])
        decode = [
            batch * (new_tokens - 1) / max(e - p, 1e-9) for e, p in zip(record["e2e"], record["prefill"], strict=True)
        ]
        schedule = fact["schedule"] or baseline_schedule
        report = estimate(shape, schedule, "exact")
        results.append(
            BenchResult(
                label=variant.label,
                batch=batch,
                prefill_s=prefill,
                prefill_spread_s=(min(record["prefill"]), max(record["prefill"])),
                end_to_end_s=e2e,
                decode_tokens_per_s=statistics.median(decode),
                scoring_s=statistics.median(record["scoring"]),
                scoring_share=statistics.median(record["scoring"]) / prefill,
                kv_cache_bytes=fact["kv_cache_bytes"],
                peak_memory_bytes=fact["peak_memory_bytes"],
                ideal_speedup=1.0 / report.ratio,
                token_layer_ratio=sum(schedule.tokens(i) for i in range(shape.layers))
                / sum(baseline_schedule.tokens(i) for i in range(shape.layers)),
                extra={"mean_image_tokens": report.mean_image_tokens},
            )
        )
    base = results[0].prefill_s
    for result in results:
        result.measured_speedup = base / result.prefill_s
    return results
