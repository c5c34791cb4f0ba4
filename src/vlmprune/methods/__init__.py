"""Methods: named schedules of pruning stages, and the registry that builds them by name."""

from __future__ import annotations

import dataclasses
import types
import typing

from vlmprune.errors import BudgetError, LayerError, ParameterError, UnknownMethodError, VlmpruneError
from vlmprune.methods.base import Method
from vlmprune.methods.btp import BalancedTokenPruning
from vlmprune.methods.cdpruner import CDPruner
from vlmprune.methods.dart import DART
from vlmprune.methods.divprune import DivPrune
from vlmprune.methods.fastervlm import FasterVLM
from vlmprune.methods.fastv import FastV
from vlmprune.methods.feather import Feather
from vlmprune.methods.knn_prune import KnnPrune
from vlmprune.methods.pooling import Pooling
from vlmprune.methods.pyramid_drop import PyramidDrop
from vlmprune.methods.random_prune import RandomPrune
from vlmprune.methods.sparsevlm import SparseVLM
from vlmprune.methods.uniform_prune import UniformPrune
from vlmprune.methods.visionzip import VisionZip
from vlmprune.methods.vispruner import VisPruner

__all__ = [
    "DART",
    "METHODS",
    "BalancedTokenPruning",
    "CDPruner",
    "DivPrune",
    "FastV",
    "FasterVLM",
    "Feather",
    "KnnPrune",
    "Method",
    "Pooling",
    "PyramidDrop",
    "RandomPrune",
    "SparseVLM",
    "UniformPrune",
    "VisPruner",
    "VisionZip",
    "build_method",
    "list_methods",
    "method_parameters",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        FastV,
        PyramidDrop,
        Feather,
        RandomPrune,
        UniformPrune,
        KnnPrune,
        BalancedTokenPruning,
        VisPruner,
        FasterVLM,
        DivPrune,
        DART,
        CDPruner,
        VisionZip,
        Pooling,
        SparseVLM,
    )
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
    try:
        return cls(**{key: _coerce(key, value, hints.get(key)) for key, value in params.items()})
    except (ParameterError, BudgetError, LayerError) as error:
        raise type(error)(f"method {cls.name!r}: {error}") from None
    except VlmpruneError:
        raise
    except (ValueError, TypeError) as error:  # a method's own validation in __post_init__
        raise ParameterError(f"method {cls.name!r}: {error}") from None


def _method_class(name: str) -> type[Method]:
    key = name.lower().replace("_", "-")
    aliases = {"pyramiddrop": "pdrop", "pyramid-drop": "pdrop"}
    key = aliases.get(key, key)
    if key not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[key]


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(key: str, value: object, hint: object) -> object:
    """`value` as the field `key` of type `hint` takes it, or `ParameterError` naming the field and the value.

    Parameters come from Python, JSON or the command line, where `rope=false` arrives as the string "false":
    booleans accept true/false, yes/no, on/off and 1/0; numbers accept numeric strings; literals must be one of
    their values; lists become tuples for tuple fields (each element checked); `None` where the field allows it.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) > 1:  # `int | tuple[int, ...]`: a list or tuple takes the tuple form, anything else the other
            sequence = isinstance(value, list | tuple)
            others = [a for a in others if (typing.get_origin(a) is tuple) == sequence] or others
        return _coerce(key, value, others[0]) if len(others) == 1 else value
    if hint is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ParameterError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        number = _number(value)
        if number is not None and (hint is float or float(number).is_integer()):
            return hint(number)
        raise ParameterError(f"{key} must be {'an integer' if hint is int else 'a number'}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ParameterError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParameterError(f"{key} must be a list such as [8, 16], got {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ParameterError(f"{key} must have {len(args)} elements, got {value!r}")
        hints = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args) or [None] * len(value)
        return tuple(_coerce(key, v, h) for v, h in zip(value, hints, strict=True))
    return value


def _number(value: object) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
