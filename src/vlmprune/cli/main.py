"""Entry point of the `vlmprune` command.

Each subcommand lives in its own module under `vlmprune.cli`, listed in `SUBCOMMANDS` (`module_name` maps a
command to its module: `convert-prismatic` -> `vlmprune.cli.convert_prismatic`). The module defines:

- `add_parser(subparsers)`: adds its parser and sets `run` as its default. Every argument is declared with a
  type from `vlmprune.cli.arguments` (or `choices`), so argparse rejects a bad value while parsing.
- `check(args)`, optional: the checks one argument's type cannot make, across arguments (`--param` against
  `--method`, `--save-trace` with `--method none`, ...) or against cheap state (a run directory). It raises
  `CommandError` or `VlmpruneError`, and loads nothing: `main` calls it right after parsing, before `run`.
- `run(args) -> int`: the work. Checks that need what it loads (a layer against the model's depth) stay
  there, before the expensive part.

Every user error (argparse's, an argument type's, `check`'s or `run`'s `CommandError` / `VlmpruneError`) is one
line on stderr, `vlmprune: error: MESSAGE`, and exit status 2; `--help` prints the usage as usual.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlmprune.cli._common import CommandError
from vlmprune.cli.arguments import ArgumentParser, one_line
from vlmprune.errors import VlmpruneError

__all__ = ["SUBCOMMANDS", "build_parser", "main", "module_name"]

SUBCOMMANDS: tuple[str, ...] = (
    "methods",
    "generate",
    "flops",
    "bench",
    "eval",
    "compare",
    "viz",
    "testbed",
    "demo",
    "calibrate",
    "env",
    "convert-prismatic",
)


def module_name(command: str) -> str:
    """The module of a subcommand: `vlmprune.cli.` + its name with `-` as `_`."""
    return f"vlmprune.cli.{command.replace('-', '_')}"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="vlmprune", description="Training-free visual-token pruning for Hugging Face VLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(module_name(name)).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `vlmprune` with `argv` (default `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its one-line error (status 2) or the help (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    check = getattr(importlib.import_module(module_name(args.command)), "check", None)
    try:
        if check is not None:
            check(args)
        return args.run(args)
    except (CommandError, VlmpruneError) as error:
        print(f"vlmprune: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `vlmprune methods | head`: stop quietly, as the Python docs advise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
