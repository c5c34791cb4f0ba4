"""The demo runs end to end on a small subset (a random-weight testbed model stands in for the shipped one)."""

from __future__ import annotations

import json

import pytest

from vlmprune.cli.main import main


@pytest.fixture(scope="module")
def random_testbed(tmp_path_factory):
    from vlmprune.testbed.model import build_testbed_model, save_testbed

    return save_testbed(build_testbed_model().eval(), tmp_path_factory.mktemp("testbed"))


def test_demo_compares_every_method_at_matched_flops(random_testbed, tmp_path, capsys):
    table = tmp_path / "tables" / "demo.json"  # a directory the demo creates
    code = main(
        [
            "demo",
            "--model",
            random_testbed,
            "--limit",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path),
            "--json",
            str(table),
            "--timing-rounds",
            "1",
        ]
    )
    assert code == 0
    rows = json.loads(table.read_text())
    names = ["unpruned", "fastv", "fastv-no-rope", "uniform", "knn", "random", "pdrop", "feather", "btp", "vispruner"]
    names += ["fastervlm", "divprune", "dart", "cdpruner", "visionzip", "pooling", "sparsevlm"]
    assert [r["method"] for r in rows] == names
    assert {"method", "localization_acc", "other_acc", "flops_reduction", "prefill_speedup"} <= set(rows[0])
    assert all(r["prefill_speedup_spread"][0] <= r["prefill_speedup"] <= r["prefill_speedup_spread"][1] for r in rows)
    reductions = [r["flops_reduction"] for r in rows[1:] if r["method"] not in ("pooling", "sparsevlm")]
    assert max(reductions) - min(reductions) < 0.05  # matched compute (whole-number knobs: the value nearest to it)
    assert rows[0]["flops_reduction"] == 0.0 and rows[0]["prefill_speedup"] == 1.0
    assert rows[0]["target_kept"] is None and all(0.0 <= r["target_kept"] <= 1.0 for r in rows[1:])
    assert (tmp_path / "kept_tokens.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "feather" in printed and "(blind)" in printed and "target kept" in printed


def test_demo_without_a_checkpoint_says_how_to_get_one(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nothing")]) == 2
    assert "vlmprune testbed train" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["demo", "--model", str(broken)]) == 2
    assert "cannot load testbed model" in capsys.readouterr().err


def test_the_demo_runs_every_registered_method():
    from vlmprune.methods import list_methods
    from vlmprune.testbed.demo import demo_methods

    assert {m.name for m in demo_methods(8).values()} == set(list_methods())
