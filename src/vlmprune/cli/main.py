"""Entry point of the `vlmprune` command.

Each subcommand lives in its own module under `vlmprune.cli`, listed in `SUBCOMMANDS`; the module defines
`add_parser(subparsers)`, which adds its parser and sets `run` as its default, and `run(args) -> int`.
User errors (`CommandError`, `VlmpruneError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlmprune.cli._common import CommandError
from vlmprune.errors import VlmpruneError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmprune", description="Training-free visual-token pruning for Hugging Face VLMs."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"vlmprune.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `vlmprune` with `argv` (default `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed usage and its error (status 2) or the help (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except (CommandError, VlmpruneError) as error:
        print(f"vlmprune: error: {error}", file=sys.stderr)
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
