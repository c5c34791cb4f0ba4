"""How an image maps onto the model's input frame, and where a box lands on the token grid.

A model sees its image in a frame whose shape is the token grid's: square for LLaVA-1.5 (24 x 24), the
image's own aspect for Qwen2-VL. Three mappings cover the usual preprocessors:

- ``"pad"``: the image pasted centred on the smallest frame that holds it (for a square grid a
  max(W, H) square), the rest filled with the mean colour. LLaVA-1.5's original `expand2square`;
  `do_pad=True` in transformers' LLaVA image processor.
- ``"crop"``: the largest centred frame inside the image (for a square grid the centre square of side
  min(W, H)). transformers' LLaVA processor default (resize the shortest edge, then centre-crop).
- ``"stretch"``: the whole image resized onto the frame, aspect ignored (e.g. Qwen2-VL, whose grid already
  follows the image's aspect).

Coordinates: boxes are ``[x1, y1, x2, y2]`` normalised to [0, 1]; "original" coordinates are relative to
the image as loaded, "frame" coordinates relative to the model's frame (0 = left or top edge).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["FRAMES", "LLAVA_MEAN_RGB", "box_cells", "box_in_frame", "frame_image", "frame_rect", "validate_box"]

FRAMES: tuple[str, ...] = ("pad", "crop", "stretch")

# LLaVA's expand2square fills with the CLIP image processor's mean, (0.4815, 0.4578, 0.4082) * 255, truncated.
LLAVA_MEAN_RGB: tuple[int, int, int] = (122, 116, 104)


def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")


def _check_size(image_size: Sequence[float]) -> tuple[float, float]:
    if len(image_size) != 2 or not all(math.isfinite(v) and v > 0 for v in image_size):
        raise ValueError(f"image_size must be [width, height] with positive values, got {list(image_size)}")
    return float(image_size[0]), float(image_size[1])


def validate_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """`box` as a checked ``(x1, y1, x2, y2)`` tuple, normalised to [0, 1] with x1 <= x2 and y1 <= y2."""
    if len(box) != 4:
        raise ValueError(f"box must be [x1, y1, x2, y2], got {list(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in (x1, y1, x2, y2)):
        raise ValueError(f"box must be normalised to [0, 1] (divide pixels by the image size), got {list(box)}")
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box must have x1 <= x2 and y1 <= y2, got {list(box)}")
    return x1, y1, x2, y2


def frame_rect(image_size: Sequence[float], frame: str, aspect: float = 1.0) -> tuple[float, float, float, float]:
    """The model's frame in the original image's pixels: ``(left, top, width, height)``.

    `aspect` is the frame's width / height (the grid's cols / rows). For "pad" the rectangle extends past
    the image (negative left or top); for "crop" it lies inside it; for "stretch" it is the image itself.
    """
    _check_frame(frame)
    width, height = _check_size(image_size)
    if not (math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"aspect must be a positive width / height ratio, got {aspect}")
    if frame == "stretch":
        return 0.0, 0.0, width, height
    frame_w = max(width, height * aspect) if frame == "pad" else min(width, height * aspect)
    frame_h = frame_w / aspect
    return (width - frame_w) / 2, (height - frame_h) / 2, frame_w, frame_h


def box_in_frame(
    box: Sequence[float], image_size: Sequence[float], frame: str, aspect: float = 1.0
) -> tuple[float, float, float, float]:
    """A box normalised to the original image -> the same box normalised to the model's frame.

    The result may leave [0, 1] under "crop" (the part of the object that was cut off).
    """
    x1, y1, x2, y2 = validate_box(box)
    width, height = _check_size(image_size)
    left, top, frame_w, frame_h = frame_rect(image_size, frame, aspect)
    return (
        (x1 * width - left) / frame_w,
        (y1 * height - top) / frame_h,
        (x2 * width - left) / frame_w,
        (y2 * height - top) / frame_h,
    )


def box_cells(box: Sequence[float], image_size: Sequence[float], frame: str, grid: Sequence[int]) -> np.ndarray:
    """The grid cells a target box covers: a (rows, cols) bool array.

    A cell counts if its centre lies inside the box mapped into the frame (edges included). A box too
    small to contain any centre counts the one cell holding its own centre, so that every visible object
    has at least one token; a box wholly outside the frame (cut off by "crop") covers none.
    """
    rows, cols = int(grid[0]), int(grid[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) with positive sizes, got {list(grid)}")
    u1, v1, u2, v2 = box_in_frame(box, image_size, frame, aspect=cols / rows)
    col_centres = (np.arange(cols) + 0.5) / cols  # (cols,)
    row_centres = (np.arange(rows) + 0.5) / rows  # (rows,)
    inside_cols = (col_centres >= u1) & (col_centres <= u2)
    inside_rows = (row_centres >= v1) & (row_centres <= v2)
    cells = inside_rows[:, None] & inside_cols[None, :]  # (rows, cols)
    if not cells.any():
        cu, cv = (u1 + u2) / 2, (v1 + v2) / 2
        if 0 <= cu < 1 and 0 <= cv < 1:
            cells[int(cv * rows), int(cu * cols)] = True
    return cells


def frame_image(
    image: Image.Image, frame: str, aspect: float = 1.0, fill: tuple[int, int, int] = LLAVA_MEAN_RGB
) -> Image.Image:
    """The RGB image as the model's frame shows it (pad with `fill`, centre-crop, or stretch).

    The result has the frame's aspect (`aspect` = width / height) at roughly the image's resolution.
    """
    image = image.convert("RGB")
    left, top, frame_w, frame_h = frame_rect(image.size, frame, aspect)
    if frame == "stretch":
        out_w = max(image.width, round(image.height * aspect))
        return image.resize((out_w, max(1, round(out_w / aspect))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (max(1, round(frame_w)), max(1, round(frame_h))), fill)
    canvas.paste(image, (round(-left), round(-top)))  # a negative offset crops
    return canvas
