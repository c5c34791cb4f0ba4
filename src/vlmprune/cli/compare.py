"""`vlmprune compare`: several methods at matched FLOPs on the same tasks, in the layout of FEATHER's Table 1."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmprune.cli._common import (
    CommandError,
    add_budget_scope_arg,
    add_loading_args,
    add_model_arg,
    add_task_args,
    check_scored,
    check_task_args,
    load_model,
    load_task_samples,
    parse_method_params,
    run_data,
)
from vlmprune.cli.arguments import existing_dir, method_key_value, method_list, non_negative_float, unit_fraction
from vlmprune.extras import import_extra

__all__ = ["add_parser", "check", "run", "table"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare methods at matched FLOPs on localization (and lmms-eval) tasks",
        description=(
            "Run several methods on the same localization tasks (and, with --other-tasks, lmms-eval tasks), each "
            "with its budget set so that its projected prefill FLOPs reduction matches --match-flops (from the cost "
            "model on the model's own shape), and print a table like FEATHER's Table 1: per-task accuracy, "
            "localization average, other-task average and FLOPs reduction. Each method's run is resumable in "
            "OUT/<method>/."
        ),
    )
    add_model_arg(parser)
    parser.add_argument("--methods", type=method_list, default="fastv,pdrop,feather", help="comma-separated")
    parser.add_argument("--param", type=method_key_value, action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument(
        "--match-flops", type=unit_fraction, metavar="R", help="target FLOPs reduction in [0, 1), e.g. 0.64"
    )
    add_budget_scope_arg(parser)
    parser.add_argument("--formula", choices=("paper", "paper-3ndm", "exact"), default="paper")
    parser.add_argument(
        "--text-tokens", type=non_negative_float, default=0.0, help="text tokens in the FLOPs match (default 0)"
    )
    parser.add_argument("--other-tasks", default="", help="lmms-eval tasks, comma-separated (needs lmms-eval)")
    parser.add_argument("--lmms-include", type=existing_dir, metavar="DIR", help="extra lmms-eval task directory")
    add_task_args(parser)
    add_loading_args(parser)
    parser.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    """Every method takes its `--param`s (against the model's depth once it is loaded); every task has data;
    lmms-eval is there when `--other-tasks` needs it."""
    _methods(args)
    check_task_args(args)
    if args.lmms_include and not _other_task_names(args):
        raise CommandError("--lmms-include applies to --other-tasks only")
    if _other_task_names(args):
        import_extra("lmms_eval", "--other-tasks")


def _other_task_names(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in args.other_tasks.split(",") if t.strip()]


def _methods(args: argparse.Namespace, shape=None) -> list:
    """The methods to compare; with the model's `shape`, matched to `--match-flops` (without, only built)."""
    from vlmprune.cost import match_flops
    from vlmprune.methods import build_method

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    per_method = parse_method_params(args.param, names)
    methods = []
    for name in names:
        method = build_method(name, **per_method.get(name, {}))
        if args.match_flops is not None and shape is not None:
            method = match_flops(method, shape, args.match_flops, formula=args.formula, text_tokens=args.text_tokens)
        methods.append(method)
    return methods


def _other_tasks(args, model, processor, method, out: Path) -> dict[str, float]:
    tasks = _other_task_names(args)
    if not tasks:
        return {}
    simple_evaluate = import_extra("lmms_eval.evaluator", "--other-tasks").simple_evaluate
    TaskManager = import_extra("lmms_eval.tasks", "--other-tasks").TaskManager
    from vlmprune.eval.lmms_plugin import VlmpruneLMM

    lmm = VlmpruneLMM.from_model(model, processor, method, batch_size=args.batch_size)
    manager = TaskManager(include_path=args.lmms_include) if args.lmms_include else TaskManager()
    results = simple_evaluate(model=lmm, tasks=tasks, task_manager=manager, limit=args.limit)["results"]
    scores = {}
    for task in tasks:
        metrics = {k: v for k, v in results.get(task, {}).items() if isinstance(v, int | float) and "stderr" not in k}
        metrics.pop("alias", None)
        scores[task] = float(next(iter(metrics.values()))) if metrics else float("nan")
    (out / "other_tasks.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def run(args: argparse.Namespace) -> int:
    from vlmprune.adapters import get_adapter
    from vlmprune.cost import TokenSchedule, estimate, shape_from_config
    from vlmprune.engine import PruningSession
    from vlmprune.eval.runner import EvalConfig, clear_run, load_records, run_grounding, summarize

    samples = load_task_samples(args)  # before the model loads: bad data fails at once
    processor, model = load_model(args.model, device=args.device, dtype=args.dtype, attn=args.attn)
    shape = shape_from_config(model.config, name=args.model)
    methods = _methods(args, shape)
    adapter = get_adapter(model)
    for method in methods:  # every method against the model (layers within its depth) before evaluating any
        PruningSession(model, method, adapter, args.budget_scope)
    rows = []
    for name, method in [("unpruned", None), *((m.name, m) for m in methods)]:
        out = Path(args.out) / name
        if args.overwrite and out.is_dir():
            clear_run(out)
        config = EvalConfig(
            out,
            args.batch_size,
            args.max_new_tokens,
            method_name=name,
            data=run_data(args),
            budget_scope=args.budget_scope,
        )
        run_grounding(model, processor, method, samples, config)
        records = load_records(out)
        check_scored(records)
        summary = summarize(records)
        schedule = (
            TokenSchedule.from_method(method, shape, args.text_tokens)
            if method is not None
            else TokenSchedule.unpruned(shape, args.text_tokens)
        )
        reduction = estimate(shape, schedule, args.formula).reduction
        rows.append(
            {
                "method": name,
                "params": method.parameters() if method is not None else {},
                "flops_reduction": reduction,
                "localization": {task: entry["acc@0.5"] for task, entry in summary.items()},
                "other": _other_tasks(args, model, processor, method, out),
            }
        )
    result = table(rows)
    print(result)
    out = Path(args.out)
    (out / "compare.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    (out / "compare.md").write_text(result + "\n")
    return 0


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def table(rows: list[dict]) -> str:
    """FEATHER's Table 1 layout: FLOPs reduction, per-task accuracy, localization and other averages."""
    loc_tasks = list(dict.fromkeys(t for r in rows for t in r["localization"]))
    other_tasks = list(dict.fromkeys(t for r in rows for t in r["other"]))
    header = ["method", "FLOPs red.", *loc_tasks, "Loc-Avg", *other_tasks, "Other-Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        loc = [r["localization"].get(t) for t in loc_tasks]
        other = [r["other"].get(t) for t in other_tasks]
        cells = [
            r["method"],
            f"{r['flops_reduction']:.0%}",
            *map(fmt, loc),
            fmt(_mean(v for v in loc if v is not None)),
            *map(fmt, other),
            fmt(_mean(v for v in other if v is not None)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
