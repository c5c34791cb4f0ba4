"""`vlmprune demo`: FEATHER's experiment on the shipped testbed model, offline, in minutes on a CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmprune.cli._common import CommandError
from vlmprune.cli.arguments import output_dir, output_path, positive_int, testbed_model_dir

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the methods on the testbed's held-out scenes and compare them",
        description=(
            "Run the unpruned testbed model, FastV, FastV without RoPE, uniform sampling, KNN density, random, "
            "PyramidDrop and FEATHER at matched FLOPs on the held-out split: localization and other-question "
            "accuracy, FLOPs reduction and measured prefill speed-up, and a picture of where each method's kept "
            "tokens lie on the image grid."
        ),
    )
    parser.add_argument(
        "--model",
        type=testbed_model_dir,
        metavar="DIR",
        help="a testbed checkpoint (default: the one shipped)",
    )
    parser.add_argument("--limit", type=positive_int, default=200, help="held-out scenes (default 200)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument(
        "--out", type=output_dir, default="demo", metavar="DIR", help="where the picture goes (default ./demo)"
    )
    parser.add_argument("--json", type=output_path, metavar="FILE", help="also write the table as JSON")
    parser.add_argument("--timing-rounds", type=positive_int, default=5, help="interleaved prefill timings (default 5)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmprune.testbed.demo import run_demo
    from vlmprune.testbed.evaluate import prior_baseline
    from vlmprune.testbed.model import load_testbed
    from vlmprune.viz.analysis import keep_frequency
    from vlmprune.viz.plot import plot_keep_frequency, save_png

    out = Path(args.out)
    try:  # before minutes of work: where the results go must be writable
        out.mkdir(parents=True, exist_ok=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create the output directory: {error}") from None
    try:
        processor, model = load_testbed(args.model)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load testbed model {args.model}: {error}") from None
    torch.manual_seed(0)
    rows, records = run_demo(
        model, processor, limit=args.limit, batch_size=args.batch_size, timing_rounds=args.timing_rounds
    )
    print()
    header = ["loc acc", "other acc", "FLOPs red.", "prefill (min-max)", "kept rows (0 top, 1 bottom)", "target kept"]
    widths = (8, 9, 10, 18, 28, 11)
    print(f"{'method':14s} " + " ".join(f"{h:>{w}s}" for h, w in zip(header, widths, strict=True)))
    for r in rows:
        vertical = "-" if r.mean_vertical_position is None else f"{r.mean_vertical_position:.3f}"
        target = "-" if r.target_kept is None else f"{r.target_kept:.0%}"
        low, high = r.prefill_speedup_spread
        speed = f"{r.prefill_speedup:.2f}x ({low:.2f}-{high:.2f})"
        print(
            f"{r.method:14s} {r.localization_acc:8.3f} {r.other_acc:9.3f} {r.flops_reduction:10.0%} "
            f"{speed:>18s} {vertical:>28s} {target:>11s}"
        )
    prior = prior_baseline(limit=args.limit)
    print(f"{'(blind)':14s} {prior.localization_acc:8.3f} {prior.other_acc:9.3f}   answering without the image")
    print(f"prefill: median (and range) over {args.timing_rounds} interleaved timing rounds on this machine")
    print("kept rows: the mean row of the first stage's kept tokens; target kept: the share of the grid cells of")
    print("the box asked about that the first stage kept (FEATHER's diagnostic of why localization is lost)")
    if args.json:  # first: the table must not depend on the picture
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2, default=str) + "\n")
        print(f"\ntable: {args.json}")
    names = list(records)
    figure = plot_keep_frequency(
        [keep_frequency(records[n], 0) for n in names],
        [records[n][0]["stages"][0]["layer"] for n in names],
        vertical=[next(r.mean_vertical_position for r in rows if r.method == n) for n in names],
        samples=[len(records[n]) for n in names],
        title=f"where the first stage's kept tokens lie, {args.limit} held-out scenes x 2 questions",
        headings=[f"{n}: before layer {records[n][0]['stages'][0]['layer']}" for n in names],
    )
    save_png(figure, out / "kept_tokens.png")
    print(f"picture: {out / 'kept_tokens.png'}")
    return 0
