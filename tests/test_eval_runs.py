"""A run directory knows what it holds: resuming never mixes settings, errors are retried, torn writes lose nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eval_data import eval_args, write_refer
from vlmprune.cli.main import main
from vlmprune.eval.runner import load_records


def scored(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["tasks"]


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        (["--method", "fastv", "--param", "ratio=0.5"], ["--method", "fastv", "--param", "ratio=0.9"], "params.ratio"),
        (["--method", "fastv"], ["--method", "random"], "method: 'fastv' -> 'random'"),
        (["--method", "fastv"], ["--method", "fastv", "--max-new-tokens", "6"], "max_new_tokens"),
        (["--method", "fastv"], ["--method", "fastv", "--budget-scope", "per_image"], "budget_scope"),
    ],
)
def test_resuming_with_other_settings_is_refused_and_overwrite_starts_afresh(
    small_model_dir, tmp_path, capsys, first, second, named
):
    data = write_refer(tmp_path / "data", n_refs=2)
    out = tmp_path / "out"
    assert main(eval_args(small_model_dir, data, out, *first)) == 0
    before = (out / "samples.jsonl").read_text()
    capsys.readouterr()
    assert main(eval_args(small_model_dir, data, out, *second)) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmprune:")]
    assert named in err and "--overwrite" in err, err
    assert (out / "samples.jsonl").read_text() == before  # nothing already computed is lost
    assert main(eval_args(small_model_dir, data, out, *second, "--overwrite")) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["method"] == second[1]


def test_errored_samples_run_again_once_the_data_is_fixed(small_model_dir, tmp_path, capsys):
    data = write_refer(tmp_path / "data", n_refs=3)
    images = data / "images"
    hidden = tmp_path / "images-away"
    shutil.move(images, hidden)
    out = tmp_path / "out"
    assert main(eval_args(small_model_dir, data, out, "--method", "fastv")) == 2  # every sample failed
    n = len(load_records(out))
    assert f"every one of the {n} samples failed (FileNotFoundError x{n}" in capsys.readouterr().err
    shutil.move(hidden, images)
    assert main(eval_args(small_model_dir, data, out, "--method", "fastv")) == 0
    records = load_records(out)
    assert len(records) == n and not any(r["error"] for r in records)
    assert scored(out)["refcoco"]["errors"] == 0


def test_a_run_torn_at_any_byte_resumes_to_the_uninterrupted_result(small_model_dir, tmp_path):
    data = write_refer(tmp_path / "data", n_refs=2)
    whole = tmp_path / "whole"
    assert main(eval_args(small_model_dir, data, whole, "--method", "fastv")) == 0
    full = (whole / "samples.jsonl").read_bytes()
    lines = full.splitlines(keepends=True)
    cuts = sorted({len(lines[0]) // 2, len(lines[0]), len(lines[0]) + 1, len(full) - 3, len(full) - 1})
    for cut in cuts:
        torn = tmp_path / f"torn-{cut}"
        torn.mkdir()
        shutil.copy(whole / "run.json", torn / "run.json")
        (torn / "samples.jsonl").write_bytes(full[:cut])
        assert main(eval_args(small_model_dir, data, torn, "--method", "fastv")) == 0
        assert (torn / "samples.jsonl").read_bytes().splitlines() == full.splitlines(), f"cut at byte {cut}"
        assert scored(torn) == scored(whole)


def test_eval_out_that_is_a_file_is_one_line(small_model_dir, tmp_path, capsys):
    data = write_refer(tmp_path / "data", n_refs=2)
    (tmp_path / "taken").write_text("x")
    assert main(eval_args(small_model_dir, data, tmp_path / "taken", "--method", "fastv")) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_refer_folder_whose_instances_lack_annotations_is_one_line(small_model_dir, tmp_path, capsys):
    data = write_refer(tmp_path / "data", n_refs=2)
    instances = data / "refcoco" / "instances.json"
    content = json.loads(instances.read_text())
    del content["annotations"]
    instances.write_text(json.dumps(content))
    assert main(["eval", "--model", small_model_dir, "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "is not a COCO instances file" in capsys.readouterr().err


def test_hostile_data_is_counted_with_its_reason_and_never_crashes(small_model_dir, tmp_path):
    """An empty image file, a decompression bomb, a box outside the image, a zero-size image entry, a duplicate
    sample id and an expression that is not UTF-8, in one refer folder beside good samples."""
    import pickle

    from PIL import Image

    data = write_refer(tmp_path / "data", n_refs=8)  # refs 0..6 are val, two sentences each
    folder, images = data / "refcoco", data / "images" / "mscoco" / "images" / "train2014"
    instances = json.loads((folder / "instances.json").read_text())
    refs = pickle.loads((folder / "refs(unc).p").read_bytes())
    name = lambda i: instances["images"][i]["file_name"]  # noqa: E731
    (images / name(0)).write_bytes(b"")  # an empty file
    Image.new("1", (14_000, 14_000)).save(images / name(1), format="PNG")  # 196 Mpx: twice PIL's bomb limit
    instances["annotations"][2]["bbox"] = [150.0, 20.0, 400.0, 40.0]  # far past the right edge
    instances["images"][3]["width"] = 0
    refs[4]["sentences"][1]["sent_id"] = refs[4]["sentences"][0]["sent_id"]  # the same sample id twice
    refs[5]["sentences"][0]["sent"] = b"caf\xe9 on the left"  # Latin-1 bytes
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))

    out = tmp_path / "out"
    assert main(eval_args(small_model_dir, data, out, "--method", "fastv")) == 0
    records = load_records(out)
    assert len(records) == 14  # every sentence of the 7 val refs, the duplicate included
    errors = {r["id"]: r["error"] for r in records if r["error"]}
    reasons = {error.split(":")[0] for error in errors.values()}
    assert reasons == {
        "UnidentifiedImageError",
        "DecompressionBombError",
        "box outside the image",
        "ValueError",  # zero-width image: no box can be normalized
        "duplicate sample id",
        "expression not UTF-8",
    }
    assert sum(not r["error"] for r in records) == 14 - len(errors) >= 4
    summary = scored(out)["refcoco"]
    assert summary["errors"] == len(errors) and sum(summary["errors_by_reason"].values()) == len(errors)


def test_a_parquet_file_without_a_needed_column_is_one_line(small_model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist([{"image": None, "bbox": [1, 2, 3, 4]}]), tmp_path / "data" / "val-0.parquet")
    assert (
        main(["eval", "--model", small_model_dir, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "has no answer column" in capsys.readouterr().err


def test_pictures_of_a_run_name_the_parameters_it_changed(small_model_dir, tmp_path):
    from vlmprune.cli.viz import _method_label

    data = write_refer(tmp_path / "data", n_refs=2)
    out = tmp_path / "out"
    assert main(eval_args(small_model_dir, data, out, "--method", "fastv", "--param", "ratio=0.75")) == 0
    assert _method_label(str(out / "samples.jsonl"), "fastv") == "fastv (ratio=0.75)"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"]["ratio"] == 0.75 and summary["params"]["layer"] == 2  # every parameter recorded
