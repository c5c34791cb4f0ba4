"""Small host values moved to the device without making the host wait for it."""

from __future__ import annotations

import torch

__all__ = ["on_device"]


def on_device(values: list[int] | list[float] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`values` (a host list or a CPU tensor) as a tensor on `device`, the copy queued rather than waited for.

    `torch.tensor(values, device="cuda")` copies from pageable memory and then waits for the stream to drain:
    a host synchronisation in the middle of a forward pass. Pinned memory and a non-blocking copy avoid it (the
    caching host allocator keeps the pinned block alive until the copy has run).
    """
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
