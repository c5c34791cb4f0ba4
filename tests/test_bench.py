"""The benchmark runner and command: what they measure is consistent with the trace and the cost model."""

from __future__ import annotations

import json

import pytest

import vlmprune
from vlmprune.bench import Variant, run_benchmark
from vlmprune.cli.main import main
from vlmprune.cost import TokenSchedule, kv_cache_bytes, shape_from_config


def test_runner_measures_every_variant_and_the_kv_cache_the_cost_model_predicts(models, make_inputs):
    model = models["sdpa"]
    inputs = make_inputs(["what is in the picture"])
    fastv = vlmprune.build_method("fastv", layer=2, ratio=0.75)
    variants = [
        Variant("unpruned", None),
        Variant("fastv", fastv),
        Variant("fastv-original", vlmprune.build_method("fastv", layer=2, ratio=0.75, full_map=True), attn="eager"),
    ]
    shape = shape_from_config(model.config)
    results = run_benchmark(model, inputs, variants, shape, new_tokens=3, repeats=2, warmup=1)
    assert [r.label for r in results] == ["unpruned", "fastv", "fastv-original"]
    assert model.config._attn_implementation == "sdpa"  # the eager variant's switch is undone
    base, pruned, original = results
    assert base.measured_speedup == 1.0 and base.ideal_speedup == 1.0 and base.scoring_s == 0.0
    assert pruned.ideal_speedup > 1.0 and 0.0 < pruned.scoring_share < 1.0
    text = float(inputs["attention_mask"].sum()) - 144
    schedule = TokenSchedule.parse("144@0,36@2", shape.layers, text)
    assert base.kv_cache_bytes == kv_cache_bytes(shape, TokenSchedule.unpruned(shape, text), dtype_bytes=4)
    assert pruned.kv_cache_bytes == original.kv_cache_bytes == kv_cache_bytes(shape, schedule, dtype_bytes=4)
    assert pruned.token_layer_ratio == original.token_layer_ratio < 1.0
    assert base.decode_tokens_per_s > 0 and pruned.prefill_spread_s[0] <= pruned.prefill_s <= pruned.prefill_spread_s[1]


def test_bench_command_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--shape",
            "llava-tiny",
            "--methods",
            "fastv,feather",
            "--param",
            "feather.layers=[2,4]",
            "--batch",
            "1,2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    labels = [(r["label"], r["batch"]) for r in data["results"]]
    variants = (
        "unpruned",
        "keep-all at layer 2 (engine overhead)",
        "fastv",
        "fastv-original (eager, full map)",
        "feather",
    )
    assert labels == [(label, b) for b in (1, 2) for label in variants]
    overhead = next(r for r in data["results"] if r["label"].startswith("keep-all"))
    assert overhead["ideal_speedup"] == pytest.approx(1.0) and overhead["token_layer_ratio"] == pytest.approx(1.0)
    assert "| feather | 2 |" in (out / "bench.md").read_text()
    assert "prefill speed-up" in capsys.readouterr().out


def test_bench_refuses_a_layout_it_cannot_build():
    import dataclasses

    from vlmprune.cli._common import CommandError
    from vlmprune.cli.bench import _setup
    from vlmprune.cost import get_shape

    three_crops = dataclasses.replace(get_shape("llava-next-tiny"), name="three-crops", images=3)  # not k x k crops
    with pytest.raises(CommandError, match="three-crops: bench builds LLaVA- and Qwen-VL-layout models"):
        _setup(three_crops)


def test_bench_command_rejects_bad_input(capsys):
    assert main(["bench", "--shape", "llava-1.5-13b", "--batch", "1"]) == 2  # 52 GiB of fp32 weights
    assert "needs about" in capsys.readouterr().err
    assert main(["bench", "--shape", "llava-tiny", "--param", "ratio=0.5"]) == 2
    assert "METHOD.KEY=VALUE" in capsys.readouterr().err
    assert main(["bench", "--shape", "llava-tiny", "--methods", "fastvv"]) == 2
    assert "unknown method" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--batch", "0"], "argument --batch: every value must be >= 1"), (["--repeats", "0"], "must be >= 1, got 0")],
)
def test_bench_refuses_empty_runs(args, message, capsys):
    assert main(["bench", "--shape", "llava-tiny", *args]) == 2
    assert message in capsys.readouterr().err
