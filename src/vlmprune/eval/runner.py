"""The evaluation runner: batched, resumable, data-parallel grounding evaluation with a pruning method.

Each finished sample is appended to a JSONL file as one flushed and synced write, so a killed run resumes
where it stopped and loses nothing (a line torn by the kill is cut off before appending). A run directory knows
what it holds: `run.json` records the method with all its parameters, the model, the data, the prompt format
and the vlmprune version, and resuming with anything different is refused. Bad data (a missing or corrupt
image, an annotation without a box) becomes a record with an `error` and is counted, never a crash; such samples
are run again on resume. With several processes (`accelerate launch`) each takes every N-th sample, writes its
own file, and the first process merges them once all are done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmprune.engine import prune
from vlmprune.errors import VlmpruneError
from vlmprune.eval.boxes import center_inside, from_frame, iou
from vlmprune.eval.data import RefSample
from vlmprune.eval.prompts import GroundingFormat, grounding_format_for
from vlmprune.methods.base import Method

__all__ = [
    "MANIFEST",
    "EvalConfig",
    "clear_run",
    "error_reasons",
    "load_records",
    "run_grounding",
    "run_identity",
    "summarize",
]

THRESHOLDS = (0.25, 0.3, 0.5, 0.7)
MANIFEST = "run.json"


@dataclass
class EvalConfig:
    out_dir: Path
    batch_size: int = 8
    max_new_tokens: int = 32
    rank: int = 0
    world_size: int = 1
    method_name: str = "none"
    data: dict[str, Any] = field(default_factory=dict)  # where the samples come from (tasks, paths, split)
    budget_scope: str = "global"  # `vlmprune.prune`'s: a budget over a prompt's image tokens, or per image


def _jsonl_name(rank: int, world_size: int) -> str:
    return "samples.jsonl" if world_size == 1 else f"samples.rank{rank}.jsonl"


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """The latest record of each sample in `out_dir` (merged and per-rank files), in first-seen order.

    A torn last line is skipped; a sample that errored and was run again counts once, as its later record.
    """
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(out_dir.glob("samples*.jsonl")):
        with open(path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill interrupted; that sample is simply run again
                latest[(record["task"], record["id"])] = record
    return list(latest.values())


def clear_run(out_dir: Path) -> None:
    """Removes what a run wrote in `out_dir` (records, manifest, summaries), so that a new run starts afresh."""
    for pattern in ("samples*.jsonl", MANIFEST, "summary.json", "summary.md"):
        for path in out_dir.glob(pattern):
            path.unlink()


def run_identity(model: torch.nn.Module, method: Method | None, config: EvalConfig) -> dict[str, Any]:
    """What decides a run's records: method and all its parameters, model, data, prompt format, versions."""
    import vlmprune

    fmt = grounding_format_for(model.config)
    model_config = {
        k: v for k, v in model.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")
    }
    digest = hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return json.loads(
        json.dumps(
            {
                "method": config.method_name,
                "params": method.parameters() if method is not None else {},
                "budget_scope": config.budget_scope if method is not None else None,
                "model": getattr(model.config, "_name_or_path", ""),
                "model_config_sha256": digest,
                "data": config.data,
                "prompt": fmt.prompt,
                "frame": fmt.frame,
                "max_new_tokens": config.max_new_tokens,
                "vlmprune": vlmprune.__version__,
            },
            default=str,
        )
    )  # JSON round trip: tuples become lists, as they read back from run.json


def _check_manifest(out: Path, identity: dict[str, Any], rank: int) -> None:
    """Refuses to resume a run made with other settings; writes `run.json` for a new run."""
    path = out / MANIFEST
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise VlmpruneError(f"{path} cannot be read ({error}); pass --overwrite to start afresh") from None
        changed = _differences(previous, identity)
        if changed:
            raise VlmpruneError(
                f"{out} holds a run made with other settings ({'; '.join(changed)}); resume with the same "
                "settings, or pass --overwrite to start afresh, or choose another --out"
            )
        return
    if any(out.glob("samples*.jsonl")):
        raise VlmpruneError(
            f"{out} holds samples but no {MANIFEST} saying how they were made; pass --overwrite to start afresh, "
            "or choose another --out"
        )
    if rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=2) + "\n")
        os.replace(tmp, path)


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        changed = []
        for key in sorted(set(before) | set(now)):
            changed += _differences(before.get(key), now.get(key), f"{prefix}{key}.")
        return changed
    return [] if before == now else [f"{prefix.rstrip('.')}: {before!r} -> {now!r}"]


def _cut_torn_tail(path: Path) -> None:
    """Truncates `path` after its last newline: a line a kill left half-written is dropped before appending."""
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            handle.truncate(end)


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
    fmt = grounding_format_for(model.config)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, run_identity(model, method, config), config.rank)
    path = out / _jsonl_name(config.rank, config.world_size)
    _cut_torn_tail(path)  # before reading: a last record without its newline may be cut short
    done = {(r["task"], r["id"]) for r in load_records(out) if not r.get("error")}  # errored samples run again
    mine = [s for i, s in enumerate(samples) if i % config.world_size == config.rank]
    todo = [s for s in mine if (s.task, s.id) not in done]
    progress(len(mine) - len(todo))
    fill = _mean_colour(processor)
    device = next(model.parameters()).device
    ran = 0
    with open(path, "a") as handle, prune(model, method, config.budget_scope) if method else nullcontext() as trace:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            records, ready = [], []
            for sample in batch:
                record = _base_record(sample, fmt, config.method_name)
                try:
                    if sample.problem:
                        raise _BadData(sample.problem)
                    if sample.box is None:
                        raise ValueError("the annotation has no box")
                    image = sample.open_image()
                    if min(image.size) < 1:
                        raise _BadData(f"empty image: {image.size[0]}x{image.size[1]} pixels")
                    record["image_size"] = list(image.size)
                    ready.append((sample, image, record))
                except _BadData as problem:
                    record["error"] = str(problem)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    record["error"] = f"{type(error).__name__}: {error}"
                records.append(record)
            if ready:
                _generate(model, processor, fmt, ready, fill, device, config, trace)
            for record in records:  # one write per record, flushed and synced: a kill tears at most one line
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            ran += len(batch)
            progress(len(batch))
    return ran


class _BadData(Exception):
    """Bad data found before running a sample; its message is "kind: detail"."""


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
                | ({"merged": [ids.tolist() for ids, _ in s.sources[b]]} if s.sources is not None else {})
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


def error_reasons(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many of `records` errored for each reason (the text before an error's first colon)."""
    reasons: dict[str, int] = {}
    for record in records:
        if record.get("error"):
            reason = record["error"].split(":", 1)[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


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
            "errors_by_reason": error_reasons(rows),
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
