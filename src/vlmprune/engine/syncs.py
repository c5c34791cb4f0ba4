"""Counting the calls that make the host wait for the device, so that hot paths can be kept free of them.

On a GPU each such call stalls the CPU until every queued kernel has run, which serialises the launch-bound
forward of a small batch. On the CPU they cost nothing, but they can still be counted: `HostSyncCounter` sees
every torch call made inside it (a `TorchFunctionMode`) and counts those that would wait on an accelerator.
It cannot see one kind: a blocking host-to-device copy (`torch.tensor(values, device="cuda")`), which waits for
the stream on a GPU and not on the CPU; the engine makes those with `vlmprune.tensors.on_device` instead.
"""

from __future__ import annotations

import collections
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SYNCING_CALLS", "HostSyncCounter"]

# Tensor methods and torch functions that copy a value to the host or size their output by the data.
SYNCING_CALLS = frozenset(
    {
        "item",
        "tolist",
        "cpu",
        "numpy",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
        "argwhere",
        "unique",
        "unique_consecutive",
        "masked_select",
    }
)


class HostSyncCounter(TorchFunctionMode):
    """Counts host-synchronising torch calls made inside `with HostSyncCounter() as counter:`.

    Besides `SYNCING_CALLS`, it counts indexing with a boolean tensor (its result's size is data-dependent) and
    `repeat_interleave` with tensor repeats. `counts` maps each call's name to how often it ran; `places`
    maps `file:line name` of the innermost vlmprune frame (or `(outside vlmprune) name`) to its count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.places: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = _syncing_name(func, args)
        if name is not None:
            self.counts[name] += 1
            frames = [f for f in traceback.extract_stack()[:-1] if "vlmprune" in f.filename and __file__ != f.filename]
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "(outside vlmprune)"
            self.places[f"{where} {name}"] += 1
        return func(*args, **(kwargs or {}))


def _syncing_name(func: Any, args: tuple) -> str | None:
    name = getattr(func, "__name__", "")
    if name in SYNCING_CALLS:
        return name
    if name in ("__getitem__", "__setitem__") and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return f"boolean {name}"
    if name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return "repeat_interleave"
    return None
