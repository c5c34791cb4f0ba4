"""`vlmprune eval`: referring-expression localization accuracy of a model under a pruning method."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vlmprune.cli._common import (
    add_budget_scope_arg,
    add_loading_args,
    add_model_arg,
    add_task_args,
    check_scored,
    check_task_args,
    load_model,
    load_task_samples,
    method_or_none,
    parse_params,
    run_data,
)
from vlmprune.cli.arguments import key_value, method_or_none_name
from vlmprune.errors import VlmpruneError
from vlmprune.extras import import_extra

__all__ = ["add_parser", "check", "markdown_summary", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="localization accuracy (RefCOCO/+/g, OCID-Ref) under a pruning method",
        description=(
            "Evaluate referring-expression localization (Acc@IoU>=0.5, also 0.25/0.3/0.7, mean IoU, centre "
            "accuracy) with batched greedy generation. Every finished sample is appended to OUT/samples.jsonl, so "
            "a killed run resumes where it stopped; bad data is reported and counted. Runs data-parallel under "
            "`accelerate launch --num_processes N -m vlmprune.cli.main eval ...`."
        ),
    )
    add_model_arg(parser)
    parser.add_argument(
        "--method", type=method_or_none_name, default="none", metavar="NAME", help="a method, or `none` (default)"
    )
    parser.add_argument("--param", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    add_budget_scope_arg(parser)
    add_task_args(parser)
    add_loading_args(parser)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def _distributed() -> tuple[int, int, object | None]:
    """(rank, world size, accelerate state) when launched by accelerate/torchrun, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    state = import_extra("accelerate", "evaluation on several processes").PartialState()
    return state.process_index, state.num_processes, state


def check(args: argparse.Namespace) -> None:
    """The method takes its `--param`s; every task has data."""
    method_or_none(args.method, parse_params(args.param))
    check_task_args(args)


def run(args: argparse.Namespace) -> int:
    from vlmprune.eval.runner import MANIFEST, EvalConfig, clear_run, load_records, run_grounding, summarize

    out = Path(args.out)
    method = method_or_none(args.method, parse_params(args.param))
    samples = load_task_samples(args)
    rank, world, state = _distributed()
    processor, model = load_model(
        args.model, device=args.device if state is None else str(state.device), dtype=args.dtype, attn=args.attn
    )
    if args.overwrite and rank == 0 and out.is_dir():
        clear_run(out)
    if state is not None:
        state.wait_for_everyone()
    config = EvalConfig(
        out, args.batch_size, args.max_new_tokens, rank, world, args.method, run_data(args), args.budget_scope
    )
    bar = None
    if not args.no_progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=-(-len(samples) // world), desc=f"eval {args.method}", unit="sample")
    try:
        run_grounding(model, processor, method, samples, config, progress=bar.update if bar else lambda _: None)
    except VlmpruneError:
        raise
    finally:
        if bar is not None:
            bar.close()
    if state is not None:
        state.wait_for_everyone()
        if rank != 0:
            return 0
        _merge(out, samples, load_records(out))
    records = load_records(out)
    check_scored(records)
    summary = {
        "method": args.method,
        "params": json.loads((out / MANIFEST).read_text())["params"],  # every parameter, defaults included
        "model": args.model,
        "tasks": summarize(records),
    }
    loc = [entry["acc@0.5"] for entry in summary["tasks"].values()]
    summary["localization_avg"] = sum(loc) / len(loc)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_summary(summary)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


def _merge(out: Path, samples: list, records: list[dict]) -> None:
    """One samples.jsonl in the samples' order, from the per-process files (which are then removed)."""
    order = {(s.task, s.id): i for i, s in enumerate(samples)}
    unique = {(r["task"], r["id"]): r for r in records}
    merged = sorted(unique.values(), key=lambda r: order.get((r["task"], r["id"]), len(order)))
    tmp = out / "samples.jsonl.tmp"
    with open(tmp, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in merged)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out / "samples.jsonl")
    for path in out.glob("samples.rank*.jsonl"):
        path.unlink()


def markdown_summary(summary: dict) -> str:
    lines = [
        f"**{summary['method']}** {summary.get('params') or ''}",
        "",
        "| task | samples | errors | unparsed | Acc@0.5 | Acc@0.25 | Acc@0.7 | mean IoU | centre "
        "| image tokens/layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, e in summary["tasks"].items():
        tokens = e.get("mean_image_tokens_per_layer")
        lines.append(
            f"| {task} | {e['samples']} | {e['errors']} | {e['unparsed']} | {e['acc@0.5']:.3f} | {e['acc@0.25']:.3f} "
            f"| {e['acc@0.7']:.3f} | {e['mean_iou']:.3f} | {e['center_acc']:.3f} | "
            f"{'-' if tokens is None else f'{tokens:.1f}'} |"
        )
    lines.append(f"\nlocalization average (Acc@0.5): {summary['localization_avg']:.3f}")
    return "\n".join(lines)
