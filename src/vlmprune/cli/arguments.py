"""The argument types and the parser class every `vlmprune` subcommand declares its arguments with.

Each type is a callable `str -> value` for `add_argument(type=...)`. argparse calls it while parsing, so a bad
value stops the command before its `check` or `run` does anything (before any model loads), and
`ArgumentParser.error` prints it as one line, `vlmprune: error: argument --NAME: MESSAGE`, exit status 2. Each
message names the bad value and what would be valid. argparse also runs a type on a string default.

Types that read the file system (`existing_file`, `output_dir`, ...) only look: none creates anything.
Checks that need the model (a layer against its depth) stay in the subcommand's `run`, before expensive work.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import NoReturn

__all__ = [
    "ArgumentParser",
    "box",
    "comma_list",
    "data_source",
    "device",
    "existing_dir",
    "existing_file",
    "existing_path",
    "key_value",
    "method_key_value",
    "method_list",
    "method_name",
    "method_or_none_name",
    "model_directory",
    "model_ref",
    "non_negative_float",
    "non_negative_int",
    "one_line",
    "one_of",
    "output_dir",
    "output_file",
    "output_path",
    "positive_float",
    "positive_int",
    "positive_int_list",
    "shape_ref",
    "task_list",
    "testbed_model_dir",
    "unit_fraction",
]


def one_line(message: object) -> str:
    """`message` on one line: a path or value holding a line break must not split an error in two."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(message).strip())


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a usage error as one line `vlmprune: error: MESSAGE` (exit status 2).

    argparse's own error prints the usage block and `PROG: error: ...`; here the message alone, so every error
    of the command, whether argparse, a type, a `check` or a `run` finds it, has one form. `--help` is
    unchanged. Subparsers are made with the parent's class, so one root parser of this class is enough.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vlmprune: error: {one_line(message)}\n")


def _named(name: str) -> Callable[[Callable[[str], object]], Callable[[str], object]]:
    """Name a type made by a factory (argparse shows the name if a type raises something unexpected)."""

    def rename(function: Callable[[str], object]) -> Callable[[str], object]:
        function.__name__ = function.__qualname__ = name
        return function

    return rename


# ----------------------------------------------------------------------------------------------- numbers


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def number_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high] (or (low, high] with `low_open`)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    @_named(f"number in {interval}")
    def parse(text: str) -> float:
        value = _float(text)
        if value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def _int_at_least(text: str, least: int) -> int:
    value = _int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite number above 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative, got {text}")
    return value


def unit_fraction(text: str) -> float:
    """A number in [0, 1): a share removed, such as a FLOPs reduction."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (e.g. 0.64 for 64 %), got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    """`1,8` -> `[1, 8]`: comma-separated integers, each at least 1."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (e.g. 1,8), got {text!r}")
    values = []
    for item in items:
        try:
            values.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers >= 1 (e.g. 1,8), got {item!r} in {text!r}"
            ) from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {min(values)} in {text!r}")
    return values


# ----------------------------------------------------------------------------------------------- choices


def one_of(options: Iterable[str] | Callable[[], Iterable[str]], what: str) -> Callable[[str], str]:
    """One of `options` (or of what the callable returns when parsing: a registry read late)."""

    @_named(f"one_of_{what.replace(' ', '_')}")
    def parse(text: str) -> str:
        valid = list(options() if callable(options) else options)
        if text not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(valid)}")
        return text

    return parse


