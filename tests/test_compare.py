"""Methods compared at matched FLOPs, in the layout of FEATHER's Table 1."""

from __future__ import annotations

import json

import pytest

import vlmprune
from eval_data import write_refer
from vlmprune.cli.main import main
from vlmprune.cost import TokenSchedule, estimate, get_shape, match_flops
from vlmprune.cost.match import KNOBS


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_matching_finds_each_methods_budget_for_a_target_reduction(name):
    shape = get_shape("prismatic-7b")
    method = match_flops(vlmprune.build_method(name), shape, 0.5)
    reduction = estimate(shape, TokenSchedule.from_method(method, shape), "paper").reduction
    assert reduction == pytest.approx(0.5, abs=0.005)


def test_matching_a_whole_number_knob_takes_the_value_closest_to_the_target():
    shape = get_shape("prismatic-7b")

    def reduction(method):
        return estimate(shape, TokenSchedule.from_method(method, shape), "paper").reduction

    pooling = vlmprune.build_method("pooling")
    gaps = {size: abs(reduction(vlmprune.build_method("pooling", size=size)) - 0.8) for size in range(1, 9)}
    assert match_flops(pooling, shape, 0.8).size == min(gaps, key=gaps.get)


def test_matching_pyramid_drop_to_feathers_65_percent_gives_the_papers_lambda():
    shape = get_shape("prismatic-7b")
    assert match_flops(vlmprune.build_method("pdrop"), shape, 0.65).lam == pytest.approx(0.3, abs=0.02)


def test_compare_prints_table_one_at_matched_flops(small_model_dir, tmp_path, capsys):
    data = write_refer(tmp_path / "data", n_refs=3)
    out = tmp_path / "compare"
    code = main(
        [
            "compare",
            "--model",
            small_model_dir,
            "--methods",
            "fastv,feather",
            "--param",
            "feather.layers=[2,4]",
            "--match-flops",
            "0.4",
            "--tasks",
            "refcoco",
            "--data",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "6",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | FLOPs red. | refcoco | Loc-Avg | Other-Avg |" in printed
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["unpruned", "fastv", "feather"]
    assert rows[0]["flops_reduction"] == 0.0
    assert all(abs(r["flops_reduction"] - 0.4) < 0.02 for r in rows[1:])
    assert (out / "fastv" / "samples.jsonl").exists() and (out / "feather" / "samples.jsonl").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "fastv,feather"], "before layer 8, but the language model has 6 layers"),  # feather's default
        (["--methods", "fastv", "--param", "knn.k=3"], "is for 'knn', which is not run here"),
        (["--methods", "fastv", "--param", "fastv.softmax=imag"], "softmax must be one of"),
    ],
)
def test_compare_checks_every_method_before_evaluating_any(small_model_dir, tmp_path, capsys, extra, message):
    data = write_refer(tmp_path / "data", n_refs=2)
    out = tmp_path / "compare"
    args = ["compare", "--model", small_model_dir, "--tasks", "refcoco", "--data", str(data), "--out", str(out)]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "fastv").exists() and not (out / "unpruned").exists()  # nothing ran
