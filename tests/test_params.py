"""Method parameters are read by their declared types, from Python, JSON or the command line, before any load."""

from __future__ import annotations

import pytest

import vlmprune
from vlmprune.cli._common import parse_params
from vlmprune.cli.main import main


@pytest.mark.parametrize(
    "raw, expected",
    [
        *[("false", False), ("False", False), ("no", False), ("0", False), ("off", False)],
        *[("true", True), ("YES", True), ("1", True), ("on", True)],
    ],
)
def test_boolean_parameters_read_the_words_people_write(raw, expected):
    method = vlmprune.build_method("fastv", **parse_params([f"rope={raw}"]))
    assert method.rope is expected


def test_numbers_literals_and_tuples_are_checked_against_the_field():
    assert vlmprune.build_method("fastv", ratio="0.75", layer="3").ratio == 0.75
    assert vlmprune.build_method("pdrop", layers=[2, 4], keep="none").layers == (2, 4)
    assert vlmprune.build_method("uniform", stride="None").stride is None


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("fastv", {"rope": "maybe"}, r"method 'fastv': rope must be true or false, got 'maybe'"),
        ("fastv", {"ratio": "half"}, r"ratio must be a number, got 'half'"),
        ("fastv", {"softmax": "imag"}, r"softmax must be one of 'sequence', 'image', 'none', got 'imag'"),
        ("fastv", {"layer": 2.5}, r"layer must be an integer, got 2.5"),
        ("fastv", {"ratio": 1.5}, r"ratio .* must be in \[0, 1\), got 1.5"),
        ("feather", {"layers": [1, 2, 3]}, r"layers must have 2 elements"),
        ("pdrop", {"layers": 8}, r"layers must be a list"),
    ],
)
def test_a_bad_parameter_is_a_parameter_error_naming_the_field(name, params, message):
    with pytest.raises(vlmprune.ParameterError, match=message):
        vlmprune.build_method(name, **params)


@pytest.mark.parametrize("param", ["softmax=imag", "ratio=half", "rope=maybe"])
def test_the_command_line_rejects_a_bad_parameter_in_one_line_before_loading(param, tmp_path, capsys):
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")  # loading it would fail, naming it
    (tmp_path / "no.png").write_bytes(b"not an image")  # and so would reading this
    unloadable = ["--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "no.png")]
    code = main(["generate", *unloadable, "--prompt", "hi", "--method", "fastv", "--param", param])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert param.split("=")[0] in err and "no-model" not in err and "no.png" not in err


@pytest.mark.parametrize("limit", ["0", "-3", "many"])
def test_eval_limit_must_be_a_positive_count(limit, small_model_dir, tmp_path, capsys):
    code = main(["eval", "--model", small_model_dir, "--limit", limit, "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--limit" in capsys.readouterr().err


def test_generate_refuses_an_unwritable_trace_path_and_a_prompt_with_two_images(small_model_dir, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "image.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(image)
    base = ["generate", "--model", small_model_dir, "--image", str(image), "--method", "fastv"]
    assert main([*base, "--prompt", "what", "--save-trace", str(tmp_path / "no" / "dir" / "t.json")]) == 2
    assert "argument --save-trace: " in capsys.readouterr().err
    assert main([*base, "--prompt", "<image> and <image> what"]) == 2
    assert "the prompt does not fit the image" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fastv", "random", "uniform", "knn"])
def test_one_stage_methods_take_a_token_count_as_their_budget(name, models, make_inputs):
    import torch

    params = {"keep": 20, "layer": 2} | ({"stride": None} if name == "uniform" else {})
    method = vlmprune.build_method(name, **params)
    with torch.no_grad(), vlmprune.prune(models["sdpa"], method) as trace:
        models["sdpa"](**make_inputs(["where is the cat", "is the large object on the left red"]))
    assert trace.stages[0].n_kept == [20, 20]
    with pytest.raises(vlmprune.ParameterError, match="keep"):
        vlmprune.build_method(name, keep=-1)
