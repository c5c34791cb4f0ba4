"""The evaluation runner: batched, resumable, data-parallel grounding evaluation with a pruning method.

Each finished sample is appended to a JSONL file, flushed and synced, so a killed run resumes where it
stopped and loses nothing; bad data (a missing or corrupt image, an annotation without a box) becomes a
record with an `error` and is counted, never a crash. With several processes (`accelerate launch`) each takes
every N-th sample, writes its own file, and the first process merges them once all are done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmprune.engine import prune
from vlmprune.eval.boxes import center_inside, from_frame, iou
from vlmprune.eval.data import RefSample
from vlmprune.eval.prompts import GroundingFormat, grounding_format_for
from vlmprune.methods.base import Method

__all__ = ["EvalConfig", "load_records", "run_grounding", "summarize"]

THRESHOLDS = (0.25, 0.3, 0.5, 0.7)


@dataclass
class EvalConfig:
    out_dir: Path
    batch_size: int = 8
    max_new_tokens: int = 32
    rank: int = 0
    world_size: int = 1
    method_name: str = "none"


def _jsonl_name(rank: int, world_size: int) -> str:
    return "samples.jsonl" if world_size == 1 else f"samples.rank{rank}.jsonl"


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every record written so far in `out_dir` (merged file and per-rank files); a torn last line is skipped."""
    records = []
    for path in sorted(out_dir.glob("samples*.jsonl")):
        with open(path) as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # the line a kill interrupted; that sample is simply run again
    return records


def _square_pad(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _mean_colour(processor: Any) -> tuple[int, int, int]:
    mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]


def _chat(processor: Any, question: str) -> str:
    template = getattr(processor, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def run_grounding(
    model: torch.nn.Module,
    processor: Any,
    method: Method | None,
    samples: Iterable[RefSample],
    config: EvalConfig,
    progress: Callable[[int], None] = lambda _: None,
) -> int:
    """Runs the samples this process owns and has not finished yet; returns how many it ran now."""
    fmt = grounding_format_for(model.config.model_type)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["id"]) for r in load_records(out)}
    mine = [s for i, s in enumerate(samples) if i % config.world_size == config.rank]
    todo = [s for s in mine if (s.task, s.id) not in done]
    progress(len(mine) - len(todo))
    path = out / _jsonl_name(config.rank, config.world_size)
    fill = _mean_colour(processor)
    device = next(model.parameters()).device
    ran = 0
    with open(path, "a") as handle, prune(model, method) if method else nullcontext() as trace:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            records, ready = [], []
            for sample in batch:
                record = _base_record(sample, fmt, config.method_name)
                try:
                    if sample.box is None:
                        raise ValueError("the annotation has no box")
                    image = sample.open_image()
                    record["image_size"] = list(image.size)
                    ready.append((sample, image, record))
                except (OSError, ValueError, SyntaxError) as error:
                    record["error"] = f"{type(error).__name__}: {error}"
                records.append(record)
            if ready:
                _generate(model, processor, fmt, ready, fill, device, config, trace)
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            ran += len(batch)
            progress(len(batch))
    return ran


def _base_record(sample: RefSample, fmt: GroundingFormat, method: str) -> dict[str, Any]:
    return {
        "task": sample.task,
        "id": sample.id,
        "method": method,
        "expression": sample.expression,
        "image": sample.image_ref,
        "image_size": list(sample.image_size) if sample.image_size else None,
        "frame": fmt.frame,
        "target_box": list(sample.box) if sample.box else None,
        "prediction": None,
        "pred_box": None,
        "iou": None,
        "correct": False,
        "stages": [],
        "error": None,
    }


@torch.inference_mode()
def _generate(model, processor, fmt, ready, fill, device, config, trace) -> None:
    images = [_square_pad(image, fill) if fmt.frame == "pad" else image for _, image, _ in ready]
    texts = [_chat(processor, fmt.prompt.format(expression=sample.expression)) for sample, _, _ in ready]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
    if inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for b, ((sample, image, record), answer) in enumerate(zip(ready, answers, strict=True)):
        record["prediction"] = answer.strip()
        box = fmt.parse(answer)
        if box is not None and fmt.pixels:
            box = _normalize_pixels(box, processor, inputs, b)
        if box is not None:
            pred = from_frame(box, *image.size, fmt.frame)
            record["pred_box"] = list(pred)
            record["iou"] = iou(pred, sample.box)
            record["center_hit"] = center_inside(pred, sample.box)
            record["correct"] = record["iou"] >= 0.5
        if trace is not None and trace.stages:
            record["stages"] = [
                {"layer": s.layer, "grid": list(s.grid), "kept": s.kept[b].tolist(), "n_before": s.n_before[b]}
                for s in trace.stages
            ]
            record["tokens_per_layer"] = trace.tokens_per_layer[b].tolist()
            record["image_tokens_per_layer"] = trace.image_tokens_per_layer[b].tolist()


def _normalize_pixels(box, processor, inputs, b: int):
    """A box in pixels of the processor's resized image -> normalized, from Qwen2-VL's `image_grid_thw`."""
    grid = inputs.get("image_grid_thw")
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    if grid is None or patch is None:
        return None
    _, rows, cols = (int(v) for v in grid[b])
    width, height = cols * patch, rows * patch
    x1, y1, x2, y2 = box
    normalized = (x1 / width, y1 / height, x2 / width, y2 / height)
    return normalized if all(0.0 <= v <= 1.0 for v in normalized) else None


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: samples, errors, unparsed answers, Acc@IoU thresholds, mean IoU and centre accuracy.

    Acc@0.5 is the standard referring-expression metric; answers that do not parse count as wrong, samples
    with bad data are reported apart and left out of the accuracies.
    """
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    summary = {}
    for task, rows in by_task.items():
        scored = [r for r in rows if not r.get("error")]
        n = max(len(scored), 1)
        ious = [r["iou"] or 0.0 for r in scored]
        entry = {
            "samples": len(rows),
            "errors": len(rows) - len(scored),
            "unparsed": sum(r["pred_box"] is None for r in scored),
            **{f"acc@{t:g}": sum(v >= t for v in ious) / n for t in THRESHOLDS},
            "mean_iou": sum(ious) / n,
            "center_acc": sum(bool(r.get("center_hit")) for r in scored) / n,
        }
        kept = [r for r in scored if r.get("image_tokens_per_layer")]
        if kept:
            layers = len(kept[0]["image_tokens_per_layer"])
            entry["mean_image_tokens_per_layer"] = sum(sum(r["image_tokens_per_layer"]) for r in kept) / (
                len(kept) * layers
            )
        summary[task] = entry
    return summary
