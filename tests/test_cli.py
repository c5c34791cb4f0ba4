"""The `vlmprune` command line, run in-process through `main([...])` on a tiny model saved to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmprune.cli._common import parse_params
from vlmprune.cli.generate import build_prompt
from vlmprune.cli.main import main
from vlmprune.methods import list_methods
from vlmprune.testing import IMAGE_TOKEN, build_tiny_processor, save_tiny_llava


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def _generate(model_dir: str, image: str, *extra: str) -> list[str]:
    return ["generate", "--model", model_dir, "--image", image, "--prompt", "What is in the image?", *extra]


def _assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlmprune: error: ")
    assert expected in last


def test_methods_lists_each_method_with_its_paper_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("fastv", "pdrop", "feather"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "layer=2 ratio=0.5" in out  # FastV: K=2, R=50%
    assert "layers=(8, 16, 24) lam=0.5" in out  # PyramidDrop
    assert "layers=(8, 16) ratio=0.7 stride=3" in out  # FEATHER


def test_methods_json_has_every_registered_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert list(described) == list_methods()
    assert described["fastv"]["parameters"]["layer"] == 2
    assert described["feather"]["parameters"]["layers"] == [8, 16]
    assert "2403.06764" in described["fastv"]["paper"]


@pytest.mark.parametrize(
    ("item", "value"),
    [
        ("layer=3", 3),
        ("ratio=0.75", 0.75),
        ("layers=[8,16]", [8, 16]),
        ("rope=False", False),
        ("keep=None", None),
        ("softmax=image", "image"),
        ("softmax='image'", "image"),
    ],
)
def test_param_values_are_python_literals_or_bare_strings(item: str, value: object) -> None:
    key = item.partition("=")[0]
    assert parse_params([item]) == {key: value}


def test_prompt_is_wrapped_in_the_chat_template_once() -> None:
    processor = build_tiny_processor()
    assert build_prompt(processor, "What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    written = "USER: <image>\nDescribe it. ASSISTANT:"
    assert build_prompt(processor, written) == written
    processor.chat_template = None
    assert build_prompt(processor, "What is this?") == f"{IMAGE_TOKEN}\nWhat is this?"


def test_saved_tiny_model_loads_back_and_expands_one_image_to_576_tokens(model_dir: str) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    inputs = processor(images=Image.new("RGB", (64, 48)), text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_generate_with_fastv_prints_the_answer_and_the_kept_tokens(
    model_dir: str, image_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _generate(model_dir, image_file, "--method", "fastv", "--param", "layer=2", "--param", "ratio=0.5")
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].strip()  # the answer (random words from the tiny vocabulary)
    assert "288/576" in captured.out
    assert "Traceback" not in captured.err


def test_generate_with_method_none_runs_the_unpruned_model(
    model_dir: str, image_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_generate(model_dir, image_file, "--method", "none"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[0].strip()
    assert "all 576 image tokens kept" in out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "fastv", "--param", "foo=1"], "has no parameter 'foo'"),
        (["--method", "fastv", "--param", "ratio=1.5"], "ratio"),
        (["--method", "fastv", "--param", "ratio"], "argument --param: expected KEY=VALUE"),
        (["--method", "none", "--param", "layer=2"], "--method none takes no --param"),
    ],
    ids=["unknown-method", "unknown-param", "bad-value", "param-without-value", "param-for-none"],
)
def test_bad_method_arguments_exit_2_with_one_line(
    extra: list[str], expected: str, model_dir: str, image_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_generate(model_dir, image_file, *extra))
    _assert_one_line_error(code, capsys.readouterr().err, expected)


def test_missing_image_exits_2(model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.png"
    code = main(_generate(model_dir, str(missing), "--method", "fastv"))
    _assert_one_line_error(code, capsys.readouterr().err, f"argument --image: file {missing} does not exist")


def test_corrupt_image_exits_2(model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    code = main(_generate(model_dir, str(corrupt), "--method", "fastv"))
    _assert_one_line_error(code, capsys.readouterr().err, f"cannot read image {corrupt}")


def test_missing_model_directory_exits_2(image_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-model-here"
    code = main(_generate(str(missing), image_file, "--method", "fastv"))
    _assert_one_line_error(code, capsys.readouterr().err, f"model directory {missing} does not exist")


def test_pruning_error_during_generation_exits_2(
    model_dir: str, image_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny model has 4 decoder layers, so pruning before layer 10 is a LayerError from the engine.
    code = main(_generate(model_dir, image_file, "--method", "fastv", "--param", "layer=10"))
    _assert_one_line_error(code, capsys.readouterr().err, "10")


def test_argparse_errors_return_2_instead_of_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--method", "fastv"]) == 2
    assert "required" in capsys.readouterr().err


def test_installed_entry_point_lists_methods() -> None:
    script = Path(sys.executable).with_name("vlmprune.exe" if os.name == "nt" else "vlmprune")
    if not script.exists():
        pytest.skip(f"the vlmprune console script is not installed next to {sys.executable}")
    result = subprocess.run([str(script), "methods"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "fastv" in result.stdout and "feather" in result.stdout


def test_methods_explains_every_parameter_of_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    for name, info in described.items():
        assert set(info["help"]) == set(info["parameters"]), name
        assert all(info["help"].values()), f"{name}: a parameter without an explanation"
