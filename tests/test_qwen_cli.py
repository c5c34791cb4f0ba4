"""`vlmprune generate/flops/eval/bench` on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models saved to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval_data import eval_args, write_refer
from vlmprune.cli.main import main
from vlmprune.eval.boxes import parse_thousandths_box
from vlmprune.eval.prompts import grounding_format_for
from vlmprune.processors import load_processor
from vlmprune.testing.qwen_vl import QWEN_FAMILIES, save_tiny_qwen_vl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def saved(request, tmp_path_factory) -> tuple[str, str]:
    family = request.param
    return family, save_tiny_qwen_vl(tmp_path_factory.mktemp(family.replace(".", "_")), family)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("image") / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_the_saved_processor_loads_back_without_torchvision(saved):
    processor = load_processor(saved[1])
    assert processor.image_token == "<|image_pad|>" and processor.chat_template


@pytest.mark.parametrize(
    "method", [["--method", "vispruner", "--param", "keep=6"], ["--method", "pdrop", "--param", "layers=[1,2,4]"]]
)
def test_generate_prints_the_answer_and_the_kept_tokens(saved, image_file, method, capsys):
    argv = ["generate", "--model", saved[1], "--image", image_file, "--prompt", "where is the cat"]
    assert main([*argv, *method, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "stage 0" in out and "image tokens" in out


def test_flops_reads_the_saved_config(saved, capsys):
    assert main(["flops", "--model", saved[1], "--method", "fastv", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["ratio"] < 1


def test_eval_runs_with_the_familys_grounding_format(saved, tmp_path):
    data = write_refer(tmp_path / "data", n_refs=3)
    out = tmp_path / "out"
    assert main(eval_args(saved[1], data, out, "--method", "fastv", "--param", "ratio=0.5")) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert records and not any(r["error"] for r in records)
    assert all(len(r["stages"]) == 1 for r in records)


def test_bench_builds_the_familys_tiny_shape(saved, capsys):
    shape = f"{saved[0]}-tiny"
    argv = ["bench", "--shape", shape, "--batch", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]
    assert main([*argv, "--methods", "fastv,random", "--no-original-fastv"]) == 0
    assert "prefill speed-up" in capsys.readouterr().out


def test_qwen3_boxes_are_thousandths_of_the_image():
    assert grounding_format_for("qwen3_vl").parse is parse_thousandths_box
    assert grounding_format_for("qwen2_5_vl").pixels
    answer = '```json\n[{"bbox_2d": [100, 250, 500, 1000], "label": "cup"}]\n```'
    assert parse_thousandths_box(answer) == (0.1, 0.25, 0.5, 1.0)
    assert parse_thousandths_box("[0, 0, 1001, 5]") is None
