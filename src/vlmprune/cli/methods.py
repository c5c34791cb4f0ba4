"""`vlmprune methods`: every registered method, its paper and its parameters with their defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json

from vlmprune.methods import METHODS, method_parameters
from vlmprune.methods.base import PARAMETER_HELP

__all__ = ["add_parser", "describe_methods", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "methods",
        help="list the pruning methods and their parameters",
        description="List the pruning methods, their papers, and their parameters with the paper's defaults.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.set_defaults(run=run)


def describe_methods() -> dict[str, dict[str, object]]:
    """`{name: {"paper": ..., "summary": ..., "parameters": {param: default}}}` for every method."""
    described: dict[str, dict[str, object]] = {}
    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip()
        parameters = method_parameters(name)
        described[name] = {
            "paper": cls.paper,
            "summary": doc.splitlines()[0] if doc else "",
            "parameters": parameters,
            "help": {key: PARAMETER_HELP.get(key, "") for key in parameters},
        }
    return described


def run(args: argparse.Namespace) -> int:
    described = describe_methods()
    if args.json:
        print(json.dumps(described, indent=2, default=_jsonable))
        return 0
    width = max(len(name) for name in described)
    for name, info in described.items():
        print(f"{name:<{width}}  {info['paper']}")
        if info["summary"]:
            print(f"{'':<{width}}  {info['summary']}")
        params = " ".join(f"{key}={_show(value)}" for key, value in info["parameters"].items())
        print(f"{'':<{width}}  {params}")
        keys = max(len(key) for key in info["parameters"])
        for key, text in info["help"].items():
            print(f"{'':<{width}}    {key:<{keys}}  {text}")
        print()
    print("Override a default with: vlmprune generate ... --method NAME --param key=value")
    return 0


def _show(value: object) -> str:
    return "(required)" if value is dataclasses.MISSING else repr(value)


def _jsonable(value: object) -> object:
    if value is dataclasses.MISSING:
        return None
    return repr(value)
