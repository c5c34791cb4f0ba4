"""What the engine needs from transformers, found by what it is rather than by the name it is passed under.

transformers renames arguments between minor releases (5.24 renamed the decoder's `past_key_values` to `cache`),
so the engine finds the KV cache by its type, and checks at install time that the decoder layers still take the
arguments it writes, so that a rename fails loudly at `prune()` instead of silently changing results.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Cache

from vlmprune.errors import UnsupportedModelError

__all__ = [
    "LAYER_ARGUMENTS",
    "MULTIMODAL_ARGUMENTS",
    "TEXT_MODEL_ARGUMENTS",
    "check_accepts",
    "find_cache",
    "guard_hooks_under_compile",
    "static_capacity",
    "transformers_version",
]

# The keyword arguments the engine reads from the multimodal model's and the decoder stack's forward, and writes
# into each decoder layer's.
MULTIMODAL_ARGUMENTS = ("input_ids",)
TEXT_MODEL_ARGUMENTS = ("inputs_embeds", "attention_mask", "position_ids")
LAYER_ARGUMENTS = ("attention_mask", "position_ids", "position_embeddings")


def transformers_version() -> str:
    return transformers.__version__


def find_cache(*containers: Iterable[Any] | Mapping[str, Any] | None) -> Cache | None:
    """The first `transformers.Cache` among the values of `containers` (argument tuples, kwargs, model outputs)."""
    for container in containers:
        if container is None:
            continue
        values = container.values() if isinstance(container, Mapping) else container
        for value in values:
            if isinstance(value, Cache):
                return value
    return None


def guard_hooks_under_compile() -> None:
    """Makes torch.compile see the pruning hooks: compiled code is checked against the hooks it was traced with.

    By default Dynamo does not guard on module hooks (`skip_nnmodule_hook_guards`), so a forward compiled before
    `prune()` would run unpruned inside it, and one compiled inside would keep pruning after it. The first call
    turns those guards on for the process and drops code compiled without them (`torch._dynamo.reset()`); later
    sessions find it on and cost nothing.
    """
    config = torch._dynamo.config
    if config.skip_nnmodule_hook_guards:
        config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()


def static_capacity(cache: Cache | None) -> int | None:
    """Keys per layer a static (compilable) cache holds, unused slots included; None for a cache that grows.

    A static cache's layers each keep their own length (transformers >= 5.0), so pruned layers hold fewer tokens.
    """
    if cache is None or not cache.is_compileable:
        return None
    capacity, _ = cache.layers[0].get_mask_sizes(1)
    return int(capacity)


def check_accepts(module: nn.Module, names: Iterable[str], role: str) -> None:
    """Raises `UnsupportedModelError` unless `module.forward` takes each of `names` by keyword.

    A forward that only has `**kwargs` for a name would swallow what the engine passes, so it counts as missing.
    """
    parameters = inspect.signature(module.forward).parameters
    missing = [name for name in names if name not in parameters]
    if missing:
        raise UnsupportedModelError(
            f"{type(module).__name__} ({role}) takes no {', '.join(missing)} argument in transformers "
            f"{transformers_version()}; this vlmprune supports the transformers versions its package declares "
            "(run `vlmprune env` and report the output)"
        )
