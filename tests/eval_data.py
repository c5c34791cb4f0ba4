"""Small referring-expression datasets in each standard layout, written by the tests."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

EXPRESSIONS = ["the red cup on the left", "a small dog", "the man in the blue shirt", "the top book", "green car"]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def write_refer(root: Path, dataset: str = "refcoco", n_refs: int = 6, broken: bool = False) -> Path:
    """`root/<dataset>/instances.json`, `refs(unc).p` and `root/images/mscoco/images/train2014/*.jpg`.

    Two sentences per ref; with `broken`, one image is missing, one is corrupt and one annotation has no box.
    """
    images_dir = root / "images" / "mscoco" / "images" / "train2014"
    images_dir.mkdir(parents=True, exist_ok=True)
    (root / dataset).mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    for i in range(n_refs):
        size = (200 + 20 * i, 160)
        name = f"COCO_train2014_{i:012d}.jpg"
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        annotations.append({"id": 100 + i, "image_id": i, "bbox": [10.0 + i, 20.0, 50.0, 40.0], "category_id": 1})
        _image(i, size).save(images_dir / name)
        refs.append(
            {
                "ref_id": i,
                "ann_id": 100 + i,
                "image_id": i,
                "split": "val" if i < n_refs - 1 else "train",
                "sentences": [
                    {"sent_id": 2 * i + k, "sent": EXPRESSIONS[(i + k) % len(EXPRESSIONS)]} for k in range(2)
                ],
            }
        )
    if broken:
        (images_dir / images[0]["file_name"]).unlink()
        (images_dir / images[1]["file_name"]).write_bytes(b"not a jpeg")
        annotations[2]["bbox"] = []
    with open(root / dataset / "instances.json", "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}, handle)
    with open(root / dataset / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle)
    return root


def write_hf_parquet(root: Path, n_rows: int = 3) -> Path:
    """lmms-lab RefCOCO-style parquet: image bytes, bbox [x, y, w, h], answer (list of expressions)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(n_rows):
        buffer = io.BytesIO()
        _image(50 + i, (120, 100)).save(buffer, format="PNG")
        rows.append(
            {
                "question_id": str(i),
                "image": {"bytes": buffer.getvalue(), "path": None},
                "bbox": [12.0, 10.0, 60.0, 50.0],
                "answer": EXPRESSIONS[i : i + 2],
            }
        )
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "val-00000-of-00001.parquet")
    return root


def write_ocid_ref(root: Path, n: int = 3) -> Path:
    """`root/val_expressions.json` and 640 x 480 images under `root/OCID-dataset/...`."""
    expressions = {}
    for i in range(n):
        scene = f"ARID20/table/top/seq0{i}/rgb/result_{i}.png"
        path = root / "OCID-dataset" / scene
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(80 + i, (640, 480)).save(path)
        expressions[str(1000 + i)] = {
            "scene_path": scene,
            "sentence": EXPRESSIONS[i],
            "bbox": json.dumps([64, 48, 320, 240]),
            "take_id": i,
        }
    (root / "val_expressions.json").write_text(json.dumps(expressions))
    return root


def eval_args(model_dir, data, out, *extra) -> list[str]:
    """`vlmprune eval` arguments for one refcoco folder: small batches, short answers, no progress bar."""
    where = ["--model", model_dir, "--tasks", "refcoco", "--data", str(data), "--out", str(out)]
    return ["eval", *where, "--batch-size", "2", "--max-new-tokens", "8", "--no-progress", *extra]