def comma_list(item: Callable[[str], object], what: str) -> Callable[[str], str]:
    """Comma-separated `what`s, each accepted by the type `item`, none twice; returns `text` as given."""

    @_named(f"comma_list_of_{what.replace(' ', '_')}")
    def parse(text: str) -> str:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected one or more comma-separated {what}s, got {text!r}")
        for part in items:
            item(part)
        twice = sorted({part for part in items if items.count(part) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{what} {twice[0]!r} is listed twice in {text!r}")
        return text

    return parse


def method_name(text: str) -> str:
    """A registered pruning method (see `vlmprune methods`)."""
    from vlmprune.errors import UnknownMethodError
    from vlmprune.methods import method_parameters

    try:
        method_parameters(text)
    except UnknownMethodError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def method_or_none_name(text: str) -> str:
    """A registered pruning method, or `none` for the unpruned model."""
    if text.lower() == "none":
        return text
    try:
        return method_name(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error}, or none (the unpruned model)") from None


method_list = comma_list(method_name, "method")


def _task(text: str) -> str:
    from vlmprune.eval.data import LOADERS

    if text not in LOADERS:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; choose from {', '.join(LOADERS)}")
    return text


task_list = comma_list(_task, "task")


def key_value(text: str) -> str:
    """`KEY=VALUE` with KEY an identifier (the value is read later, against what it sets); returns `text`."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. ratio=0.75), got {text!r}")
    return text


def method_key_value(text: str) -> str:
    """`METHOD.KEY=VALUE` (e.g. `fastv.ratio=0.75`) with METHOD a registered method; returns `text`."""
    target, sep, _ = text.partition("=")
    name, dot, key = target.partition(".")
    if not sep or not dot or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE (e.g. fastv.ratio=0.75), got {text!r}")
    method_name(name.strip())
    return text


# ----------------------------------------------------------------------------------------------- paths


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def existing_file(text: str) -> str:
    """A file that exists."""
    _nonempty(text)
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"file {text} does not exist")
    return text


def existing_dir(text: str) -> str:
    """A directory that exists."""
    _nonempty(text)
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"directory {text} does not exist")
    return text


def existing_path(text: str) -> str:
    """A file or a directory that exists."""
    _nonempty(text)
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def _check_writable(text: str, *, file: bool) -> None:
    """ArgumentTypeError unless `text` can be written: the nearest existing directory at or above it (above it
    for a `file`) is a writable directory, and an existing `file` is itself writable."""
    path = os.path.abspath(_nonempty(text))
    if file:
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text}: it is not writable")
        path = os.path.dirname(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {path} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {path} is not writable")


def output_file(text: str) -> str:
    """A file to write whose directory exists (it is not created): e.g. `generate --save-trace`."""
    parent = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: its directory {parent} does not exist")
    _check_writable(text, file=True)
    return text


def output_path(text: str) -> str:
    """A file to write; missing directories above it are created, so nothing above it may be a file."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    _check_writable(text, file=True)
    return text


def output_dir(text: str) -> str:
    """A directory to write into: existing, or creatable (nothing above it is a file)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    _check_writable(text, file=False)
    return text


# ----------------------------------------------------------------------------------------------- models and data


def _looks_local(model: str) -> bool:
    """True for paths that cannot be a Hub id (`org/name`): absolute, relative with `.`, or `~`."""
    return (
        os.path.isabs(model)
        or model.startswith(("./", "../", "~", ".\\", "..\\"))
        or model in (".", "..")
        or model.count("/") > 1
    )


def model_ref(text: str) -> str:
    """A Hub id (`org/name`, looked up when loading) or a local model directory holding config.json."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a Hub id or a model directory, got an empty string")
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        if _looks_local(text):
            raise argparse.ArgumentTypeError(f"model directory {text} does not exist")
        return text
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"model path {text} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise argparse.ArgumentTypeError(f"model directory {text} has no config.json")
    return text


def model_directory(hint: str = "") -> Callable[[str], str]:
    """A local model directory holding config.json; `hint` says how to get one."""

    @_named("model_directory")
    def parse(text: str) -> str:
        if not os.path.isfile(os.path.join(text, "config.json")):
            what = "is a file" if os.path.isfile(text) else "does not exist" if not os.path.exists(text) else ""
            problem = f"{text} {what}" if what else f"no model in {text} (config.json missing)"
            raise argparse.ArgumentTypeError(problem + (f"; {hint}" if hint else ""))
        return text

    return parse


testbed_model_dir = model_directory("train one with `vlmprune testbed train`")


def shape_ref(text: str) -> str:
    """A named model shape (`vlmprune.cost.SHAPES`), a local config file or model directory, or a Hub id."""
    from vlmprune.cost import SHAPES

    if text in SHAPES or os.path.exists(text) or "/" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a known shape ({', '.join(SHAPES)}) nor a config file or Hub id"
    )


def data_source(text: str) -> str:
    """`ROOT` (a directory holding each task's data) or `TASK=PATH`; the path must exist. Returns `text`."""
    task, sep, path = text.partition("=")
    if sep:
        _task(task)
        if not path:
            raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {text!r}")
    else:
        path = text
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"data path {path} does not exist")
    return text


def device(text: str) -> str:
    """A torch device this machine has (`cpu`, `cuda`, `cuda:1`, `mps`): checked with a 0-element tensor."""
    import torch

    try:
        torch.empty(0, device=torch.device(text))
    except (RuntimeError, AssertionError, ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"device {text!r} is not usable here: {one_line(error)}") from None
    return text


def box(text: str) -> tuple[float, float, float, float]:
    """`x1,y1,x2,y2`, normalised to the image (0..1), with x1 <= x2 and y1 <= y2."""
    from vlmprune.viz.frame import validate_box

    try:
        return validate_box([float(v) for v in text.split(",")])
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected x1,y1,x2,y2 normalised to 0..1 (e.g. 0.1,0.2,0.5,0.9), got {text!r}: {error}"
        ) from None
