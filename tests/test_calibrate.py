"""BTP's calibration: the per-layer counts, the layers they imply, the file, and `vlmprune calibrate`."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmprune
from conftest import random_image
from vlmprune.calibrate import Calibration, calibrate, load_calibration, propose_layers
from vlmprune.cli.main import main
from vlmprune.cost import TokenSchedule, get_shape


@pytest.mark.parametrize(
    ("shares", "stages", "expected"),
    [
        ([0, 1, 1, 0, 1, 0, 0, 0], 4, (1, 3, 4, 5)),  # the rise at 1, the falls at 3 and 5, the rise at 4
        ([0, 1, 1, 0, 1, 0, 0, 0], 2, (1, 5)),  # ties go to the earlier layer
        ([0, 0, 0.2, 0.9, 0.5, 0.3, 0.03, 0.01], 3, (3, 4, 6)),  # 0.03 < 5%: layer 6 no longer changes the image
        ([1, 1, 1, 1, 1, 1], 4, (1, 2, 3, 5)),  # active to the end: the last stage before the last layer
    ],
)
def test_the_layers_go_at_the_sharp_shifts_and_after_the_last_active_layer(shares, stages, expected):
    assert propose_layers(shares, stages) == expected


@pytest.mark.parametrize(
    ("shares", "stages", "message"),
    [([0.01, 0.02, 0.0, 0.0], 2, "no layer changes 5% of the image tokens"), ([0, 1, 0, 0], 4, "ask for fewer stages")],
)
def test_counts_that_imply_no_layers_say_why(shares, stages, message):
    with pytest.raises(vlmprune.CalibrationError, match=message):
        propose_layers(shares, stages)


@pytest.fixture(scope="module")
def idle_layers_model(models):
    """The tiny model with decoder layers 0, 3 and 5 doing nothing: their output projections are zero."""
    model = copy.deepcopy(models["sdpa"])
    for i in (0, 3, 5):
        layer = model.model.language_model.layers[i]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def test_calibration_finds_the_layers_a_model_was_built_to_have(idle_layers_model, processor):
    images = [random_image(s) for s in range(3)]
    result = calibrate(
        idle_layers_model,
        processor,
        images,
        model_name="idle",
        image_dir="d",
        image_files=["a", "b", "c"],
        batch_size=2,
    )
    assert result.depth == 6 and result.image_tokens == 144
    assert [result.changed_tokens[i] for i in (0, 3, 5)] == [0.0, 0.0, 0.0]  # an idle layer changes nothing
    assert [result.changed_tokens[i] for i in (1, 2, 4)] == [144.0, 144.0, 144.0]  # random layers turn every token
    assert result.layers == (1, 3, 4, 5)  # shares 0 1 1 0 1 0: see the first case above


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibration-images")
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, size=(90 + 10 * i, 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"image{i}.png")
    (directory / "notes.txt").write_text("not an image")
    return directory


@pytest.fixture(scope="module")
def calibration_file(small_model_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "btp.json"
    argv = ["calibrate", "--model", small_model_dir, "--images", str(image_dir), "--out", str(out)]
    assert main([*argv, "--num-images", "3", "--batch-size", "2", "--no-progress"]) == 0
    return out


def test_calibrate_command_writes_the_counts_and_the_layers(calibration_file, small_model_dir, image_dir, capsys):
    data = json.loads(calibration_file.read_text())
    assert data["model"] == small_model_dir and data["images"] == str(image_dir)
    assert len(data["image_files"]) == 3 and all(f.endswith(".png") for f in data["image_files"])
    assert data["threshold"] == 0.93 and data["depth"] == 6 and data["image_tokens"] == 144
    assert len(data["changed_tokens"]) == 6 and data["layers"] == list(load_calibration(calibration_file).layers)


def test_btp_prunes_at_the_calibrated_layers(calibration_file, models, make_inputs, small_model_dir, capsys):
    method = vlmprune.build_method("btp", calibration=str(calibration_file))
    layers = json.loads(calibration_file.read_text())["layers"]
    assert list(method.layers) == layers
    with torch.no_grad(), vlmprune.prune(models["sdpa"], method) as trace:
        models["sdpa"](**make_inputs(["where is the cat"]))
    assert [s.layer for s in trace.stages] == layers
    image = random_image(0)
    path = calibration_file.parent / "image.png"
    image.save(path)
    argv = ["generate", "--model", small_model_dir, "--image", str(path), "--prompt", "what is it", "--method", "btp"]
    assert main([*argv, "--param", f"calibration={calibration_file}", "--max-new-tokens", "2"]) == 0
    assert f"before layer {layers[0]}, kept 72/144" in capsys.readouterr().out


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_a_missing_or_corrupt_calibration_file_is_a_one_line_error(tmp_path, calibration_file):
    good = json.loads(calibration_file.read_text())
    cases = {
        str(tmp_path / "none.json"): "does not exist",
        _write(tmp_path / "broken.json", '{"format": '): "is not valid JSON",
        _write(tmp_path / "other.json", '{"layers": [1, 2]}'): "is not a vlmprune calibration file",
        _write(
            tmp_path / "short.json", json.dumps({**good, "changed_share": [0.5]})
        ): "has 1 changed_share for its 6 layers",
        _write(tmp_path / "typed.json", json.dumps({**good, "depth": "six"})): "a field of the wrong type",
        _write(tmp_path / "lacks.json", json.dumps({k: v for k, v in good.items() if k != "threshold"})): "'threshold'",
        _write(tmp_path / "layers.json", json.dumps({**good, "layers": [3, 2]})): "not increasing within 1..5",
        _write(tmp_path / "empty.json", json.dumps({**good, "layers": None, "note": "no layer"})): "proposes no layers",
    }
    for path, message in cases.items():
        with pytest.raises(vlmprune.VlmpruneError, match=message) as error:
            vlmprune.build_method("btp", calibration=path)
        assert "\n" not in str(error.value)


def test_a_layer_list_that_contradicts_the_file_is_refused(calibration_file):
    with pytest.raises(vlmprune.ParameterError, match="differ from the calibrated"):
        vlmprune.build_method("btp", calibration=str(calibration_file), layers=[1, 2, 3, 4, 5])


@pytest.mark.parametrize(
    ("change", "message"),
    [({"depth": 32}, "language model has 32 layers; this one has 6"), ({"image_tokens": 576}, "576 tokens per image")],
)
def test_a_file_made_for_another_model_is_refused(calibration_file, tmp_path, models, make_inputs, change, message):
    data = json.loads(calibration_file.read_text()) | change
    data["changed_tokens"] = data["changed_share"] = [0.0] * data["depth"]
    other = _write(tmp_path / "other.json", json.dumps(data))
    method = vlmprune.build_method("btp", calibration=other)
    with pytest.raises(vlmprune.CalibrationError, match="run `vlmprune calibrate` on this model"):
        TokenSchedule.from_method(method, get_shape("llava-tiny"))  # the cost model checks too
    with (
        torch.no_grad(),
        vlmprune.prune(models["sdpa"], method),
        pytest.raises(vlmprune.CalibrationError, match=message),
    ):
        models["sdpa"](**make_inputs(["where is the cat"]))


def test_the_command_line_reports_a_mismatched_file_and_bad_images_in_one_line(
    calibration_file, small_model_dir, image_dir, tmp_path, capsys
):
    data = json.loads(calibration_file.read_text()) | {"image_tokens": 576}
    other = _write(tmp_path / "other.json", json.dumps(data))
    random_image(1).save(tmp_path / "image.png")
    argv = ["generate", "--model", small_model_dir, "--image", str(tmp_path / "image.png"), "--prompt", "what"]
    assert main([*argv, "--method", "btp", "--param", f"calibration={other}"]) == 2
    err = capsys.readouterr().err.strip()  # after the weights' loading bar
    assert "Traceback" not in err and err.splitlines()[-1].startswith("vlmprune: error: calibration file")
    assert "576 tokens per image" in err.splitlines()[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    for images, message in ((empty, "no images"), (tmp_path / "nowhere", "does not exist")):
        argv = ["calibrate", "--model", small_model_dir, "--images", str(images), "--out", str(tmp_path / "c.json")]
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_a_calibration_round_trips_through_its_file(tmp_path):
    calibration = Calibration(
        model="m", family="llava", depth=3, image_tokens=4, threshold=0.9, images="d", image_files=["a.png"],
        changed_tokens=[0.0, 2.0, 1.0], changed_share=[0.0, 0.5, 0.25], stages=2, active_share=0.05, layers=(1, 2),
    )  # fmt: skip
    calibration.save(tmp_path / "c.json")
    assert load_calibration(tmp_path / "c.json") == calibration
