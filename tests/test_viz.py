"""Analysis and pictures of kept tokens: statistics on hand-made records, pixels of the PNGs, the `viz` command."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmprune.cli.main import main
from vlmprune.viz import (
    box_cells,
    box_token_share,
    frame_image,
    keep_frequency,
    mean_vertical_position,
    plot_keep_frequency,
    plot_sample,
    read_records,
    record_from_trace,
    save_png,
    summarize,
)
from vlmprune.viz.frame import LLAVA_MEAN_RGB

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="pictures need matplotlib (the viz extra)"
)


def _record(kept: list[list[int]], grid=(2, 3), **fields) -> dict:
    record = {
        "task": "refcoco",
        "id": "0",
        "method": "fastv",
        "image": None,
        "image_size": [300, 200],
        "frame": "stretch",
        "target_box": None,
        "prediction": "[0.1, 0.1, 0.2, 0.2]",
        "pred_box": None,
        "correct": False,
        "iou": None,
        "stages": [{"layer": 3 + 5 * k, "grid": list(grid), "kept": ids} for k, ids in enumerate(kept)],
        "error": None,
    }
    record.update(fields)
    return record


def _rows(rows: range | list[int], cols: int = 4) -> list[int]:
    """Every index of the given rows of a grid `cols` wide."""
    return [r * cols + c for r in rows for c in range(cols)]


def _pixel(png: Image.Image, ax, x: float, y: float) -> tuple[int, int, int]:
    """The PNG's colour at data point (x, y) of `ax` (display y counts from the bottom, PNG rows from the top)."""
    px, py = ax.transData.transform((x, y))
    return png.convert("RGB").getpixel((int(px), int(png.height - py)))


# --- analysis ------------------------------------------------------------------------------------------------


