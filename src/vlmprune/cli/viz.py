"""`vlmprune viz`: pictures and statistics of what a method kept, from an eval run or one saved trace."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings

from vlmprune.cli._common import CommandError
from vlmprune.cli.arguments import box, existing_file, existing_path, non_negative_int, output_dir

__all__ = ["add_parser", "check", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "viz",
        help="pictures and statistics of the kept tokens, from an eval run or a saved trace",
        description=(
            "With --run DIR: read DIR/samples.jsonl (written by `vlmprune eval`) and write heatmap.png (how often "
            "each grid position is kept, per stage, with the kept tokens' mean vertical position), summary.json "
            "(per stage: samples, mean kept, mean vertical position, share of the target box's tokens kept) and "
            "samples/*.png (each of the first N samples with its dropped tokens dimmed and its target box). "
            "With --trace FILE --image FILE: the same picture and summary for one trace saved by "
            "`vlmprune generate --save-trace`."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--run",
        dest="run_dir",
        type=existing_path,
        metavar="DIR",
        help="an eval output directory (or its samples.jsonl)",
    )
    source.add_argument(
        "--trace", type=existing_file, metavar="FILE", help="a trace JSON saved by `vlmprune generate --save-trace`"
    )
    parser.add_argument("--out", type=output_dir, metavar="DIR", help="output directory (default with --run: DIR/viz)")
    parser.add_argument(
        "--samples",
        type=non_negative_int,
        default=12,
        metavar="N",
        help="--run: per-sample pictures to draw (default 12)",
    )
    parser.add_argument(
        "--method", metavar="NAME", help="--run: only records of this method; --trace: the method's name for titles"
    )
    parser.add_argument("--task", metavar="NAME", help="--run: only records of this task")
    parser.add_argument(
        "--image", type=existing_file, metavar="FILE", help="--trace: the image the trace was made with"
    )
    parser.add_argument(
        "--box",
        type=box,
        metavar="X1,Y1,X2,Y2",
        help="--trace: the target box, normalised to the original image (0..1)",
    )
    parser.add_argument(
        "--frame",
        choices=("pad", "crop", "stretch"),
        default="crop",
        help="--trace: how the image maps onto the model's grid: crop (transformers' LLaVA processor default, "
        "as `vlmprune generate` uses it), pad (original LLaVA-1.5 / do_pad=True), stretch (e.g. Qwen2-VL). "
        "Default: crop",
    )
    parser.add_argument(
        "--sample", type=non_negative_int, default=0, metavar="I", help="--trace: which sample of the batch"
    )
    parser.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """The options that go with --run or with --trace only, and what --trace needs."""
    if args.run_dir is not None:
        for flag in ("image", "box"):
            if getattr(args, flag) is not None:
                raise CommandError(f"--{flag} applies to --trace only")
        return
    if args.task is not None:
        raise CommandError("--task applies to --run only")
    if args.image is None:
        raise CommandError("--trace needs --image, the image the trace was made with")
    if args.out is None:
        raise CommandError("--trace needs --out DIR")


def run(args: argparse.Namespace) -> int:
    return _run_dir(args) if args.run_dir is not None else _run_trace(args)


def _load_image(path: str):
    from PIL import UnidentifiedImageError

    from vlmprune.eval.data import open_image_ref

    try:
        return open_image_ref(path)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise CommandError(f"cannot read image {path!r}: {error}") from None


def _write_json(path: str, data: object) -> None:
    def clean(value):  # NaN is not JSON
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    with open(path, "w", encoding="utf-8") as handle:
        json.dump(clean(data), handle, indent=1)
        handle.write("\n")


def _save(figure, path: str) -> None:
    from vlmprune.viz import save_png

    save_png(figure, path)
    print(f"wrote {path}")


def _print_stages(summary: dict) -> None:
    for stage in summary["stages"]:
        rows, cols = stage["grid"]
        parts = [f"{stage['samples']} samples", f"{stage['mean_kept']:.1f} kept ({stage['mean_kept_fraction']:.0%})"]
        if stage["mean_vertical_position"] is not None:
            parts.append(f"mean vertical position {stage['mean_vertical_position']:.3f}")
        if stage["mean_box_token_share"] is not None:
            parts.append(f"target tokens kept {stage['mean_box_token_share']:.1%} ({stage['box_samples']} boxes)")
        print(f"stage {stage['stage']} (before layer {stage['layer']}, {rows}x{cols}): " + ", ".join(parts))


def _run_dir(args: argparse.Namespace) -> int:
    from vlmprune.viz import RECORD_FILE, has_stages, plot_keep_frequency, plot_sample, read_records, summarize

    path = args.run_dir if os.path.isfile(args.run_dir) else os.path.join(args.run_dir, RECORD_FILE)
    if not os.path.isfile(path):
        raise CommandError(f"{path!r} does not exist: is {args.run_dir!r} a `vlmprune eval` output directory?")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            records = read_records(path)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CommandError(f"cannot read {path!r}: {error}") from None
    for warning in caught:
        print(f"vlmprune: warning: {warning.message}", file=sys.stderr)
    if args.method is not None:
        records = [r for r in records if r.get("method") == args.method]
    if args.task is not None:
        records = [r for r in records if r.get("task") == args.task]
    filters = (("method", args.method), ("task", args.task))
    chosen = "".join(f" with {flag} {value!r}" for flag, value in filters if value)
    if not records:
        raise CommandError(f"{path!r} has no records{chosen}: the run is empty")
    usable = [r for r in records if has_stages(r)]
    if not usable:
        errors = sum(1 for r in records if r.get("error"))
        raise CommandError(
            f"none of the {len(records)} records{chosen} has pruning stages ({errors} with errors, "
            f"{len(records) - errors} unpruned): nothing to draw"
        )
    methods = sorted({str(r.get("method")) for r in usable})
    if len(methods) > 1:
        raise CommandError(f"the run mixes methods {', '.join(methods)}: choose one with --method")

    try:
        summary = summarize(records)
    except ValueError as error:
        raise CommandError(f"bad record in {path!r}: {error}") from None
    out = args.out or os.path.join(os.path.dirname(path), "viz")
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "summary.json"), summary)
    print(f"wrote {os.path.join(out, 'summary.json')}")
    _print_stages(summary)

    import numpy as np

    tasks = ", ".join(summary["tasks"]) or "samples"
    try:
        figure = plot_keep_frequency(
            [np.asarray(s["keep_frequency"]) for s in summary["stages"]],
            [s["layer"] for s in summary["stages"]],
            vertical=[s["mean_vertical_position"] for s in summary["stages"]],
            samples=[s["samples"] for s in summary["stages"]],
            title=f"How often each image token is kept — {_method_label(path, methods[0])} on {tasks}",
        )
        _save(figure, os.path.join(out, "heatmap.png"))
        for drawn, record in enumerate(usable[: args.samples]):
            image = None
            if record.get("image"):
                try:
                    image = _load_image(record["image"])
                except CommandError as error:
                    print(f"vlmprune: warning: {error}; drawing on a grey canvas", file=sys.stderr)
            name = "_".join(str(record.get(key)) for key in ("task", "id") if record.get(key) is not None)
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "sample"
            _save(plot_sample(record, image), os.path.join(out, "samples", f"{drawn:03d}_{name}.png"))
    except ImportError as error:
        raise CommandError(str(error)) from None
    return 0


def _method_label(records_path: str, method: str) -> str:
    """`method` and the parameters its run changed from the defaults, read from the run's manifest."""
    from vlmprune.errors import VlmpruneError
    from vlmprune.eval.runner import MANIFEST
    from vlmprune.methods import method_parameters

    try:
        with open(os.path.join(os.path.dirname(records_path), MANIFEST)) as handle:
            params = json.load(handle)["params"]
        defaults = json.loads(json.dumps(method_parameters(method), default=str))
    except (OSError, ValueError, KeyError, TypeError, VlmpruneError):
        return method
    changed = ", ".join(f"{key}={value}" for key, value in params.items() if defaults.get(key) != value)
    return f"{method} ({changed or 'defaults'})"


