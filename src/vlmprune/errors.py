"""Errors raised by vlmprune. Each names the bad value and what would be valid."""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "CalibrationError",
    "ConversionError",
    "LayerError",
    "MissingExtraError",
    "NoImageTokensError",
    "ParameterError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "VlmpruneError",
]


class VlmpruneError(ValueError):
    """Base class of every error vlmprune raises on bad input."""


class UnknownMethodError(VlmpruneError):
    """A method name or a method parameter that does not exist."""


class ParameterError(VlmpruneError):
    """A method parameter given a value it cannot take (wrong type, out of range, not one of its choices)."""


class UnsupportedModelError(VlmpruneError):
    """A model family that has no adapter yet."""


class LayerError(VlmpruneError):
    """A pruning or scoring layer outside the language model's depth."""


class BudgetError(VlmpruneError):
    """A token budget that cannot be met (larger than the tokens there are, or negative)."""


class CalibrationError(VlmpruneError):
    """A calibration file that is missing, unreadable, or made for another model."""


class ConversionError(VlmpruneError):
    """A checkpoint to convert that is missing, unreadable, or does not have the layout its config names."""


class NoImageTokensError(VlmpruneError):
    """A prompt with no image tokens, so there is nothing to prune."""


class MissingExtraError(VlmpruneError):
    """An optional dependency (matplotlib, accelerate, pyarrow, lmms-eval) that a command needs is missing or broken."""
