"""Boxes: parsing model answers, mapping between the image and the model's square frame, and scoring.

Boxes are (x1, y1, x2, y2). "Normalized" means divided by the width and height of the frame they live in.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Literal

__all__ = [
    "Box",
    "Frame",
    "center_inside",
    "from_frame",
    "iou",
    "parse_normalized_box",
    "parse_pixel_box",
    "parse_thousandths_box",
    "to_frame",
]

Box = tuple[float, float, float, float]
Frame = Literal["pad", "crop", "stretch"]

# One number, unambiguous (a digit run cannot be split two ways), so scanning for numbers is linear in the text.
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _first_box(text: str) -> Box | None:
    """The first four numbers in brackets or parentheses, `[a, b, c, d]`; else the first four in a row.

    Numbers are found in one linear scan and their separators checked as plain strings, never by a backtracking
    pattern, so a degenerate answer (a thousand digits, thousands of brackets) costs time linear in its length.
    """
    numbers = list(_NUMBER.finditer(text))
    quads = [numbers[i : i + 4] for i in range(len(numbers) - 3)]
    bracketed = (
        quad
        for quad in quads
        if _next_visible(text, quad[0].start() - 1, -1) in ("[", "(")
        and _next_visible(text, quad[3].end(), 1) in ("]", ")")
        and all(_separator(text, a, b) == "," for a, b in itertools.pairwise(quad))
    )
    loose = (quad for quad in quads if all(_separator(text, a, b) in (",", " ") for a, b in itertools.pairwise(quad)))
    quad = next(bracketed, None) or next(loose, None)
    if quad is None:
        return None
    try:
        x1, y1, x2, y2 = (float(m.group()) for m in quad)
    except ValueError:
        return None
    return x1, y1, x2, y2


def _next_visible(text: str, position: int, step: int) -> str:
    """The first non-whitespace character from `position` on, walking by `step` (+1 or -1); '' if none."""
    while 0 <= position < len(text) and text[position].isspace():
        position += step
    return text[position] if 0 <= position < len(text) else ""


def _separator(text: str, before: re.Match, after: re.Match) -> str | None:
    """',' for whitespace around one comma, ' ' for whitespace only, None for anything else between two numbers."""
    between = text[before.end() : after.start()]
    stripped = between.strip()
    if stripped == ",":
        return ","
    if not stripped and between:
        return " "
    return None


def parse_normalized_box(text: str) -> Box | None:
    """The first box of four numbers in [0, 1] in `text` (LLaVA-1.5, Prismatic/FEATHER), or None.

    Accepts extra words around it, brackets or parentheses, and several boxes (the first counts, as in
    lmms-eval and the FEATHER scorer). Coordinates outside [0, 1], or a box with x2 < x1 or y2 < y1, do not
    parse: such an answer counts as wrong.
    """
    box = _first_box(text)
    if box is None or not all(0.0 <= v <= 1.0 for v in box) or box[2] < box[0] or box[3] < box[1]:
        return None
    return box


def parse_pixel_box(text: str) -> Box | None:
    """The first box in absolute pixels (Qwen2/2.5-VL's `bbox_2d` in its resized frame), or None."""
    box = _first_box(text)
    if box is None or any(v < 0 for v in box) or box[2] < box[0] or box[3] < box[1]:
        return None
    return box


def parse_thousandths_box(text: str) -> Box | None:
    """The first box in Qwen3-VL's relative coordinates (0 to 1000 of the image's width and height), normalized to
    [0, 1], or None. Coordinates outside [0, 1000] or a reversed box do not parse."""
    box = _first_box(text)
    if box is None or not all(0.0 <= v <= 1000.0 for v in box) or box[2] < box[0] or box[3] < box[1]:
        return None
    return box[0] / 1000, box[1] / 1000, box[2] / 1000, box[3] / 1000


def _square(width: float, height: float, frame: Frame) -> tuple[float, float, float]:
    """(side, x offset, y offset) of the image inside the square frame, in original pixels."""
    if frame == "pad":
        side = max(width, height)
        return side, (side - width) / 2, (side - height) / 2
    if frame == "crop":
        side = min(width, height)
        return side, -(width - side) / 2, -(height - side) / 2
    raise ValueError(f"frame must be 'pad', 'crop' or 'stretch', got {frame!r}")


def to_frame(box: Sequence[float], width: float, height: float, frame: Frame) -> Box:
    """A box normalized to the image -> normalized to the model's square input frame."""
    if frame == "stretch":
        return tuple(box)  # type: ignore[return-value]
    side, dx, dy = _square(width, height, frame)
    x1, y1, x2, y2 = box
    return ((x1 * width + dx) / side, (y1 * height + dy) / side, (x2 * width + dx) / side, (y2 * height + dy) / side)


def from_frame(box: Sequence[float], width: float, height: float, frame: Frame) -> Box:
    """A box normalized to the square frame -> normalized to the original image (clipped to it)."""
    if frame == "stretch":
        x1, y1, x2, y2 = box
    else:
        side, dx, dy = _square(width, height, frame)
        x1, y1, x2, y2 = (
            (box[0] * side - dx) / width,
            (box[1] * side - dy) / height,
            (box[2] * side - dx) / width,
            (box[3] * side - dy) / height,
        )
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
    return clip(x1), clip(y1), clip(x2), clip(y2)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes in the same coordinates."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def center_inside(pred: Sequence[float], target: Sequence[float]) -> bool:
    """Whether the predicted box's centre lies in the target box (lmms-eval's Center_ACC)."""
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return target[0] <= cx <= target[2] and target[1] <= cy <= target[3]
