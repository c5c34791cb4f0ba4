"""Model adapters: one small class per model family, and the lookup that picks one for a model."""

from __future__ import annotations

from torch import nn

from vlmprune.adapters.base import ModelAdapter
from vlmprune.adapters.llava import LlavaAdapter
from vlmprune.adapters.llava_next import LlavaNextAdapter
from vlmprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vlmprune.adapters.qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter
from vlmprune.errors import UnsupportedModelError

__all__ = [
    "ADAPTERS",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "get_adapter",
]

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`'s family; raises `UnsupportedModelError` naming the supported classes."""
    for adapter in ADAPTERS:
        if adapter.accepts(model):
            return adapter(model)
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    raise UnsupportedModelError(
        f"vlmprune has no adapter for {type(model).__name__}; supported model classes: {supported}"
    )
