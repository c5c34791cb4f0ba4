"""Helpers shared by the subcommands."""

from __future__ import annotations

import ast

__all__ = ["CommandError", "parse_params"]


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