def test_keep_frequency_is_the_share_of_samples_keeping_each_cell() -> None:
    records = [
        _record([[0, 1], [1]]),
        _record([[1, 5], [5]]),
        {"task": "refcoco", "id": "e", "error": "image missing", "stages": []},  # skipped
        _record([], stages=[]),  # unpruned: skipped
    ]
    np.testing.assert_array_equal(keep_frequency(records, 0), [[0.5, 1.0, 0.0], [0.0, 0.0, 0.5]])
    np.testing.assert_array_equal(keep_frequency(records, 1), [[0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])


def test_keep_frequency_resamples_other_grids_onto_the_common_one() -> None:
    # a 4 x 6 sample keeping its top half lands on the top row of the 2 x 3 grid
    records = [_record([[0]]), _record([[0]]), _record([list(range(12))], grid=(4, 6))]
    np.testing.assert_allclose(keep_frequency(records, 0), [[1.0, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]])


def test_keep_frequency_without_the_stage_raises() -> None:
    with pytest.raises(ValueError, match="stage 2"):
        keep_frequency([_record([[0]])], 2)


def test_kept_index_outside_the_grid_is_named() -> None:
    with pytest.raises(ValueError, match="kept index 6 outside the 2 x 3 grid"):
        keep_frequency([_record([[6]])], 0)


@pytest.mark.parametrize("rows", [1, 4, 24])
def test_mean_vertical_position_of_one_row(rows: int) -> None:
    assert mean_vertical_position(_rows([rows - 1], 5), (rows, 5)) == pytest.approx((rows - 0.5) / rows)
    assert mean_vertical_position(_rows([0], 5), (rows, 5)) == pytest.approx(0.5 / rows)


def test_mean_vertical_position_of_everything_is_half_and_of_nothing_nan() -> None:
    assert mean_vertical_position(range(24 * 24), (24, 24)) == pytest.approx(0.5)
    assert math.isnan(mean_vertical_position([], (24, 24)))


TOP, BOTTOM = _rows(range(2)), _rows(range(2, 4))

# (frame, image (W, H), box normalised to the image, kept on a 4 x 4 grid, expected share)
BOX_CASES = [
    ("stretch", (400, 400), [0, 0, 1, 0.5], TOP, 1.0),
    ("stretch", (400, 400), [0, 0, 1, 0.5], BOTTOM, 0.0),
    ("stretch", (800, 200), [0, 0, 1, 0.5], TOP, 1.0),  # stretch ignores the aspect
    ("pad", (400, 400), [0, 0, 1, 0.5], TOP, 1.0),  # a square image: pad changes nothing
    ("crop", (400, 400), [0, 0, 1, 0.5], BOTTOM, 0.0),
    # a wide image padded: it fills frame rows 1-2 only, so its top half is grid row 1
    ("pad", (400, 200), [0, 0, 1, 0.5], _rows([1]), 1.0),
    ("pad", (400, 200), [0, 0, 1, 0.5], _rows([0]), 0.0),  # row 0 is padding
    ("pad", (400, 200), [0, 0, 1, 0.5], TOP, 1.0),
    # a tall image padded: its left half is grid column 1
    ("pad", (200, 400), [0, 0, 0.5, 1], [r * 4 + 1 for r in range(4)], 1.0),
    ("pad", (200, 400), [0, 0, 0.5, 1], [r * 4 for r in range(4)], 0.0),
    # a wide image cropped to its centre square (x 100..300): image x 100..200 is frame columns 0-1
    ("crop", (400, 200), [0.25, 0, 0.5, 1], [r * 4 + c for r in range(4) for c in (0, 1)], 1.0),
    ("crop", (400, 200), [0.25, 0, 0.5, 1], [r * 4 + c for r in range(4) for c in (2, 3)], 0.0),
    ("crop", (400, 200), [0.25, 0, 0.5, 1], [0, 4], 0.25),  # 2 of the box's 8 cells
]


@pytest.mark.parametrize(("frame", "size", "box", "kept", "expected"), BOX_CASES)
def test_box_token_share(frame: str, size: tuple[int, int], box: list[float], kept: list[int], expected: float) -> None:
    assert box_token_share(kept, (4, 4), box, size, frame) == pytest.approx(expected)


def test_box_cut_off_by_the_crop_has_no_share() -> None:
    assert not box_cells([0, 0, 0.2, 1], (400, 200), "crop", (4, 4)).any()
    assert math.isnan(box_token_share(TOP, (4, 4), [0, 0, 0.2, 1], (400, 200), "crop"))


def test_box_smaller_than_a_cell_counts_the_cell_holding_its_centre() -> None:
    cells = box_cells([0.30, 0.30, 0.32, 0.32], (100, 100), "stretch", (4, 4))
    assert cells.sum() == 1 and cells[1, 1]


@pytest.mark.parametrize("box", [[0, 0, 300, 200], [0.5, 0, 0.2, 1], [0, 0, 1]])
def test_bad_box_raises(box: list[float]) -> None:
    with pytest.raises(ValueError, match="box"):
        box_token_share([0], (4, 4), box, (100, 100), "pad")


def test_unknown_frame_raises() -> None:
    with pytest.raises(ValueError, match="frame must be one of pad, crop, stretch"):
        box_token_share([0], (4, 4), [0, 0, 1, 1], (100, 100), "letterbox")


def test_frame_image_pads_crops_and_stretches() -> None:
    red = Image.new("RGB", (300, 100), (255, 0, 0))
    padded = frame_image(red, "pad")
    assert padded.size == (300, 300)
    assert padded.getpixel((150, 10)) == LLAVA_MEAN_RGB and padded.getpixel((150, 150)) == (255, 0, 0)
    assert frame_image(red, "crop").size == (100, 100)
    assert frame_image(red, "stretch").size == (300, 300)


def test_summarize_counts_stages_positions_and_box_shares() -> None:
    box = {"target_box": [0, 0, 1, 0.5], "image_size": [400, 400], "frame": "stretch"}
    records = [
        _record([TOP, _rows([0])], grid=(4, 4), correct=True, **box),
        _record([BOTTOM, _rows([3])], grid=(4, 4), correct=False, **box),
        _record([BOTTOM[:4], _rows([3])], grid=(4, 4)),  # no box: not a localization record
        {"task": "refcoco", "id": "e", "error": "corrupt image", "stages": []},
        _record([], stages=[]),
    ]
    summary = summarize(records)
    assert (summary["records"], summary["with_stages"], summary["errors"], summary["unpruned"]) == (5, 3, 1, 1)
    assert summary["methods"] == ["fastv"] and summary["tasks"] == ["refcoco"]
    first, second = summary["stages"]
    assert (first["stage"], first["layer"], first["grid"], first["samples"]) == (0, 3, [4, 4], 3)
    assert first["mean_kept"] == pytest.approx(20 / 3)
    assert first["mean_kept_fraction"] == pytest.approx(20 / 48)
    assert first["mean_vertical_position"] == pytest.approx((0.25 + 0.75 + 0.625) / 3)
    assert first["box_samples"] == 2
    assert first["mean_box_token_share"] == pytest.approx(0.5)
    assert first["mean_box_token_share_correct"] == pytest.approx(1.0)
    assert first["mean_box_token_share_wrong"] == pytest.approx(0.0)
    assert np.asarray(first["keep_frequency"]).shape == (4, 4)
    assert second["layer"] == 8
    assert second["mean_box_token_share"] == pytest.approx(0.25)  # a keeps row 0, half its box; b keeps none
    json.dumps(summary)  # JSON-ready


def test_read_records_skips_a_truncated_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(_record([[0]])) + "\n\n" + json.dumps(_record([[1]])) + '\n{"task": "ref')
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert [r["stages"][0]["kept"] for r in read_records(path)] == [[0], [1]]
    path.write_text('{"task": \n' + json.dumps(_record([[0]])) + "\n")
    with pytest.raises(ValueError, match=":1: not valid JSON"):
        read_records(path)


