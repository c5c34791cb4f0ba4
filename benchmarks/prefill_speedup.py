"""Measured prefill speed-up of pruning methods against the unpruned model, next to the ideal ratio.

A random-weight LLaVA-shaped model (LLaVA-1.5's 24 x 24 = 576 image tokens and 32 decoder layers, a narrower
hidden size so it runs on a CPU) prefills the same prompt with and without each method, interleaved, after a
warm-up. The ideal speed-up is the unpruned model's tokens x layers over the method's, read from the trace.

    python benchmarks/prefill_speedup.py [--repeats 7] [--batch 1] [--out benchmarks/results/prefill_speedup_cpu.json]

Prints ratios only (absolute CPU times vary with the machine); the JSON also keeps the raw medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import vlmprune
from vlmprune.testing import build_tiny_llava, build_tiny_processor, tiny_llava_config

METHODS = {
    "fastv (K=2, R=50%)": ("fastv", {"layer": 2, "ratio": 0.5}),
    "fastv (K=3, R=75%)": ("fastv", {"layer": 3, "ratio": 0.75}),
    "pdrop (8/16/24, λ=0.5)": ("pdrop", {}),
    "feather (8/16, R=0.7)": ("feather", {}),
}


def build(args: argparse.Namespace):
    config = tiny_llava_config(
        text_layers=args.layers,
        text_hidden=args.hidden,
        heads=args.hidden // 64,
        kv_heads=args.hidden // 64,
        intermediate=int(args.hidden * 2.6875),  # LLaVA-1.5-7B's 11008 / 4096
        image_size=336,
        patch_size=14,
    )
    model = build_tiny_llava(config, attn_implementation=args.attn)
    processor = build_tiny_processor(image_size=336, patch_size=14)
    from PIL import Image

    image = Image.new("RGB", (336, 336), (120, 80, 200))
    prompt = "USER: <image>\n" + "describe the picture in detail and say where each object is " * 2 + "ASSISTANT:"
    inputs = dict(processor(images=[image] * args.batch, text=[prompt] * args.batch, return_tensors="pt"))
    return model, inputs


def prefill(model, inputs) -> float:
    started = time.perf_counter()
    model(**inputs, logits_to_keep=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/prefill_speedup_cpu.json")
    args = parser.parse_args()

    model, inputs = build(args)
    methods = {label: vlmprune.build_method(name, **params) for label, (name, params) in METHODS.items()}
    times: dict[str, list[float]] = {"unpruned": [], **{label: [] for label in methods}}
    token_layers: dict[str, float] = {}
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            measured = round_ >= args.warmup
            seconds = prefill(model, inputs)
            if measured:
                times["unpruned"].append(seconds)
            for label, method in methods.items():
                with vlmprune.prune(model, method) as trace:
                    seconds = prefill(model, inputs)
                if measured:
                    times[label].append(seconds)
                token_layers[label] = trace.tokens_per_layer.float().sum(dim=1).mean().item()
    n_tokens = int(inputs["attention_mask"].sum(dim=1).float().mean())
    token_layers["unpruned"] = float(n_tokens * args.layers)

    base = statistics.median(times["unpruned"])
    rows = []
    for label, samples in times.items():
        median = statistics.median(samples)
        measured = base / median
        ideal = token_layers["unpruned"] / token_layers[label]
        rows.append(
            {
                "method": label,
                "prefill_median_s": median,
                "prefill_spread_s": [min(samples), max(samples)],
                "measured_speedup": measured,
                "ideal_speedup": ideal,
                "token_layer_ratio": token_layers[label] / token_layers["unpruned"],
                "measured_over_ideal": measured / ideal,
            }
        )
    print(f"prefill of {n_tokens} tokens x {args.layers} layers, batch {args.batch}, {args.attn}, {args.repeats} runs")
    print(f"{'method':26s} {'token-layer ratio':>17s} {'ideal speed-up':>14s} {'measured':>9s} {'meas/ideal':>10s}")
    for row in rows:
        print(
            f"{row['method']:26s} {row['token_layer_ratio']:17.3f} {row['ideal_speedup']:13.2f}x "
            f"{row['measured_speedup']:8.2f}x {row['measured_over_ideal']:10.2f}"
        )
    result = {
        "config": vars(args) | {"prompt_tokens": n_tokens, "image_tokens": 576},
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vlmprune": vlmprune.__version__,
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
