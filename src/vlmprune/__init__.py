"""vlmprune: training-free visual-token pruning for Hugging Face vision-language models.

method = vlmprune.build_method("feather")
with vlmprune.prune(model, method) as trace:
    out = model.generate(**inputs, max_new_tokens=32)
trace.stages  # kept image tokens per stage
"""

from vlmprune.budget import Keep
from vlmprune.engine import prune
from vlmprune.errors import (
    BudgetError,
    CalibrationError,
    LayerError,
    MissingExtraError,
    NoImageTokensError,
    ParameterError,
    UnknownMethodError,
    UnsupportedModelError,
    VlmpruneError,
)
from vlmprune.methods import Method, build_method, list_methods, method_parameters
from vlmprune.stage import Stage
from vlmprune.trace import StageRecord, Trace

__all__ = [
    "BudgetError",
    "CalibrationError",
    "Keep",
    "LayerError",
    "Method",
    "MissingExtraError",
    "NoImageTokensError",
    "ParameterError",
    "Stage",
    "StageRecord",
    "Trace",
    "UnknownMethodError",
    "UnsupportedModelError",
    "VlmpruneError",
    "build_method",
    "list_methods",
    "method_parameters",
    "prune",
]

__version__ = "0.1.0"
