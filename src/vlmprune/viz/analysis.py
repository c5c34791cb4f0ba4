"""What a method kept, measured from per-sample records (numpy only, no plotting).

- `keep_frequency`: how often each grid position survives a stage (FEATHER's Figure 3b).
- `mean_vertical_position`: where the kept tokens sit, 0 = top, 1 = bottom. FEATHER (Endo et al., 2024)
  reports 0.807 for FastV at layer 3: attention-based criteria favour the image's bottom rows because RoPE
  decays attention with distance and the bottom rows are nearest the text.
- `box_token_share`: the share of the target object's tokens that were kept, a diagnostic of whether a
  method keeps the object it was asked about, which works before the model answers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from vlmprune.viz.frame import box_cells
from vlmprune.viz.records import has_stages, stage_of

__all__ = ["box_token_share", "keep_frequency", "keep_mask", "mean_vertical_position", "summarize"]


def keep_mask(kept: Sequence[int] | np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Kept indices (raster order) -> a (rows, cols) bool array, True where the token was kept."""
    rows, cols = int(grid[0]), int(grid[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) with positive sizes, got {list(grid)}")
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    bad = kept[(kept < 0) | (kept >= rows * cols)]
    if bad.size:
        raise ValueError(f"kept index {int(bad[0])} outside the {rows} x {cols} grid (0..{rows * cols - 1})")
    mask = np.zeros(rows * cols, dtype=bool)
    mask[kept] = True
    return mask.reshape(rows, cols)


def _resample(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(r, c) array -> (rows, cols) by nearest neighbour in normalised coordinates (identity if same grid)."""
    if mask.shape == grid:
        return mask
    rows_src = ((np.arange(grid[0]) + 0.5) / grid[0] * mask.shape[0]).astype(np.int64)
    cols_src = ((np.arange(grid[1]) + 0.5) / grid[1] * mask.shape[1]).astype(np.int64)
    return mask[rows_src][:, cols_src]


def _most_common(values: Iterable):
    return Counter(values).most_common(1)[0][0]


def keep_frequency(records: Iterable[Mapping], stage: int, grid: Sequence[int] | None = None) -> np.ndarray:
    """The share of samples keeping each grid position at stage `stage`: a (rows, cols) float64 array.

    Records without that stage (errors, unpruned runs, methods with fewer stages) are skipped. `grid`
    defaults to the most common grid at that stage; samples with another grid (dynamic resolution, e.g.
    Qwen2-VL) are resampled onto it by nearest neighbour in normalised image coordinates.
    """
    masks = []
    for record in records:
        if has_stages(record) and len(record["stages"]) > stage:
            _, sample_grid, kept = stage_of(record, stage)
            masks.append(keep_mask(kept, sample_grid))
    if not masks:
        raise ValueError(f"no record has a stage {stage} to count")
    target = tuple(int(v) for v in grid) if grid is not None else _most_common(m.shape for m in masks)
    return np.mean([_resample(m, target) for m in masks], axis=0, dtype=np.float64)


def mean_vertical_position(kept: Sequence[int] | np.ndarray, grid: Sequence[int]) -> float:
    """Mean of (row + 0.5) / rows over the kept tokens: 0 = top edge, 1 = bottom edge, 0.5 = centred.

    NaN if nothing was kept.
    """
    mask = keep_mask(kept, grid)  # (rows, cols)
    if not mask.any():
        return math.nan
    row_of = np.nonzero(mask)[0]  # (n_kept,)
    return float(np.mean((row_of + 0.5) / mask.shape[0]))


def box_token_share(
    kept: Sequence[int] | np.ndarray,
    grid: Sequence[int],
    box: Sequence[float],
    image_size: Sequence[float],
    frame: str,
) -> float:
    """The share of the target box's grid cells that were kept, in [0, 1].

    `box` is ``[x1, y1, x2, y2]`` normalised to the original image of size `image_size` = (W, H); it is
    mapped into the model's frame (`frame`: "pad", "crop" or "stretch", see `vlmprune.viz.frame`) and a
    cell counts if its centre lies inside (see `box_cells`). NaN if the box covers no cell (cropped away).
    """
    cells = box_cells(box, image_size, frame, grid)  # (rows, cols)
    total = int(cells.sum())
    if total == 0:
        return math.nan
    return float((keep_mask(kept, grid) & cells).sum() / total)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _is_localization(record: Mapping) -> bool:
    return record.get("target_box") is not None and bool(record.get("image_size")) and bool(record.get("frame"))


def summarize(records: Iterable[Mapping]) -> dict:
    """Per-stage statistics of a run, JSON-ready (undefined means are None).

    Returns ``{"records", "with_stages", "errors", "unpruned", "methods", "tasks", "stages": [...]}`` where
    each stage has: ``stage`` (index), ``layer`` and ``grid`` (most common), ``samples``, ``mean_kept``
    (tokens), ``mean_kept_fraction`` (of the grid), ``mean_vertical_position`` (mean over samples of each
    sample's mean), ``box_samples`` (localization records with a defined share), ``mean_box_token_share``
    and the same over correct and wrong answers (``..._correct``, ``..._wrong``), and ``keep_frequency``
    ((rows, cols) nested lists).
    """
    records = list(records)
    usable = [r for r in records if has_stages(r)]
    n_stages = max((len(r["stages"]) for r in usable), default=0)
    stages = []
    for k in range(n_stages):
        layers, grids, kept_counts, fractions, vertical = [], [], [], [], []
        shares: dict[str, list[float]] = {"all": [], "correct": [], "wrong": []}
        for record in usable:
            if len(record["stages"]) <= k:
                continue
            layer, grid, kept = stage_of(record, k)
            layers.append(layer)
            grids.append(grid)
            kept_counts.append(kept.size)
            fractions.append(kept.size / (grid[0] * grid[1]))
            vertical.append(mean_vertical_position(kept, grid))
            if _is_localization(record):
                share = box_token_share(kept, grid, record["target_box"], record["image_size"], record["frame"])
                if not math.isnan(share):
                    shares["all"].append(share)
                    if record.get("correct") is not None:
                        shares["correct" if record["correct"] else "wrong"].append(share)
        grid = _most_common(grids)
        stages.append(
            {
                "stage": k,
                "layer": _most_common(layers),
                "grid": list(grid),
                "samples": len(kept_counts),
                "mean_kept": float(np.mean(kept_counts)),
                "mean_kept_fraction": float(np.mean(fractions)),
                "mean_vertical_position": _mean(vertical),
                "box_samples": len(shares["all"]),
                "mean_box_token_share": _mean(shares["all"]),
                "mean_box_token_share_correct": _mean(shares["correct"]),
                "mean_box_token_share_wrong": _mean(shares["wrong"]),
                "keep_frequency": keep_frequency(usable, k, grid).tolist(),
            }
        )
    return {
        "records": len(records),
        "with_stages": len(usable),
        "errors": sum(1 for r in records if r.get("error")),
        "unpruned": sum(1 for r in records if not r.get("error") and not r.get("stages")),
        "methods": sorted({str(r["method"]) for r in usable if r.get("method") is not None}),
        "tasks": sorted({str(r["task"]) for r in usable if r.get("task") is not None}),
        "stages": stages,
    }
