"""Every method takes a token-count budget (`keep`) as well as its ratio (issue 11).

`keep` is always image-token counts: one count for a one-stage method; for PyramidDrop and FEATHER one count
per stage, or one integer for the last stage. PyramidDrop's fractions are `keep_fractions`.
"""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.budget import Keep
from vlmprune.cli.main import main
from vlmprune.cost import TokenSchedule, get_shape, match_flops

LLAVA = get_shape("llava-1.5-7b")


def counts(method: str, **params) -> list[float]:
    """The image tokens each stage leaves, projected on LLaVA-1.5-7B (576 tokens, 32 layers)."""
    schedule = TokenSchedule.from_method(vlmprune.build_method(method, **params), LLAVA)
    return [schedule.image_tokens[stage.layer] for stage in vlmprune.build_method(method, **params).stages()]


def test_pyramid_drop_takes_per_stage_counts_or_the_last_stage_with_its_lambda_shape():
    assert counts("pdrop") == [288, 144, 72]  # λ = 0.5 of the original 576
    assert counts("pdrop", keep=72) == [288, 144, 72]  # the last count, each earlier one 1/λ times the next
    assert counts("pdrop", keep=64) == [256, 128, 64]
    assert counts("pdrop", keep=40, lam=0.3) == [444, 133, 40]  # floor(40 / 0.09), floor(40 / 0.3)
    assert counts("pdrop", keep=[300, 100, 20]) == [300, 100, 20]
    assert counts("pdrop", keep_fractions=[0.5, 0.25, 0.1]) == [288, 144, 57]  # int(576 * 0.1)


def test_feather_takes_both_stage_counts_or_the_last_one():
    assert vlmprune.build_method("feather", keep=(100, 30)).stages()[0].budget == Keep.count(100)
    assert vlmprune.build_method("feather", keep=(100, 30)).stages()[1].budget == Keep.count(30)
    assert counts("feather", keep=24)[1] == 24  # the first stage keeps int(576 * 0.3) = 172 by φ-R, as without keep
    assert counts("feather", keep=24)[0] == counts("feather")[0]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("pdrop", {"keep": [72, 144, 288]}, "non-increasing"),
        ("pdrop", {"keep": [288, 144]}, "2 counts for 3 layers"),
        ("pdrop", {"keep": -1}, "non-negative integer"),
        ("pdrop", {"keep": 72, "keep_fractions": [0.5, 0.25, 0.125]}, "not both"),
        ("pdrop", {"keep_fractions": [0.5, 0.75, 0.125]}, "non-increasing"),
        ("feather", {"keep": [10, 20, 30]}, "keep must have 2 elements"),
        ("feather", {"keep": -4}, "non-negative integer"),
        ("fastv", {"keep": -1}, "keep"),
        ("knn", {"keep": 1.5}, "keep must be an integer"),
        ("uniform", {"keep": 64}, "pass stride=None with keep"),
    ],
)
def test_a_bad_count_is_one_parameter_error(method, params, message):
    with pytest.raises(vlmprune.ParameterError, match=message):
        vlmprune.build_method(method, **params)


def test_counts_read_from_the_command_line(capsys):
    assert main(["flops", "--model", "llava-1.5-7b", "--method", "pdrop", "--param", "keep=64"]) == 0
    assert "256 from layer 8, 128 from layer 16, 64 from layer 24" in capsys.readouterr().out
    assert main(["flops", "--model", "llava-1.5-7b", "--method", "feather", "--param", "keep=[100,30]"]) == 0
    assert "30 from layer 16" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("fastv", ["keep=600"]),
        ("knn", []),  # the official 196 of the 144 tokens of llava-tiny
        ("pdrop", ["keep=64", "layers=[1,2,3]"]),  # 256, 128, 64: the first stage asks for 256 of 144
        ("feather", ["keep=[150,20]", "layers=[1,3]"]),
    ],
)
def test_a_budget_over_the_image_tokens_is_one_line_before_any_model_runs(method, params, capsys):
    args = ["flops", "--model", "llava-tiny", "--method", method]
    assert main([*args, *(f"--param={p}" for p in params)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only 144 are present" in err, err


def test_a_budget_over_the_image_tokens_in_a_forward_is_a_budget_error(models, make_inputs):
    method = vlmprune.build_method("pdrop", layers=(1, 2, 3), keep=64)
    inputs = make_inputs(["where is the cat"])
    error = pytest.raises(vlmprune.BudgetError, match="256 image tokens but only 144 are present")
    with error, torch.no_grad(), vlmprune.prune(models["sdpa"], method):
        models["sdpa"](**inputs)


def test_counts_run_on_a_model_and_keep_what_they_say(models, make_inputs):
    inputs = make_inputs(["where is the cat", "is the large object on the left red"])
    for method, expected in [
        (vlmprune.build_method("pdrop", layers=(1, 3, 5), keep=(100, 50, 9)), [[100, 100], [50, 50], [9, 9]]),
        (vlmprune.build_method("pdrop", layers=(1, 3, 5), keep=9), [[36, 36], [18, 18], [9, 9]]),
    ]:
        with torch.no_grad(), vlmprune.prune(models["sdpa"], method) as trace:
            models["sdpa"](**inputs)
        assert [stage.n_kept for stage in trace.stages] == expected
    feather = vlmprune.build_method("feather", layers=(2, 4), keep=(30, 12))
    with torch.no_grad(), vlmprune.prune(models["sdpa"], feather) as trace:
        models["sdpa"](**inputs)
    assert all(n >= 30 for n in trace.stages[0].n_kept) and trace.stages[1].n_kept == [12, 12]


@pytest.mark.parametrize(
    ("method", "params"),
    [("pdrop", {"keep": 72}), ("pdrop", {"keep_fractions": [0.5, 0.3, 0.1]}), ("feather", {"keep": 24}), ("knn", {})],
)
def test_matching_flops_replaces_counts_by_the_knob(method, params):
    matched = match_flops(vlmprune.build_method(method, **params), LLAVA, 0.6)
    assert getattr(matched, "keep", None) is None and getattr(matched, "keep_fractions", None) is None
