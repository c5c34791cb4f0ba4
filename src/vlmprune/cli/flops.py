"""`vlmprune flops`: prefill and decode FLOPs and KV cache of a method or schedule, against the unpruned model."""

from __future__ import annotations

import argparse
import json
import os

from vlmprune.cli._common import CommandError, parse_params
from vlmprune.cli.arguments import existing_file, key_value, method_name, non_negative_float, positive_int, shape_ref
from vlmprune.cost import FORMULAS, SHAPES, ModelShape, TokenSchedule, estimate, get_shape, shape_from_config
from vlmprune.methods import build_method

__all__ = ["add_parser", "check", "resolve_shape", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="FLOPs and KV cache of a method or token schedule",
        description=(
            "Prefill FLOPs, decode-step FLOPs and KV-cache size of a pruning method (or an explicit schedule, or "
            "a saved trace) on a model shape, next to the unpruned model's. Counts are multiply-accumulates, the "
            "papers' convention. Formulas: 'paper' (FastV: 4nd²+2n²d+2ndm per layer), 'paper-3ndm' (PyramidDrop, "
            "BTP: 3ndm for LLaMA's MLP), 'exact' (GQA, SwiGLU, causal attention, vision tower, projector, LM head)."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        type=shape_ref,
        metavar="SHAPE_OR_CONFIG",
        help=f"a named shape ({', '.join(SHAPES)}), a config.json or model directory, or a Hub id",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--method", type=method_name, metavar="NAME", help="a method (see `vlmprune methods`)")
    source.add_argument("--schedule", metavar="SPEC", help="image tokens from each layer on, e.g. 576@0,288@8")
    source.add_argument(
        "--trace", type=existing_file, metavar="FILE", help="a trace saved by `vlmprune generate --save-trace`"
    )
    parser.add_argument(
        "--param", type=key_value, action="append", default=[], metavar="KEY=VALUE", help="method parameter"
    )
    parser.add_argument(
        "--text-tokens", type=non_negative_float, default=0.0, metavar="N", help="text tokens (default 0)"
    )
    parser.add_argument(
        "--image-tokens", type=positive_int, metavar="N", help="image tokens before pruning (default: the shape's)"
    )
    parser.add_argument("--formula", choices=FORMULAS, default="paper", help="the count the JSON's top level reports")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def resolve_shape(spec: str) -> ModelShape:
    """A named shape, a local config (file or directory), or a Hub id's config."""
    if spec in SHAPES:
        return get_shape(spec)
    if not os.path.exists(spec) and "/" not in spec:  # not a path, not an org/name Hub id: no lookup to try
        raise CommandError(f"{spec!r} is neither a known shape ({', '.join(SHAPES)}) nor a config file or Hub id")
    from transformers import AutoConfig

    try:
        if os.path.isfile(spec):
            with open(spec) as handle:
                fields = json.load(handle)
            config = AutoConfig.for_model(**fields)
        else:
            config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(
            f"{spec!r} is neither a known shape ({', '.join(SHAPES)}) nor a readable config: {error}"
        ) from None
    return shape_from_config(config, name=os.path.basename(spec.rstrip("/")) or spec)


def check(args: argparse.Namespace) -> None:
    """`--param` goes with `--method`, and the method takes it (its layers against the shape come later)."""
    if args.param and not args.method:
        raise CommandError("--param applies to --method only")
    if args.method:
        build_method(args.method, **parse_params(args.param))


def _schedule(args: argparse.Namespace, shape: ModelShape) -> TokenSchedule:
    if args.method:
        return TokenSchedule.from_method(build_method(args.method, **parse_params(args.param)), shape, args.text_tokens)
    if args.schedule:
        return TokenSchedule.parse(args.schedule, shape.layers, args.text_tokens, shape.image_tokens)
    try:
        with open(args.trace) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read trace {args.trace!r}: {error}") from None
    return TokenSchedule.from_trace_dict(data)


def run(args: argparse.Namespace) -> int:
    shape = resolve_shape(args.model)
    if args.image_tokens is not None:
        shape = shape.with_image_tokens(args.image_tokens)
    schedule = _schedule(args, shape)
    reports = {formula: estimate(shape, schedule, formula) for formula in FORMULAS}
    chosen = reports[args.formula]
    if args.json:
        print(json.dumps(chosen.to_dict() | {"counts": {f: r.to_dict() for f, r in reports.items()}}, indent=2))
        return 0
    print(
        f"{shape.name}: {shape.image_tokens} image tokens, {schedule.text_tokens:g} text tokens, {shape.layers} layers"
    )
    print(
        f"schedule ({schedule.source}): {_describe(schedule)}; mean {chosen.mean_image_tokens:.1f} image tokens/layer"
    )
    if schedule.image_tokens[0] < shape.image_tokens:
        print(
            f"pruned before the language model: the vision tower and the projector still run on all "
            f"{shape.image_tokens} image tokens (only 'exact' counts them)"
        )
    print(f"{'formula':11s} {'unpruned TFLOPs':>15s} {'pruned TFLOPs':>13s} {'ratio':>7s} {'reduction':>9s}")
    for formula, report in reports.items():
        print(
            f"{formula:11s} {report.baseline_prefill_flops / 1e12:15.3f} {report.prefill_flops / 1e12:13.3f} "
            f"{report.ratio:7.1%} {report.reduction:9.1%}"
        )
    exact, mib = reports["exact"], 2**20
    print(
        f"decode step (exact): {exact.baseline_decode_step_flops / 1e9:.2f} -> {exact.decode_step_flops / 1e9:.2f} "
        f"GFLOPs; KV cache (16-bit): {exact.baseline_kv_cache_bytes / mib:.1f} -> {exact.kv_cache_bytes / mib:.1f} MiB"
    )
    return 0


def _describe(schedule: TokenSchedule) -> str:
    """`576 from layer 0, 288 from layer 2` for the layers where the count changes."""
    parts, previous = [], None
    for layer, count in enumerate(schedule.image_tokens):
        if count != previous:
            parts.append(f"{count:g} from layer {layer}")
            previous = count
    return ", ".join(parts)
