"""Methods: named schedules of pruning stages, and the registry that builds them by name."""

from __future__ import annotations

import dataclasses
import typing

from vlmprune.errors import UnknownMethodError
from vlmprune.methods.base import Method
from vlmprune.methods.fastv import FastV
from vlmprune.methods.feather import Feather
from vlmprune.methods.knn_prune import KnnPrune
from vlmprune.methods.pyramid_drop import PyramidDrop
from vlmprune.methods.random_prune import RandomPrune
from vlmprune.methods.uniform_prune import UniformPrune

__all__ = [
    "METHODS",
    "FastV",
    "Feather",
    "KnnPrune",
    "Method",
    "PyramidDrop",
    "RandomPrune",
    "UniformPrune",
    "build_method",
    "list_methods",
    "method_parameters",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FastV, PyramidDrop, Feather, RandomPrune, UniformPrune, KnnPrune)
}


def list_methods() -> list[str]:
    """Names accepted by `build_method`, in registry order."""
    return list(METHODS)


def method_parameters(name: str) -> dict[str, object]:
    """The parameters of method `name` and their defaults."""
    cls = _method_class(name)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def build_method(name: str, **params: object) -> Method:
    """The method registered as `name`, with the paper's defaults overridden by `params`.

    Raises:
        UnknownMethodError: if `name` or a parameter does not exist; the message lists what is valid.
    """
    cls = _method_class(name)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise UnknownMethodError(
            f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(valid))}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(value, hints.get(key)) for key, value in params.items()})


def _method_class(name: str) -> type[Method]:
    key = name.lower().replace("_", "-")
    aliases = {"pyramiddrop": "pdrop", "pyramid-drop": "pdrop"}
    key = aliases.get(key, key)
    if key not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[key]


def _coerce(value: object, hint: object) -> object:
    """Lists given for tuple-typed fields become tuples, so parameters from JSON or a CLI work as written."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    wants_tuple = origin is tuple or any(typing.get_origin(a) is tuple for a in args)
    if wants_tuple and isinstance(value, list):
        return tuple(value)
    return value
