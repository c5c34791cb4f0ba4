"""Referring-expression datasets in their standard layouts, read from local paths.

Each loader returns `RefSample`s: one per referring expression, with the target box normalized to the
original image. Images are opened lazily, so a missing or corrupt file is reported for that sample only.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlmprune.errors import VlmpruneError
from vlmprune.extras import import_extra

__all__ = [
    "LOADERS",
    "RefSample",
    "checked",
    "load_hf_parquet",
    "load_ocid_ref",
    "load_refer",
    "load_task",
    "open_image_ref",
]


@dataclass
class RefSample:
    """One referring expression.

    Attributes:
        box: target (x1, y1, x2, y2) normalized to the original image, or None if the annotation has none.
        image_size: (width, height) of the original image, or None until the image is opened.
    """

    task: str
    id: str
    expression: str
    box: tuple[float, float, float, float] | None
    image_ref: str
    image_size: tuple[int, int] | None
    open_image: Callable[[], Image.Image] = field(repr=False)
    meta: dict = field(default_factory=dict)
    problem: str | None = None  # bad data found when loading ("kind: detail"); the sample is counted, not run


def _file_opener(path: Path) -> Callable[[], Image.Image]:
    def open_() -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB")

    return open_


def _bytes_opener(data: bytes) -> Callable[[], Image.Image]:
    def open_() -> Image.Image:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")

    return open_


def _xywh_to_normalized(box: list[float], width: float, height: float) -> tuple[float, float, float, float] | None:
    """A COCO [x, y, w, h] pixel box normalized to the image, or None if the image has no size or the box is not
    four numbers."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not width or not height or width <= 0 or height <= 0:
        return None
    return x / width, y / height, (x + w) / width, (y + h) / height


def checked(samples: list[RefSample]) -> list[RefSample]:
    """`samples` with bad data marked in `problem` (each is then counted with its reason, never run).

    Marks an expression that is not text (bytes that are not UTF-8 are shown with replacement characters), a box
    outside the image or empty, and a sample id seen before (renamed `id#dup<k>` so that no record replaces
    another's).
    """
    seen: dict[tuple[str, str], int] = {}
    for sample in samples:
        if isinstance(sample.expression, bytes):
            try:
                sample.expression = sample.expression.decode("utf-8")
            except UnicodeDecodeError:
                sample.expression = sample.expression.decode("utf-8", errors="replace")
                sample.problem = "expression not UTF-8: " + sample.expression[:40]
        elif not isinstance(sample.expression, str) or not sample.expression.strip():
            sample.problem = f"no expression: {sample.expression!r}"
            sample.expression = str(sample.expression)
        box = sample.box
        if box is not None and (min(box) < -_EDGE or max(box) > 1 + _EDGE or box[2] <= box[0] or box[3] <= box[1]):
            sample.problem = sample.problem or f"box outside the image: {[round(v, 3) for v in box]}"
        key = (sample.task, sample.id)
        if key in seen:
            seen[key] += 1
            sample.problem = sample.problem or f"duplicate sample id: {sample.id}"
            sample.id = f"{sample.id}#dup{seen[key]}"
        else:
            seen[key] = 0
    return samples


_EDGE = 0.01  # boxes may overrun the image by a rounding pixel or so


REFER_SPLITS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def load_refer(
    root: str | Path,
    dataset: str = "refcoco",
    split: str = "val",
    split_by: str | None = None,
    images: str | Path | None = None,
) -> list[RefSample]:
    """The `refer` layout: `root/<dataset>/instances.json` + `refs(<split_by>).p` and COCO train2014 images.

    Images are looked up in `images`, else `root/images/mscoco/images/train2014`, `root/images/train2014`,
    `root/train2014`. `split_by` defaults to unc for RefCOCO/RefCOCO+ and umd for RefCOCOg.
    """
    root = Path(root)
    split_by = split_by or REFER_SPLITS.get(dataset, "unc")
    folder = root / dataset
    try:
        with open(folder / f"refs({split_by}).p", "rb") as handle:
            refs = pickle.load(handle)
        with open(folder / "instances.json") as handle:
            instances = json.load(handle)
    except (OSError, pickle.UnpicklingError, json.JSONDecodeError) as error:
        raise VlmpruneError(f"cannot read the {dataset} refer files in {folder}: {error}") from None
    candidates = (
        [Path(images)]
        if images
        else [root / "images" / "mscoco" / "images" / "train2014", root / "images" / "train2014", root / "train2014"]
    )
    image_dir = next((c for c in candidates if c.is_dir()), candidates[0])
    try:
        image_info = {img["id"]: img for img in instances["images"]}
        boxes = {ann["id"]: ann.get("bbox") for ann in instances["annotations"]}
    except (KeyError, TypeError) as error:
        raise VlmpruneError(
            f"{folder / 'instances.json'} is not a COCO instances file (its images or annotations lack {error})"
        ) from None
    samples = []
    for ref in refs:
        if ref.get("split") != split:
            continue
        info = image_info.get(ref.get("image_id"))
        if info is None:
            raise VlmpruneError(
                f"{folder}: ref {ref.get('ref_id')} names image {ref.get('image_id')}, not in instances.json"
            )
        width, height = info.get("width") or 0, info.get("height") or 0
        bbox = boxes.get(ref["ann_id"])
        box = _xywh_to_normalized(bbox, width, height) if bbox else None
        path = image_dir / info["file_name"]
        for sentence in ref["sentences"]:
            samples.append(
                RefSample(
                    task=dataset,
                    id=f"{ref['ref_id']}-{sentence.get('sent_id', len(samples))}",
                    expression=sentence["sent"],
                    box=box,
                    image_ref=str(path),
                    image_size=(width, height),
                    open_image=_file_opener(path),
                )
            )
    return samples