def test_record_from_trace_keeps_the_first_image_of_the_sample() -> None:
    trace = {
        "stages": [
            {
                "layer": 2,
                "grid": [2, 2],
                "image_grids": [[[2, 2], [2, 2]], [[3, 3]]],
                "kept": [[1, 3, 4, 7], [0, 8]],  # sample 0: indices 4.. belong to its second image
                "n_before": [8, 9],
            }
        ]
    }
    first = record_from_trace(trace, image_size=(10, 10), target_box=[0, 0, 1, 1])
    assert first["stages"] == [{"layer": 2, "grid": [2, 2], "kept": [1, 3]}]
    assert record_from_trace(trace, sample=1)["stages"][0] == {"layer": 2, "grid": [3, 3], "kept": [0, 8]}
    with pytest.raises(ValueError, match="sample 2 does not exist"):
        record_from_trace(trace, sample=2)


# --- pictures ------------------------------------------------------------------------------------------------


@needs_matplotlib
def test_heatmap_png_shows_the_hot_cell(tmp_path: Path) -> None:
    freq = np.zeros((6, 6))
    freq[2, 1] = 1.0
    figure = plot_keep_frequency([freq, freq / 2], [3, 8], vertical=[0.9, 0.9], samples=[10, 10], title="t")
    path = save_png(figure, tmp_path / "heatmap.png")
    png = Image.open(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert png.size == (round(width), round(height))
    first, second = figure.axes[:2]
    hot, cold = _pixel(png, first, 1.5, 2.5), _pixel(png, first, 4.5, 0.5)
    warm = _pixel(png, second, 1.5, 2.5)
    assert sum(hot) > sum(warm) + 100 > sum(cold) + 200  # magma: 1.0 light yellow, 0.5 red-purple, 0 black
    assert hot[0] > 240 and hot[1] > 240 and max(cold) < 40


@needs_matplotlib
def test_sample_overlay_dims_dropped_cells_and_draws_the_box(tmp_path: Path) -> None:
    record = _record([_rows([0]), [0]], grid=(4, 4), target_box=[0.5, 0.5, 1.0, 1.0], image_size=[200, 200])
    figure = plot_sample(record, Image.new("RGB", (200, 200), (255, 255, 255)))
    path = save_png(figure, tmp_path / "sample.png")
    png = Image.open(path)
    assert png.size == tuple(round(v) for v in figure.get_size_inches() * figure.dpi)
    image_panel, stage0, stage1 = figure.axes[:3]
    assert "kept 4/16" in stage0.get_title() and "layer 3" in stage0.get_title() and "fastv" in stage0.get_title()
    assert "kept 1/16" in stage1.get_title() and "target tokens kept: 0%" in stage1.get_title()
    assert min(_pixel(png, stage0, 2.5, 0.5)) > 230  # kept: the white image shows through
    assert max(_pixel(png, stage0, 2.5, 2.5)) < 110  # dropped: dimmed
    assert max(_pixel(png, stage1, 2.5, 0.5)) < 110  # dropped at the second stage
    assert min(_pixel(png, image_panel, 2.5, 0.5)) > 230  # the input panel is not dimmed
    r, g, b = _pixel(png, image_panel, 3.0, 2.0)  # the target box's top edge, at frame (0.75, 0.5)
    assert g > 200 and r < 150 and b < 150


# --- the command ---------------------------------------------------------------------------------------------


def _assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlmprune: error: ") and expected in last


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    image = tmp_path / "image.png"
    Image.new("RGB", (300, 200), (200, 200, 200)).save(image)
    box = {"target_box": [0, 0, 1, 0.5], "image_size": [300, 200], "frame": "stretch", "image": str(image)}
    records = [
        _record([TOP, _rows([0])], grid=(4, 4), id="a", correct=True, **box),
        _record([BOTTOM, _rows([3])], grid=(4, 4), id="b", **box),
        {"task": "refcoco", "id": "c", "method": "fastv", "error": "corrupt image", "stages": []},
        _record([TOP, _rows([1])], grid=(4, 4), id="d/1", **{**box, "image": str(tmp_path / "gone.png")}),
    ]
    path = tmp_path / "run"
    path.mkdir()
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@needs_matplotlib
def test_viz_run_writes_summary_heatmap_and_sample_pictures(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["viz", "--run", str(run_dir), "--out", str(out), "--samples", "5"]) == 0
    captured = capsys.readouterr()
    assert "gone.png" in captured.err  # a missing image is drawn on a grey canvas, not fatal
    summary = json.loads((out / "summary.json").read_text())
    assert summary["with_stages"] == 3 and summary["errors"] == 1
    np.testing.assert_allclose(summary["stages"][1]["keep_frequency"], np.repeat([[1], [1], [0], [1]], 4, 1) / 3)
    assert summary["stages"][0]["mean_box_token_share"] == pytest.approx(2 / 3)
    assert Image.open(out / "heatmap.png").size[0] > 600
    pictures = sorted(p.name for p in (out / "samples").iterdir())
    assert pictures == ["000_refcoco_a.png", "001_refcoco_b.png", "002_refcoco_d-1.png"]


@needs_matplotlib
def test_viz_run_default_out_and_sample_limit(run_dir: Path) -> None:
    assert main(["viz", "--run", str(run_dir), "--samples", "1"]) == 0
    assert (run_dir / "viz" / "heatmap.png").is_file()
    assert [p.name for p in (run_dir / "viz" / "samples").iterdir()] == ["000_refcoco_a.png"]


@needs_matplotlib
def test_viz_run_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _assert_one_line_error(main(["viz", "--run", str(tmp_path / "nope")]), capsys.readouterr().err, "does not exist")
    (tmp_path / "samples.jsonl").write_text("")
    _assert_one_line_error(main(["viz", "--run", str(tmp_path)]), capsys.readouterr().err, "the run is empty")
    (tmp_path / "samples.jsonl").write_text(json.dumps(_record([], stages=[])) + "\n")
    _assert_one_line_error(main(["viz", "--run", str(tmp_path)]), capsys.readouterr().err, "nothing to draw")
    mixed = [_record([[0]]), _record([[1]], method="feather")]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    _assert_one_line_error(main(["viz", "--run", str(tmp_path)]), capsys.readouterr().err, "--method")
    assert main(["viz", "--run", str(tmp_path), "--method", "feather", "--samples", "0"]) == 0


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    trace = {
        "stages": [
            {"layer": 2, "grid": [4, 4], "image_grids": [[[4, 4]]], "kept": [TOP], "n_before": [16]},
            {"layer": 6, "grid": [4, 4], "image_grids": [[[4, 4]]], "kept": [_rows([0])], "n_before": [8]},
        ],
        "image_tokens": [16],
        "tokens_per_layer": [[20] * 2 + [12] * 4 + [8] * 2],
        "image_tokens_per_layer": [[16] * 2 + [8] * 4 + [4] * 2],
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    return path


@needs_matplotlib
def test_viz_trace_writes_overlay_and_summary(trace_file: Path, tmp_path: Path) -> None:
    image = tmp_path / "wide.png"
    Image.new("RGB", (400, 200), (10, 120, 200)).save(image)
    out = tmp_path / "out"
    args = ["viz", "--trace", str(trace_file), "--image", str(image), "--box", "0,0,1,0.5", "--frame", "pad"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # padded, the image's top half is grid row 1: kept at stage 0 (rows 0-1), dropped at stage 1 (row 0)
    assert [s["mean_box_token_share"] for s in summary["stages"]] == [1.0, 0.0]
    assert [s["mean_vertical_position"] for s in summary["stages"]] == [0.25, 0.125]
    assert Image.open(out / "overlay.png").size[0] > 500


@needs_matplotlib
def test_viz_trace_errors_are_one_line(trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["--trace", str(trace_file), "--image", str(corrupt), *out], "cannot read image"),
        (["--trace", str(trace_file), "--image", str(tmp_path / "none.png"), *out], "argument --image"),
        (["--trace", str(tmp_path / "none.json"), "--image", str(corrupt), *out], "argument --trace"),
        (["--trace", str(trace_file), "--image", str(corrupt), "--box", "0,0,300,200", *out], "--box"),
        (["--trace", str(trace_file), *out], "--image"),
    ]
    for args, expected in cases:
        _assert_one_line_error(main(["viz", *args]), capsys.readouterr().err, expected)
