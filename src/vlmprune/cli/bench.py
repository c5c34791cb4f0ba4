"""`vlmprune bench`: measured prefill, decode and memory of methods against the unpruned model."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from vlmprune.cli._common import CommandError, non_negative_int, parse_method_params, positive_int
from vlmprune.cli.arguments import device, method_key_value, method_list, one_of, output_dir, positive_int_list
from vlmprune.cost import SHAPES

__all__ = ["add_parser", "check", "markdown_table", "run"]

DEFAULT_METHODS = "fastv,pdrop,feather"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure speed-ups of methods against the unpruned model",
        description=(
            "Build a random-weight LLaVA (1.5, NeXT or OneVision) or Qwen-VL of a named shape (no download), then "
            "time the unpruned model and each method on the same prompt, interleaved after a warm-up: prefill "
            "latency (time to first token), decode throughput, end-to-end latency, peak GPU memory and KV-cache "
            "size; the measured prefill speed-up is printed next to the ideal one (exact FLOPs of what the run kept) "
            "and the share of prefill spent choosing tokens. The original FastV (eager attention, whole attention "
            "map at the scoring layer) is timed beside vlmprune's FastV on the same selection, and FastV keeping "
            "every token at the first method's first layer shows the engine's own overhead. Stages are timed with "
            "CUDA events, so nothing waits for the GPU inside a timed prefill."
        ),
    )
    parser.add_argument(
        "--shape", type=one_of(SHAPES, "shape"), default="llava-cpu-mid", help=f"model shape ({', '.join(SHAPES)})"
    )
    parser.add_argument(
        "--methods", type=method_list, default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})"
    )
    parser.add_argument(
        "--param",
        type=method_key_value,
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="e.g. fastv.ratio=0.75",
    )
    parser.add_argument(
        "--batch", type=positive_int_list, default="1,8", help="comma-separated batch sizes (default 1,8)"
    )
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--new-tokens", type=positive_int, default=16, help="answer length for end-to-end timing")
    parser.add_argument("--text-words", type=positive_int, default=24, help="words in the prompt's question")
    parser.add_argument("--device", type=device, default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    parser.add_argument("--no-original-fastv", action="store_true", help="skip the original-FastV reference")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the forward with the pruning hooks inside (CUDA graphs on CUDA: mode reduce-overhead) and "
        "decode on a static cache through it; every variant compiles its own graphs first (minutes)",
    )
    parser.add_argument(
        "--out", type=output_dir, default=None, metavar="DIR", help="write bench.json and bench.md there"
    )
    parser.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """Every method with its `--param`s, and a shape bench can build (LLaVA or Qwen-VL layout), before any model
    is built."""
    from vlmprune.cost import get_shape

    _variants(args)
    _setup(get_shape(args.shape))


def _setup(shape, question: str = "") -> tuple:
    """(model class, config, processor, image, prompt) of a random-weight model of `shape`'s family whose one image
    gives `shape`'s image tokens, asking `question`: a LLaVA (1.5, NeXT or OneVision) or a Qwen-VL layout."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from vlmprune.testing import build_tiny_processor, llava_config_for_shape
    from vlmprune.testing.llava_next import anyres_setup_for_shape
    from vlmprune.testing.qwen_vl import (
        SHAPE_FAMILIES,
        build_tiny_qwen_processor,
        image_side,
        qwen_vl_config_for_shape,
        qwen_vl_model_class,
    )

    colour = (120, 80, 200)
    llava_prompt = f"USER: <image>\n{question} ASSISTANT:"
    try:
        if shape.family in SHAPE_FAMILIES:
            family = SHAPE_FAMILIES[shape.family]
            config = qwen_vl_config_for_shape(shape)
            height, width = image_side(family, shape.grid)
            processor = build_tiny_qwen_processor(family, min_side=min(height, width), max_side=max(height, width))
            content = [{"type": "image"}, {"type": "text", "text": question}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            image = Image.new("RGB", (width, height), colour)
            return qwen_vl_model_class(family), config, processor, image, text
        if shape.family in ("llava_next", "llava_onevision"):
            model_class, config, processor, side = anyres_setup_for_shape(shape)
            return model_class, config, processor, Image.new("RGB", (side, side), colour), llava_prompt
        side = shape.grid[0] * 14
        config = llava_config_for_shape(shape)
        processor = build_tiny_processor(image_size=side, patch_size=14)
        return LlavaForConditionalGeneration, config, processor, Image.new("RGB", (side, side), colour), llava_prompt
    except ValueError as error:
        raise CommandError(f"--shape {shape.name}: bench builds LLaVA- and Qwen-VL-layout models: {error}") from None


def _variants(args: argparse.Namespace) -> list:
    from vlmprune.bench import Variant
    from vlmprune.methods import build_method

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    per_method = parse_method_params(args.param, names)
    variants = [Variant("unpruned", None)]
    for name in names:
        method = build_method(name, **per_method.get(name, {}))
        if len(variants) == 1:  # the engine's own cost: hooks, scoring and gathering, with every token kept
            layer = method.stages()[0].layer
            # at layer 0 no layer comes before the cut: FastV scores with layer 0's own q/k there
            keep_all = build_method("fastv", layer=layer, ratio=0.0, scoring="after" if layer == 0 else "before")
            variants.append(Variant(f"keep-all at layer {layer} (engine overhead)", keep_all))
        variants.append(Variant(name, method))
        if name == "fastv" and not args.no_original_fastv:
            original = build_method(name, **(per_method.get(name, {}) | {"full_map": True}))
            variants.append(Variant("fastv-original (eager, full map)", original, attn="eager"))
    return variants


def _build(args: argparse.Namespace, batch: int):
    import torch

    from vlmprune.cost import get_shape
    from vlmprune.testing import WORDS

    shape = get_shape(args.shape)
    question = " ".join(WORDS[i % len(WORDS)] for i in range(args.text_words))
    model_class, config, processor, image, text = _setup(shape, question)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise CommandError(f"device {args.device!r} is not usable here: {error}") from None
    needed = shape.parameters() * torch.empty(0, dtype=getattr(torch, DTYPES[args.dtype])).element_size()
    available = _memory_bytes(device)
    if available is not None and needed > 0.8 * available:
        raise CommandError(
            f"{shape.name} in {args.dtype} needs about {needed / 2**30:.1f} GiB of weights, but {args.device} has "
            f"{available / 2**30:.1f} GiB; use a smaller shape (e.g. llava-cpu-mid) or another device"
        )
    dtype = getattr(torch, DTYPES[args.dtype])
    with torch.device(device):
        torch.manual_seed(0)
        model = model_class._from_config(config, attn_implementation=args.attn, dtype=dtype)
    model.eval()
    inputs = processor(images=[image] * batch, text=[text] * batch, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs, shape


def _compile_options(args: argparse.Namespace) -> dict | None:
    if not args.compile:
        return None
    return {"mode": "reduce-overhead"} if args.device.startswith("cuda") else {}


def _memory_bytes(device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| method | batch | prefill speed-up | ideal (FLOPs) | measured / ideal | token-layer ratio | scoring share "
        "| decode tok/s | end-to-end | KV cache MiB | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] else "-"
        lines.append(
            f"| {r['label']} | {r['batch']} | {r['measured_speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
            f"| {r['measured_speedup'] / r['ideal_speedup']:.0%} | {r['token_layer_ratio']:.3f} "
            f"| {r['scoring_share']:.1%} | {r['decode_tokens_per_s']:.1f} "
            f"| {r['end_to_end_s'] / r['prefill_s']:.1f}x prefill | {r['kv_cache_bytes'] / 2**20:.1f} | {peak} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import vlmprune
    from vlmprune.bench import run_benchmark

    variants = _variants(args)
    rows = []
    for batch in args.batch:
        model, inputs, shape = _build(args, batch)
        results = run_benchmark(
            model,
            inputs,
            variants,
            shape,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
            log=lambda line, b=batch: print(f"[batch {b}] {line}", flush=True),
            compile_options=_compile_options(args),
        )
        rows.extend(r.to_dict() for r in results)
        del model
    table = markdown_table(rows)
    print(table)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    environment = {
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vlmprune": vlmprune.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "run"}
        (out / "bench.json").write_text(
            json.dumps({"config": config, "environment": environment, "results": rows}, indent=2) + "\n"
        )
        setting = ", ".join([args.shape, args.dtype, args.attn] + (["compiled"] if args.compile else []))
        header = f"# vlmprune bench: {setting}, {args.device} ({device_name})\n\n"
        (out / "bench.md").write_text(header + table + "\n")
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
