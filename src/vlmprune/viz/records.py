"""Per-sample records: the eval runner's ``samples.jsonl``, and a saved trace turned into the same shape.

A record is one JSON object per sample::

    {"task": "refcoco", "id": "123", "method": "feather", "image": "/abs/path.jpg", "image_size": [W, H],
     "frame": "pad" | "crop" | "stretch", "target_box": [x1, y1, x2, y2] | null,   # normalised, original image
     "prediction": "...", "pred_box": [...] | null, "correct": bool, "iou": float | null,
     "stages": [{"layer": 8, "grid": [24, 24], "kept": [3, 17, ...]}, ...],        # one image per sample
     "error": null | "message"}

`kept` holds sorted indices into the sample's image tokens in raster order of the original grid. A merging
stage adds `merged`: per kept token (in `kept` order), the indices of the tokens whose states it averages. Records
with an error or without stages (unpruned runs) carry nothing to analyse; `has_stages` tells them apart.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["RECORD_FILE", "fed_of", "has_stages", "read_records", "record_from_trace", "stage_of"]

RECORD_FILE = "samples.jsonl"


def read_records(path: str | os.PathLike[str]) -> list[dict]:
    """Every record of a JSONL file, in file order; blank lines are skipped.

    A last line that is not valid JSON (a run killed mid-write) is skipped with a warning; a bad line
    anywhere else raises `ValueError` naming the line.
    """
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if i == last:
                warnings.warn(f"{path}:{i + 1}: skipping an incomplete last line ({error})", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


def has_stages(record: Mapping) -> bool:
    """Whether a record carries pruning stages to analyse (no error, a non-empty `stages` list)."""
    return not record.get("error") and bool(record.get("stages"))


def stage_of(record: Mapping, stage: int) -> tuple[int, tuple[int, int], np.ndarray]:
    """Stage `stage` of a record, checked: ``(layer, (rows, cols), kept)``, `kept` a 1-D int64 array.

    Raises `ValueError` (naming the record) for a malformed grid or an index outside the grid.
    """
    entry = record["stages"][stage]
    name = f"record {record.get('task')}/{record.get('id')} stage {stage}"
    grid = entry.get("grid")
    if not (isinstance(grid, Sequence) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise ValueError(f"{name}: grid must be [rows, cols] of positive integers, got {grid!r}")
    rows, cols = grid
    kept = np.asarray(entry.get("kept", []), dtype=np.int64).reshape(-1)
    bad = kept[(kept < 0) | (kept >= rows * cols)]
    if bad.size:
        raise ValueError(f"{name}: kept index {int(bad[0])} outside the {rows} x {cols} grid (0..{rows * cols - 1})")
    return int(entry.get("layer", -1)), (rows, cols), kept


def fed_of(record: Mapping, stage: int) -> np.ndarray:
    """Sorted indices of the tokens that fed a merged kept token at stage `stage` (empty for a subset stage)."""
    merged = record["stages"][stage].get("merged") or []
    return np.unique(np.asarray([i for ids in merged for i in ids], dtype=np.int64))


def record_from_trace(
    trace: Mapping,
    *,
    image: str | None = None,
    image_size: Sequence[int] | None = None,
    target_box: Sequence[float] | None = None,
    frame: str = "crop",
    sample: int = 0,
    method: str | None = None,
) -> dict:
    """One sample of a `Trace.to_dict()` (as `vlmprune generate --save-trace` writes it) as a record.

    Only the sample's first image is kept: its grid comes from `image_grids`, and indices past its tokens
    (later images) are dropped.
    """
    stages = trace.get("stages") or []
    records_stages = []
    for k, entry in enumerate(stages):
        kept_all = entry.get("kept") or []
        if not 0 <= sample < len(kept_all):
            raise ValueError(f"trace stage {k} has {len(kept_all)} sample(s); sample {sample} does not exist")
        grids = entry.get("image_grids") or []
        grid = grids[sample][0] if sample < len(grids) and grids[sample] else entry["grid"]
        rows, cols = int(grid[0]), int(grid[1])
        kept = [int(i) for i in kept_all[sample] if int(i) < rows * cols]
        record_stage = {"layer": int(entry["layer"]), "grid": [rows, cols], "kept": kept}
        if entry.get("sources"):  # a merging stage: which tokens fed each kept one (of the first image)
            pairs = zip(entry["sources"][sample], kept_all[sample], strict=True)
            fed = [source["ids"] for source, i in pairs if i < rows * cols]
            record_stage["merged"] = [[int(j) for j in ids if int(j) < rows * cols] for ids in fed]
        records_stages.append(record_stage)
    return {
        "task": None,
        "id": None,
        "method": method,
        "image": image,
        "image_size": list(image_size) if image_size is not None else None,
        "frame": frame,
        "target_box": list(target_box) if target_box is not None else None,
        "prediction": None,
        "pred_box": None,
        "correct": None,
        "iou": None,
        "stages": records_stages,
        "error": None,
    }
