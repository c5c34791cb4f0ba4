"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import warnings
from pathlib import Path

from vlmprune.cli.arguments import (
    data_source,
    device,
    model_ref,
    non_negative_int,
    output_dir,
    positive_int,
    task_list,
)
from vlmprune.errors import VlmpruneError

__all__ = [
    "CommandError",
    "add_loading_args",
    "add_model_arg",
    "add_task_args",
    "check_scored",
    "check_task_args",
    "load_model",
    "load_task_samples",
    "method_or_none",
    "non_negative_int",
    "parse_method_params",
    "parse_params",
    "positive_int",
    "run_data",
]


class CommandError(Exception):
    """A user error found by a subcommand; `main` prints it as one `vlmprune: error: ...` line, exit 2."""


def parse_params(items: list[str] | None) -> dict[str, object]:
    """`["layer=2", "layers=[8,16]", "rope=False", "softmax=image"]` -> a dict of Python values.

    Each value is read with `ast.literal_eval`; a value that is not a Python literal stays a string, so
    `softmax=image` needs no quotes.
    """
    params: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise CommandError(f"--param expects key=value (e.g. ratio=0.75), got {item!r}")
        try:
            params[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            params[key] = raw.strip()
    return params


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    """--model, a Hub id or a local directory, as `load_model` takes it."""
    parser.add_argument(
        "--model", required=True, type=model_ref, metavar="ID_OR_DIR", help="Hub id or local model directory"
    )


def add_budget_scope_arg(parser: argparse.ArgumentParser) -> None:
    """--budget-scope, as `vlmprune.prune` takes it."""
    parser.add_argument(
        "--budget-scope",
        choices=("global", "per_image"),
        default="global",
        help="spend each stage's budget over a prompt's image tokens as a whole (global, the default) or per image, "
        "crop or frame in proportion to its tokens (per_image: the official VisPruner/VisionZip convention on "
        "LLaVA-NeXT crops)",
    )


def add_loading_args(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --attn, as `load_model` takes them."""
    parser.add_argument("--device", type=device, default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights' dtype (default: auto)",
    )
    parser.add_argument(
        "--attn",
        choices=("sdpa", "eager", "flash_attention_2"),
        default="sdpa",
        help="attention implementation (default: sdpa)",
    )


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """Which localization tasks, where their data is, and how to generate."""
    parser.add_argument(
        "--tasks", type=task_list, default="refcoco", help="comma-separated: refcoco, refcoco+, refcocog, ocid-ref"
    )
    parser.add_argument(
        "--data",
        type=data_source,
        action="append",
        default=[],
        metavar="[TASK=]PATH",
        help="a root holding each task's folder, or TASK=PATH per task (repeatable)",
    )
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="first N samples of each task (N >= 1)")
    parser.add_argument("--out", required=True, type=output_dir, metavar="DIR")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh in --out instead of resuming the run there"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N")


def check_task_args(args: argparse.Namespace) -> None:
    """The cross-argument checks of `add_task_args`: every task has data, every `--data TASK=` is a task run."""
    _task_paths(_tasks(args), args.data)


def load_task_samples(args: argparse.Namespace) -> list:
    """The samples of the tasks `add_task_args` named (`--tasks`, `--data`, `--split`, first `--limit` of each)."""
    from vlmprune.eval.data import load_task

    samples = []
    for task, path in _task_paths(_tasks(args), args.data).items():
        loaded = load_task(task, path, args.split)
        samples.extend(loaded[: args.limit] if args.limit else loaded)
    if not samples:
        raise CommandError("no samples to evaluate")
    return samples


def _tasks(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in args.tasks.split(",") if t.strip()]


def _task_paths(tasks: list[str], data: list[str]) -> dict[str, Path]:
    roots = [Path(d) for d in data if "=" not in d]
    explicit = dict(d.split("=", 1) for d in data if "=" in d)
    if len(roots) > 1:
        listed = ", ".join(map(str, roots))
        raise CommandError(f"--data: give one ROOT (or TASK=PATH per task), got {len(roots)}: {listed}")
    unused = sorted(set(explicit) - set(tasks))
    if unused:
        raise CommandError(f"--data {unused[0]}=... names a task not in --tasks {','.join(tasks)}")
    paths = {}
    for task in tasks:
        if task in explicit:
            paths[task] = Path(explicit[task])
        elif roots:
            root = roots[0]
            paths[task] = root / task if (root / task).is_dir() and task == "ocid-ref" else root
        else:
            raise CommandError(f"no data for task {task!r}: give --data ROOT or --data {task}=PATH")
    return paths


def parse_method_params(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, object]]:
    """`["fastv.ratio=0.75", "feather.layers=[2,4]"]` -> `{"fastv": {"ratio": 0.75}, "feather": {"layers": [2, 4]}}`.

    Every METHOD must be one of `methods` (those the command runs): a parameter for a method that does not run
    would be silently ignored.
    """
    per_method: dict[str, list[str]] = {}
    for item in items or []:
        target, _, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not dot or not key:
            raise CommandError(f"--param expects METHOD.KEY=VALUE (e.g. fastv.ratio=0.75), got {item!r}")
        if name not in methods:
            raise CommandError(f"--param {item} is for {name!r}, which is not run here (--methods {','.join(methods)})")
        per_method.setdefault(name, []).append(f"{key}={value}")
    return {name: parse_params(params) for name, params in per_method.items()}


def run_data(args: argparse.Namespace) -> dict[str, object]:
    """Where the samples of `add_task_args` come from, as a run's manifest records it."""
    return {"tasks": args.tasks, "data": list(args.data), "split": args.split}


def check_scored(records: list[dict]) -> None:
    """`CommandError` if every sample errored: a table of zeros is not a result."""
    from vlmprune.eval.runner import error_reasons

    if records and all(record.get("error") for record in records):
        listed = ", ".join(f"{reason} x{count}" for reason, count in error_reasons(records).items())
        first = records[0]["error"]
        raise CommandError(f"every one of the {len(records)} samples failed ({listed}; e.g. {first}): nothing scored")


def method_or_none(name: str, params: dict[str, object]):
    """The method `name` with `params`, or None for `none` (the unpruned model)."""
    from vlmprune.methods import build_method

    if name.lower() == "none":
        if params:
            raise CommandError(f"--method none takes no --param, got {', '.join(sorted(params))}")
        return None
    try:
        return build_method(name, **params)
    except VlmpruneError:
        raise
    except (ValueError, TypeError) as error:  # a method's own validation of its fields
        raise CommandError(f"invalid parameters for method {name!r}: {error}") from None


def load_model(model_id: str, *, device: str, dtype: str, attn: str):
    """`(processor, model)` from `model_id` (checked by the `model_ref` argument type), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmprune.processors import load_processor

    path = os.path.expanduser(model_id)
    try:
        torch_device = torch.device(device)
        torch.empty(0, device=torch_device)  # fails early on a device this machine does not have
    except (RuntimeError, AssertionError) as error:
        raise CommandError(f"device {device!r} is not usable: {error}") from None
    kwargs: dict[str, object] = {
        "dtype": dtype if dtype == "auto" else getattr(torch, dtype),
        "attn_implementation": attn,
    }
    # Loading straight onto an accelerator needs accelerate; without it the model is loaded, then moved.
    if torch_device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = str(torch_device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            processor = load_processor(path)
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"cannot load model {model_id}: {message}") from None
    try:
        model = model.to(torch_device)
    except (RuntimeError, AssertionError) as error:
        raise CommandError(f"cannot move the model to {device}: {error}") from None
    return processor, model.eval()
