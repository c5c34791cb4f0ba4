"""The engine: installs a method on a model for the length of a `with` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.criteria.scope import BudgetScope
from vlmprune.engine.session import PruningSession
from vlmprune.methods.base import Method
from vlmprune.trace import Trace

__all__ = ["PruningSession", "prune"]


@contextmanager
def prune(model: nn.Module, method: Method, budget_scope: BudgetScope = "global") -> Iterator[Trace]:
    """Prunes image tokens with `method` in every forward pass of `model` inside the block.

    Yields the `Trace` of the last prefill. Every hook is removed on exit, also when the block raises, so the
    model is exactly as before outside the block. Each stage is timed on the device's own clock (CUDA events),
    so nothing waits for the GPU; `StageRecord.seconds` reads the time when asked.

    `budget_scope="global"` (the default) spends each stage's budget over a sample's image tokens as a whole;
    `"per_image"` splits it over the sample's grids (images, LLaVA-NeXT's base image and crops, video frames) in
    proportion to their tokens and selects within each (`vlmprune.criteria.scope`); the trace's `method` says which.

    Raises:
        UnsupportedModelError: `model`'s family has no adapter (the message lists the supported ones).
        LayerError: a stage's layer is beyond the language model's depth.
        VlmpruneError: `prune` is already active on `model` (blocks on one model do not nest).
    """
    session = PruningSession(model, method, get_adapter(model), budget_scope)
    session.install()
    try:
        yield session.trace
    finally:
        session.remove()
