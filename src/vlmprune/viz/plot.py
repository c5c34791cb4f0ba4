"""Pictures of what was kept (matplotlib's Agg canvas, PNG; no pyplot, so no global state).

- `plot_keep_frequency`: per run, a heatmap per stage of how often each grid position was kept, with a
  colour bar and the mean vertical position of the kept tokens (FEATHER's Figure 3b).
- `plot_sample`: per sample, the image in the model's frame with each stage's dropped tokens dimmed,
  grid lines and the target box (FEATHER's Figure 6).

Both return a `matplotlib.figure.Figure` whose axes map grid cells to data coordinates (cell (r, c) spans
x in [c, c + 1], y in [r, r + 1], row 0 at the top); `save_png` writes it at the figure's own dpi, so a
cell's pixel in the PNG is ``ax.transData.transform((c + 0.5, r + 0.5))`` with y counted from the bottom.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vlmprune.extras import import_extra
from vlmprune.viz.analysis import box_token_share, keep_mask
from vlmprune.viz.frame import LLAVA_MEAN_RGB, box_in_frame, frame_image
from vlmprune.viz.records import fed_of, has_stages, stage_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_keep_frequency", "plot_sample", "plot_training_curve", "save_png"]

TARGET_COLOUR = "#39ff14"
PREDICTION_COLOUR = "#ff40ff"
DIM_ALPHA = 0.72  # opacity of the black veil over dropped tokens
MAX_IMAGE_SIDE = 512  # the framed image is downscaled to this many pixels at most, to keep PNGs small


def _new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    canvas = import_extra("matplotlib.backends.backend_agg", "drawing pictures").FigureCanvasAgg
    figure = import_extra("matplotlib.figure", "drawing pictures").Figure(
        figsize=(width, height), dpi=dpi, layout="constrained"
    )
    canvas(figure)
    return figure


def _draw_grid(ax: Axes, rows: int, cols: int, *, labels: bool, colour: str = "white", alpha: float = 0.3) -> None:
    """Lines on every cell boundary (up to 64 a side), tick labels every few cells if `labels`."""
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    if max(rows, cols) <= 64:
        ax.set_xticks(np.arange(cols + 1), minor=True)
        ax.set_yticks(np.arange(rows + 1), minor=True)
        ax.grid(which="minor", color=colour, alpha=alpha, linewidth=0.5)
    if labels:
        ax.set_xticks(np.arange(0, cols + 1, max(1, round(cols / 6))))
        ax.set_yticks(np.arange(0, rows + 1, max(1, round(rows / 6))))
        ax.tick_params(which="minor", length=0)
    else:
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)


def plot_keep_frequency(
    frequencies: Sequence[np.ndarray],
    layers: Sequence[int],
    *,
    vertical: Sequence[float | None] | None = None,
    samples: Sequence[int] | None = None,
    title: str | None = None,
    headings: Sequence[str] | None = None,
) -> Figure:
    """One heatmap panel per stage, shared colour scale [0, 1] and one colour bar.

    Args:
        frequencies: per stage a (rows, cols) array, the share of samples keeping each position
            (`keep_frequency`).
        layers: per stage, the decoder layer it runs before.
        vertical: per stage, the mean vertical position of the kept tokens (drawn as a dashed line).
        samples: per stage, the number of samples counted.
        title: the figure's title.
        headings: per panel, a heading replacing "stage k: before layer L" (e.g. one method per panel).
    """
    if not frequencies or len(frequencies) != len(layers):
        raise ValueError(f"need one layer per frequency map, got {len(frequencies)} maps and {len(layers)} layers")
    figure = _new_figure(4.2 * len(frequencies) + 1.2, 4.9)
    axes = figure.subplots(1, len(frequencies), squeeze=False)[0]
    image = None
    for k, (ax, freq, layer) in enumerate(zip(axes, frequencies, layers, strict=True)):
        freq = np.asarray(freq, dtype=np.float64)
        rows, cols = freq.shape
        image = ax.imshow(freq, cmap="magma", vmin=0.0, vmax=1.0, extent=(0, cols, rows, 0), interpolation="nearest")
        _draw_grid(ax, rows, cols, labels=True, alpha=0.15)
        ax.set_xlabel("column")
        ax.set_ylabel("row (0 = top)")
        heading = headings[k] if headings is not None else f"stage {k}: before layer {layer}"
        details = [f"{rows} x {cols} grid", f"{freq.sum():.0f} kept on average"]
        if samples is not None:
            details.insert(0, f"{samples[k]} samples")
        lines = [heading, ", ".join(details)]
        v = vertical[k] if vertical is not None else None
        if v is not None and not math.isnan(v):
            ax.axhline(v * rows, color="cyan", linestyle="--", linewidth=1.5)
            ax.text(0.4, v * rows - 0.25, f"mean row position {v:.3f}", color="cyan", fontsize=8, va="bottom")
            lines.append(f"kept tokens' mean vertical position {v:.3f} (0 top, 1 bottom)")
        ax.set_title("\n".join(lines), fontsize=9)
    figure.colorbar(image, ax=list(axes), shrink=0.85, label="share of samples keeping the token")
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def _draw_box(ax: Axes, box: Sequence[float], rows: int, cols: int, colour: str, style: str, label: str) -> None:
    from matplotlib.patches import Rectangle

    u1, v1, u2, v2 = box
    ax.add_patch(
        Rectangle(
            (u1 * cols, v1 * rows),
            (u2 - u1) * cols,
            (v2 - v1) * rows,
            fill=False,
            edgecolor=colour,
            linewidth=2.2,
            linestyle=style,
            label=label,
        )
    )


def _framed_box(box: Sequence[float] | None, image_size, frame: str, aspect: float) -> tuple | None:
    if box is None or image_size is None:
        return None
    try:
        return box_in_frame(box, image_size, frame, aspect)
    except ValueError:  # e.g. a prediction in pixels: not drawable in normalised coordinates
        return None


def plot_sample(record: Mapping, image: Image.Image | None = None, *, fill=LLAVA_MEAN_RGB) -> Figure:
    """The sample's image in the model's frame, then one panel per stage with the dropped tokens dimmed.

    `record` follows `vlmprune.viz.records` (``frame``, ``image_size``, ``target_box`` and ``pred_box``
    normalised to the original image, ``stages``). Without `image` the panels show a grey canvas. The target
    box is drawn solid green, the predicted box dashed magenta.
    """
    if not has_stages(record):
        raise ValueError(f"record {record.get('task')}/{record.get('id')} has no pruning stages to draw")
    stages = [stage_of(record, k) for k in range(len(record["stages"]))]
    frame = record.get("frame") or "stretch"
    rows0, cols0 = stages[0][1]
    aspect = cols0 / rows0
    image_size = record.get("image_size") or (image.size if image is not None else None)
    if image is not None:
        framed = frame_image(image, frame, aspect, fill)
        framed.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    else:
        framed = Image.new("RGB", (max(1, round(256 * aspect)), 256), (128, 128, 128))
    pixels = np.asarray(framed)
    target = _framed_box(record.get("target_box"), image_size, frame, aspect)
    predicted = _framed_box(record.get("pred_box"), image_size, frame, aspect)
    method = record.get("method") or "pruned"

    panel_w, panel_h = 3.6 * min(1.0, aspect), 3.6 / max(1.0, aspect)  # inches; cells stay square
    figure = _new_figure(panel_w * (1 + len(stages)) + 0.4, panel_h + 1.0)
    axes = figure.subplots(1, 1 + len(stages), squeeze=False)[0]

    ax = axes[0]
    ax.imshow(pixels, extent=(0, cols0, rows0, 0), interpolation="bilinear")
    _draw_grid(ax, rows0, cols0, labels=False, alpha=0.0)
    if target is not None:
        _draw_box(ax, target, rows0, cols0, TARGET_COLOUR, "-", "target")
    if predicted is not None:
        _draw_box(ax, predicted, rows0, cols0, PREDICTION_COLOUR, "--", "prediction")
    if target is not None or predicted is not None:
        ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    ax.set_title(f"input ({frame} frame)" + ("" if image is not None else "\nimage unavailable"), fontsize=9)

    for k, (ax, (layer, (rows, cols), kept)) in enumerate(zip(axes[1:], stages, strict=True)):
        ax.imshow(pixels, extent=(0, cols, rows, 0), interpolation="bilinear")
        veil = np.zeros((rows, cols, 4))
        fed = fed_of(record, k)
        fed = fed[fed < rows * cols]
        # dropped tokens dimmed; tokens merged into a kept one (a merging stage) half dimmed
        alpha = np.where(keep_mask(fed, (rows, cols)), DIM_ALPHA / 2, DIM_ALPHA)
        veil[..., 3] = np.where(keep_mask(kept, (rows, cols)), 0.0, alpha)
        ax.imshow(veil, extent=(0, cols, rows, 0), interpolation="nearest")
        _draw_grid(ax, rows, cols, labels=False)
        merged = f" · merged from {fed.size}" if fed.size else ""
        lines = [f"{method} · layer {layer} · kept {kept.size}/{rows * cols}{merged}"]
        if target is not None:
            _draw_box(ax, target, rows, cols, TARGET_COLOUR, "-", "target")
            share = box_token_share(kept, (rows, cols), record["target_box"], image_size, frame)
            if not math.isnan(share):
                lines.append(f"target tokens kept: {share:.0%}")
        ax.set_title("\n".join(lines), fontsize=9)

    heading = " ".join(str(record[key]) for key in ("task", "id") if record.get(key) is not None)
    if record.get("correct") is not None and record.get("prediction") is not None:
        heading += f" · {'correct' if record['correct'] else 'wrong'}"
    if record.get("iou") is not None:
        heading += f" · IoU {float(record['iou']):.2f}"
    said = []
    if record.get("expression"):
        said.append(f"“{_clip(record['expression'])}”")
    if record.get("prediction"):
        said.append(f"answer: {_clip(record['prediction'])}")
    text = "\n".join(line for line in (heading.strip(" ·"), " → ".join(said)) if line)
    if text:
        figure.suptitle(text, fontsize=10)
    return figure


def plot_training_curve(records: Sequence[Mapping], *, easy_images: int | None = None) -> Figure:
    """Held-out accuracies of a testbed run against LM-stage images seen (records of its `log.jsonl`).

    Left: localization Acc@IoU>=0.5 and other-question accuracy; right: each other-question kind. A record
    counts when its `"event"` is `"eval"` in stage `"lm"` (or `"done"`, the final evaluation). `easy_images`
    (the run's config) marks where training moved from 2-3 object scenes to the held-out split's 3-5.
    """
    evals = [r for r in records if r.get("event") == "eval" and r.get("stage") in ("lm", "done")]
    if not evals:
        raise ValueError("no held-out evaluation of the LM stage in the log")
    # the final evaluation is logged after the stage counter resets: place it at the last images count
    last = max(r["images"] for r in evals)
    seen = [r["images"] if r["stage"] == "lm" else last for r in evals]
    figure = _new_figure(11, 4)
    left, right = figure.subplots(1, 2, sharey=True)
    left.plot(seen, [r["localization_acc"] for r in evals], marker="o", ms=3, label="localization Acc@0.5")
    left.plot(seen, [r["other_acc"] for r in evals], marker="o", ms=3, label="other questions")
    kinds = [k for k in evals[-1].get("per_kind", {}) if k != "where"]
    for kind in kinds:
        right.plot(seen, [r["per_kind"].get(kind, float("nan")) for r in evals], marker=".", label=kind)
    for ax, title in ((left, "held-out accuracy"), (right, "other questions by kind")):
        ax.set_xlabel("LM-stage images seen")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        if easy_images:
            ax.axvline(easy_images, color="grey", linestyle=":", label="3-5 objects from here")
        ax.legend(loc="best", fontsize=8)
    return figure


def _clip(text: object, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def save_png(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `figure` as a PNG at its own dpi (no tight cropping, so the size is the figure's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=figure.dpi, facecolor="white")
    return path