def _run_trace(args: argparse.Namespace) -> int:
    from vlmprune.viz import plot_sample, record_from_trace, summarize

    try:
        with open(args.trace, encoding="utf-8") as handle:
            trace = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CommandError(f"cannot read trace {args.trace!r}: {error}") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("stages"), list):
        raise CommandError(f"{args.trace!r} is not a trace saved by `vlmprune generate --save-trace`")
    if not trace["stages"]:
        raise CommandError(f"trace {args.trace!r} has no pruning stage: nothing to draw")
    image = _load_image(args.image)
    try:
        record = record_from_trace(
            trace,
            image=args.image,
            image_size=image.size,
            target_box=list(args.box) if args.box is not None else None,
            frame=args.frame,
            sample=args.sample,
            method=args.method,
        )
        summary = summarize([record])
    except (KeyError, TypeError, ValueError) as error:
        raise CommandError(f"bad trace {args.trace!r}: {error}") from None
    grids = [(s.get("image_grids") or [])[args.sample : args.sample + 1] for s in trace["stages"]]
    if any(len(images) > 1 for per_sample in grids for images in per_sample):
        print("vlmprune: note: the trace has several images; drawing the first", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    _write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"wrote {os.path.join(args.out, 'summary.json')}")
    _print_stages(summary)
    try:
        _save(plot_sample(record, image), os.path.join(args.out, "overlay.png"))
    except ImportError as error:
        raise CommandError(str(error)) from None
    return 0