def load_hf_parquet(path: str | Path, task: str = "refcoco", split: str = "val") -> list[RefSample]:
    """The lmms-lab RefCOCO datasets (what lmms-eval uses) from a local snapshot of their parquet files.

    Rows have `image` ({"bytes": ...}), `bbox` as [x, y, w, h] in pixels and `answer`, a list of expressions
    (one sample each), plus `question_id`. Files are `<path>/**/<split>-*.parquet`.
    """
    pq = import_extra("pyarrow.parquet", "reading parquet datasets")
    files = sorted(Path(path).rglob(f"{split}*.parquet"))
    if not files:
        raise VlmpruneError(f"no {split}*.parquet files under {path}")
    samples = []
    for file in files:
        table = pq.read_table(file)
        missing = sorted({"image", "bbox", "answer"} - set(table.column_names))
        if missing:
            raise VlmpruneError(
                f"{file} has no {', '.join(missing)} column (an lmms-lab RefCOCO parquet file has them)"
            )
        for row_index, row in enumerate(table.to_pylist()):
            image_bytes = (row.get("image") or {}).get("bytes")
            opener = _bytes_opener(image_bytes) if image_bytes else _missing(f"{file}#{row_index}")
            width, height = _size_of(image_bytes)
            bbox = row.get("bbox")
            box = _xywh_to_normalized(bbox, width, height) if bbox else None
            answers = row.get("answer") or []
            for k, expression in enumerate(answers if isinstance(answers, list) else [answers]):
                samples.append(
                    RefSample(
                        task=task,
                        id=f"{row.get('question_id', f'{file.stem}-{row_index}')}-{k}",
                        expression=expression,
                        box=box,
                        image_ref=f"{file}#{row_index}",
                        image_size=(width, height) if width else None,
                        open_image=opener,
                    )
                )
    return samples


def load_ocid_ref(root: str | Path, split: str = "val", images: str | Path | None = None) -> list[RefSample]:
    """OCID-Ref: `root/<split>_expressions.json` (id -> scene_path, sentence, bbox "[x1, y1, x2, y2]" in pixels,
    take_id) with the OCID images (640 x 480) under `images`, else `root/OCID-dataset`."""
    root = Path(root)
    try:
        with open(root / f"{split}_expressions.json") as handle:
            expressions = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise VlmpruneError(f"cannot read OCID-Ref {split} expressions in {root}: {error}") from None
    image_dir = Path(images) if images else root / "OCID-dataset"
    width, height = 640, 480  # every OCID image
    samples = []
    for example_id, example in expressions.items():
        raw = example.get("bbox")
        try:
            x1, y1, x2, y2 = json.loads(raw) if isinstance(raw, str) else raw
            box = (x1 / width, y1 / height, x2 / width, y2 / height)
        except (TypeError, ValueError):
            box = None
        path = image_dir / example["scene_path"]
        samples.append(
            RefSample(
                task="ocid-ref",
                id=str(example_id),
                expression=example["sentence"],
                box=box,
                image_ref=str(path),
                image_size=(width, height),
                open_image=_file_opener(path),
                meta={"take_id": example.get("take_id")},
            )
        )
    return samples


def open_image_ref(ref: str) -> Image.Image:
    """The image a `RefSample.image_ref` (as eval records store it) points to: a file, or `file.parquet#row`."""
    path, sep, row = ref.rpartition("#")
    if sep and path.endswith(".parquet") and row.isdigit():
        pq = import_extra("pyarrow.parquet", "reading images from parquet datasets")
        cell = pq.read_table(path, columns=["image"]).slice(int(row), 1).to_pylist()[0]["image"]
        return _bytes_opener((cell or {}).get("bytes") or b"")()
    return _file_opener(Path(ref))()


def _missing(where: str) -> Callable[[], Image.Image]:
    def open_() -> Image.Image:
        raise OSError(f"no image bytes at {where}")

    return open_


def _size_of(data: bytes | None) -> tuple[int, int]:
    if not data:
        return 0, 0
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except OSError:
        return 0, 0


LOADERS: dict[str, str] = {
    "refcoco": "refer layout (instances.json + refs(unc).p) or lmms-lab parquet",
    "refcoco+": "refer layout (refs(unc).p) or lmms-lab parquet",
    "refcocog": "refer layout (refs(umd).p) or lmms-lab parquet",
    "ocid-ref": "OCID-Ref <split>_expressions.json + OCID-dataset images",
}


def load_task(task: str, root: str | Path, split: str = "val") -> list[RefSample]:
    """Samples of `task` found under `root`, whichever standard layout it holds."""
    root = Path(root)
    if task == "ocid-ref":
        return checked(load_ocid_ref(root, split))
    if task not in REFER_SPLITS:
        raise VlmpruneError(f"unknown task {task!r}; available: {', '.join(LOADERS)}")
    if (root / task / "instances.json").exists():
        return checked(load_refer(root, task, split))
    if any(root.rglob(f"{split}*.parquet")):
        return checked(load_hf_parquet(root, task, split))
    raise VlmpruneError(
        f"no {task} data under {root}: expected {root / task}/instances.json (refer layout) or {split}*.parquet files"
    )
