"""Localization evaluation: loaders for each layout, box parsing and frames, the resumable data-parallel runner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval_data import eval_args, write_hf_parquet, write_ocid_ref, write_refer
from vlmprune.cli.main import main
from vlmprune.eval.boxes import center_inside, from_frame, iou, parse_normalized_box, parse_pixel_box, to_frame
from vlmprune.eval.data import load_hf_parquet, load_ocid_ref, load_refer, load_task

# ---- parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("[0.12, 0.3, 0.56, 0.78]", (0.12, 0.3, 0.56, 0.78)),
        ("The box is [0.1,0.2,0.3,0.4].", (0.1, 0.2, 0.3, 0.4)),
        ("Sure! (0.5, 0.5, 0.9, 1.0) is the region", (0.5, 0.5, 0.9, 1.0)),
        ("[0.1, 0.2, 0.3, 0.4] and also [0.5, 0.5, 0.6, 0.6]", (0.1, 0.2, 0.3, 0.4)),
        ("0.25 0.25 0.75 0.75", (0.25, 0.25, 0.75, 0.75)),
        ("[.1, .2, .3, .4]", (0.1, 0.2, 0.3, 0.4)),
    ],
)
def test_normalized_boxes_parse_from_real_looking_answers(answer, expected):
    assert parse_normalized_box(answer) == pytest.approx(expected)


@pytest.mark.parametrize(
    "answer",
    ["no box here", "[0.1, 0.2, 0.3]", "[1.2, 0.2, 1.5, 0.4]", "[0.5, 0.5, 0.1, 0.9]", "[0.1, 0.2, x, 0.4]", ""],
)
def test_malformed_or_out_of_range_answers_do_not_parse(answer):
    assert parse_normalized_box(answer) is None


def test_pixel_boxes_parse_from_qwen_style_json():
    assert parse_pixel_box('```json\n[{"bbox_2d": [12, 40, 200, 310], "label": "cup"}]\n```') == (12, 40, 200, 310)


def test_pad_frame_maps_boxes_both_ways():
    # a 200 x 100 image padded to 200 x 200: the image's top edge sits 50 px down the square
    box = (0.0, 0.0, 1.0, 1.0)
    square = to_frame(box, 200, 100, "pad")
    assert square == pytest.approx((0.0, 0.25, 1.0, 0.75))
    assert from_frame(square, 200, 100, "pad") == pytest.approx(box)
    assert from_frame((0.0, 0.0, 0.5, 0.2), 200, 100, "pad") == pytest.approx((0.0, 0.0, 0.5, 0.0))  # clipped
    crop = to_frame((0.25, 0.0, 0.75, 1.0), 200, 100, "crop")  # the centre 100 x 100 of the image
    assert crop == pytest.approx((0.0, 0.0, 1.0, 1.0))


def test_iou_and_centre():
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)
    assert center_inside((0.4, 0.4, 0.6, 0.6), (0.3, 0.3, 0.7, 0.7))


# ---- loaders ----------------------------------------------------------------------------------------------------


def test_refer_layout_gives_one_sample_per_sentence_with_normalized_boxes(tmp_path):
    samples = load_refer(write_refer(tmp_path), "refcoco", "val")
    assert len(samples) == 10  # 5 val refs x 2 sentences; the train ref is left out
    first = samples[0]
    assert first.box == pytest.approx((10 / 200, 20 / 160, 60 / 200, 60 / 160))
    assert first.open_image().size == (200, 160)
    assert load_task("refcoco", tmp_path)[0].id == first.id


def test_hf_parquet_layout_explodes_the_expressions(tmp_path):
    samples = load_hf_parquet(write_hf_parquet(tmp_path), "refcoco", "val")
    assert len(samples) == 6
    assert samples[0].box == pytest.approx((12 / 120, 10 / 100, 72 / 120, 60 / 100))
    assert samples[0].open_image().size == (120, 100)
    assert len(load_task("refcocog", tmp_path)) == 6


def test_ocid_ref_layout(tmp_path):
    samples = load_ocid_ref(write_ocid_ref(tmp_path))
    assert [s.box for s in samples] == [pytest.approx((0.1, 0.1, 0.5, 0.5))] * 3
    assert samples[0].open_image().size == (640, 480)


# ---- the runner ---------------------------------------------------------------------------------------------------


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_eval_reports_bad_data_and_writes_traces(small_model_dir, tmp_path, capsys):
    data = write_refer(tmp_path / "data", broken=True)
    out = tmp_path / "out"
    assert main(eval_args(small_model_dir, data, out, "--method", "fastv", "--param", "ratio=0.75")) == 0
    records = _records(out)
    errors = [r for r in records if r["error"]]
    assert len(records) == 10 and len(errors) == 6  # missing image, corrupt image, no box: 2 sentences each
    assert {e["error"].split(":")[0] for e in errors} == {"FileNotFoundError", "UnidentifiedImageError", "ValueError"}
    ok = [r for r in records if not r["error"]]
    assert all(len(r["stages"]) == 1 and len(r["stages"][0]["kept"]) == 36 for r in ok)
    summary = json.loads((out / "summary.json").read_text())["tasks"]["refcoco"]
    assert summary["samples"] == 10 and summary["errors"] == 6
    assert summary["mean_image_tokens_per_layer"] == pytest.approx((144 * 2 + 36 * 4) / 6)
    assert "refcoco" in capsys.readouterr().out


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(small_model_dir, tmp_path):
    data = write_refer(tmp_path / "data", n_refs=9)  # 16 val samples
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(eval_args(small_model_dir, data, whole, "--method", "feather", "--param", "layers=[2,4]")) == 0
    command = [
        sys.executable,
        "-m",
        "vlmprune.cli.main",
        *eval_args(small_model_dir, data, resumed, "--method", "feather", "--param", "layers=[2,4]"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl = resumed / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(jsonl.read_text().splitlines())
    assert 4 <= partial < 16, "the run was not interrupted mid-way"
    assert main(eval_args(small_model_dir, data, resumed, "--method", "feather", "--param", "layers=[2,4]")) == 0
    assert _records(resumed) == _records(whole)
    assert (
        json.loads((resumed / "summary.json").read_text())["tasks"]
        == json.loads((whole / "summary.json").read_text())["tasks"]
    )


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not os.path.exists(Path(sys.executable).parent / "accelerate"),
    reason="accelerate is not installed",
)
def test_two_processes_give_the_single_process_summary(small_model_dir, tmp_path):
    data = write_refer(tmp_path / "data", n_refs=6)
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    assert main(eval_args(small_model_dir, data, single, "--method", "fastv")) == 0
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            launcher,
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "vlmprune.cli.main",
            *eval_args(small_model_dir, data, parallel, "--method", "fastv"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(parallel.glob("samples.rank*.jsonl"))
    assert _records(parallel) == _records(single)
    assert (
        json.loads((parallel / "summary.json").read_text())["tasks"]
        == json.loads((single / "summary.json").read_text())["tasks"]
    )


def test_image_references_of_parquet_rows_open(tmp_path):
    from vlmprune.eval.data import open_image_ref

    samples = load_hf_parquet(write_hf_parquet(tmp_path), "refcoco", "val")
    assert "#" in samples[0].image_ref
    assert open_image_ref(samples[0].image_ref).size == (120, 100)


def test_pixel_answers_are_normalized_by_the_resized_frame_of_qwen_inputs():
    import types

    import torch

    from vlmprune.eval.runner import _normalize_pixels

    processor = types.SimpleNamespace(image_processor=types.SimpleNamespace(patch_size=14))
    inputs = {"image_grid_thw": torch.tensor([[1, 20, 30]])}  # 280 px high, 420 px wide
    assert _normalize_pixels((42, 28, 210, 140), processor, inputs, 0) == pytest.approx((0.1, 0.1, 0.5, 0.5))
    assert _normalize_pixels((0, 0, 500, 10), processor, inputs, 0) is None  # outside the image
    assert _normalize_pixels((0, 0, 5, 5), processor, {}, 0) is None


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1" * 100_000, None),  # a model repeating a digit: once a catastrophic backtrack
        ("[" * 50_000, None),
        ("(" + "0.5, " * 20_000, (0.5, 0.5, 0.5, 0.5)),
        ("0.1 " * 20_000 + "]", (0.1, 0.1, 0.1, 0.1)),
        ("[0.1, 0.2, 0.3, 0.4" + " " * 50_000 + "]", (0.1, 0.2, 0.3, 0.4)),
        ("٣" * 10_000, None),  # unicode digits: one huge number, not a box
        ("[0.1, 0.2, 0.3, 0.4]" + "9" * 50_000, (0.1, 0.2, 0.3, 0.4)),
    ],
)
def test_degenerate_answers_parse_in_one_pass(answer, expected):
    """Numbers are scanned once and separators checked as strings: no input makes the parser backtrack."""
    result = parse_normalized_box(answer)
    assert result == (None if expected is None else pytest.approx(expected))
