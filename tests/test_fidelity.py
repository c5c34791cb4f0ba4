"""vlmprune's selections against independent re-implementations of the official codes (issue 16).

`tests/official.py` re-implements each official rule from its source file; these tests run both on the same
hand-built inputs (a random bf16 decoder layer, random vision features, counts) and on a bf16 tiny LLaVA:
the φKNN count and its k shrink, the score precision, each method's budget rounding, and FastV's paper query.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import official
import vlmprune
from helpers import BareAdapter
from vlmprune.budget import Keep, round_budget
from vlmprune.cli.main import main
from vlmprune.cost import TokenSchedule, estimate, get_shape
from vlmprune.criteria import Attention, KnnDensity, SelectionContext
from vlmprune.criteria.base import kept_positions
from vlmprune.engine import probe as probe_module
from vlmprune.engine.layout import Layout
from vlmprune.engine.probe import AttentionProbe
from vlmprune.testing import build_tiny_llava

SIDE, BEFORE, AFTER = 6, 4, 7  # a 6 x 6 image between 4 and 7 text tokens
N_IMAGE = SIDE * SIDE
IMAGE = slice(BEFORE, BEFORE + N_IMAGE)


def _layer(dtype: torch.dtype, seed: int = 0):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = LlamaDecoderLayer(config, layer_idx=0)
        for p in layer.parameters():
            p.data.normal_(0, 0.5)
        hidden = torch.randn(1, BEFORE + N_IMAGE + AFTER, 64)
    return config, layer.to(dtype), hidden.to(dtype)


def _probe(config, layer, hidden) -> tuple[AttentionProbe, tuple[torch.Tensor, torch.Tensor]]:
    n = hidden.shape[1]
    image_id = torch.full((1, n), -1)
    image_id[0, IMAGE] = torch.arange(N_IMAGE)
    positions = torch.arange(n)[None]
    layout = Layout(
        source=positions,
        valid=torch.ones(1, n, dtype=torch.bool),
        image_id=image_id,
        position_ids=positions,
        n_real=[n],
        n_image=[N_IMAGE],
    )
    cos_sin = LlamaRotaryEmbedding(config)(hidden, positions)
    return AttentionProbe(BareAdapter(None), layer, hidden, layout, cos_sin), cos_sin


# 1. φKNN: the official count, and the official k shrink -------------------------------------------------------


def test_knn_keeps_the_official_196_tokens_and_reports_the_papers_66_percent():
    method = vlmprune.build_method("knn")
    assert method.keep == 196 and method.stages()[0].budget == Keep.count(196)
    prismatic = get_shape("prismatic-7b")
    report = estimate(prismatic, TokenSchedule.from_method(method, prismatic), "paper")
    assert math.floor(report.reduction * 100) == 66  # 66.9%: the paper truncates (FastV K=3 R=75%: 68.6% -> 68%)
    at_k8 = vlmprune.build_method("knn", layer=8)
    assert math.floor(estimate(prismatic, TokenSchedule.from_method(at_k8, prismatic), "paper").reduction * 100) == 55


def test_knn_takes_a_ratio_instead_only_without_the_count(capsys):
    by_ratio = vlmprune.build_method("knn", keep=None, ratio=0.75)
    assert by_ratio.stages()[0].budget.resolve(729, 729) == official.budget_feather_generic(729, 0.75) == 182
    with pytest.raises(vlmprune.ParameterError, match="keep=None with ratio"):
        vlmprune.build_method("knn", ratio=0.75)
    assert main(["flops", "--model", "prismatic-7b", "--method", "knn"]) == 0
    paper_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("paper "))
    assert paper_row.split()[-1] == "66.9%"


def _features(seed: int, n: int = 30, channels: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, channels, generator=generator) * 3
    return centres[torch.randint(0, 4, (n,), generator=generator)] + torch.randn(n, channels, generator=generator)


def _knn_context(features: list[torch.Tensor]) -> SelectionContext:
    ids = [torch.arange(len(f)) for f in features]
    return SelectionContext.from_lists(
        ids,
        image_grids=[[(1, len(f))] for f in features],
        n_original=[len(f) for f in features],
        vision_features_fn=lambda: features,
    )


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5, 6, 9])
def test_knn_shrinks_k_below_five_kept_tokens_as_the_official_code(budget):
    shrunk_differs = False
    for seed in range(12):
        features = _features(seed)
        ctx = _knn_context([features])
        kept = kept_positions(KnnDensity(k=5).select(ctx, [budget]))[0]
        assert torch.equal(kept, official.dpc_knn_keep(features, budget, k=5)), f"seed {seed}"
        fixed = kept_positions(KnnDensity(k=5, shrink_k=False).select(ctx, [budget]))[0]
        shrunk_differs |= not torch.equal(fixed, kept)
    assert shrunk_differs == (budget < 5)  # the shrink changes picks exactly where it applies


def test_knn_shrinks_k_per_sample_in_a_padded_batch():
    features = [_features(1, n=30), _features(2, n=22)]
    ctx = _knn_context(features)
    kept = kept_positions(KnnDensity(k=5).select(ctx, [3, 8]))
    assert torch.equal(kept[0], official.dpc_knn_keep(features[0], 3))
    assert torch.equal(kept[1], official.dpc_knn_keep(features[1], 8))


# 2. Score precision: the official codes round the probabilities to the model's dtype ------------------------

POLICIES = {  # method: (Attention policy, the official rule's arguments)
    "fastv": ({"query": "last", "softmax": "sequence", "rope": True}, {"softmax": "sequence", "rope": True}),
    "pdrop": ({"query": "last", "softmax": "sequence", "rope": True}, {"softmax": "sequence", "rope": True}),
    "feather": ({"query": "last", "softmax": "image", "rope": False}, {"softmax": "image", "rope": False}),
}


@pytest.mark.parametrize("method", list(POLICIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_dtype_scores_equal_the_official_bf16_rounding_bit_for_bit(method, seed):
    policy, rule = POLICIES[method]
    config, layer, hidden = _layer(torch.bfloat16, seed)
    probe, cos_sin = _probe(config, layer, hidden)
    with torch.no_grad():
        ours = probe(policy["query"], policy["softmax"], policy["rope"], score_dtype="model")[0]
        reference = official.attention_scores(layer, hidden, cos_sin, IMAGE, **rule)
        exact = probe(policy["query"], policy["softmax"], policy["rope"], score_dtype="float32")[0]
        reference32 = official.attention_scores(layer, hidden, cos_sin, IMAGE, **rule, dtype=torch.float32)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference)
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, reference32, rtol=1e-5, atol=1e-7)
    assert vlmprune.build_method(method).parameters()["score_dtype"] == "model"  # the official rounding by default


def test_model_dtype_is_float32_on_a_float32_layer():
    config, layer, hidden = _layer(torch.float32)
    probe, _ = _probe(config, layer, hidden)
    with torch.no_grad():
        torch.testing.assert_close(probe("last", "image", False, score_dtype="model"), probe("last", "image", False))


def test_text_queries_are_averaged_in_the_model_dtype_as_pdrop_trains():
    config, layer, hidden = _layer(torch.bfloat16, 3)
    probe, cos_sin = _probe(config, layer, hidden)
    text = list(range(BEFORE + N_IMAGE, hidden.shape[1]))
    with torch.no_grad():
        ours = probe("text_mean", "sequence", True, score_dtype="model")[0]
        reference = official.attention_scores(
            layer, hidden, cos_sin, IMAGE, softmax="sequence", rope=True, queries=text
        )
    assert torch.equal(ours, reference)


@pytest.fixture(scope="module")
def bf16_model(tiny_config):
    return build_tiny_llava(tiny_config, seed=0).to(torch.bfloat16)


def _pruned_run_seen_by(model, method, inputs, stage):
    """The trace of a pruned forward, and (hidden, (cos, sin)) the scoring layer of `stage` scored from.

    Read at layer `stage.layer - 1` by hooks installed after vlmprune's own: its input for `scoring="before"`,
    its output (the next layer's input before the cut) for `"after"`; the position embeddings that layer used.
    """
    seen = {}
    layer = model.model.language_model.layers[stage.layer - 1]

    def before(module, args, kwargs):
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["cos_sin"] = tuple(t.clone() for t in kwargs["position_embeddings"])

    def after(module, args, kwargs, output):
        seen["output"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        handles = [
            layer.register_forward_pre_hook(before, with_kwargs=True),
            layer.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    return trace, seen["input" if stage.scoring == "before" else "output"], seen["cos_sin"]


CASES = {  # method parameters on the 6-layer tiny model
    "fastv": {"layer": 2, "ratio": 0.67},
    "pdrop": {"layers": (1, 3, 5)},
    "feather": {"layers": (2, 4), "ratio": 0.5},
}


def _official_budget(method: str, params: dict, stage: int, n: int, n_current: int) -> int:
    if method == "fastv":
        return official.budget_fastv(n, params["ratio"])
    if method == "pdrop":
        return official.budget_pdrop(n, [0.5, 0.25, 0.125], stage)
    return official.budget_feather(n_current, params["ratio"], stage)


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("prompt", ["where is the cat", "what is the color of the large object on the left"])
def test_a_bf16_model_keeps_what_the_official_rule_keeps_at_every_stage(bf16_model, make_inputs, method, prompt):
    """Each stage's kept set equals the official rule on the hidden states its scoring layer received."""
    params, (_, rule) = CASES[method], POLICIES[method]
    model, inputs = bf16_model, make_inputs([prompt])
    built = vlmprune.build_method(method, **params)
    image_start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    for s, stage in enumerate(built.stages()):
        trace, hidden, cos_sin = _pruned_run_seen_by(model, built, inputs, stage)
        n = trace.image_tokens[0]
        previous = trace.stages[s - 1].kept[0] if s else torch.arange(n)
        layer = model.model.language_model.layers[stage.scoring_layer]
        image = slice(image_start, image_start + len(previous))
        with torch.no_grad():
            scores = official.attention_scores(layer, hidden, cos_sin, image, **rule)
        expected = previous[official.top(scores, _official_budget(method, params, s, n, len(previous)))]
        if method == "feather" and s == 0:  # united with the stride-3 grid of the 12 x 12 image
            grid = (torch.arange(0, 12, 3)[:, None] * 12 + torch.arange(0, 12, 3)[None, :]).flatten()
            expected = torch.unique(torch.cat([expected, grid]))
        assert torch.equal(trace.stages[s].kept[0], expected), f"stage {s}"


def test_float32_scoring_of_a_bf16_model_picks_differently_from_the_official_rounding(bf16_model, make_inputs):
    """The option is not a no-op: in bf16 the official rounding ties and reorders scores that float32 separates."""
    inputs = make_inputs(["what is the color of the large object on the left"])
    kept = {}
    for dtype in ("model", "float32"):
        with torch.no_grad(), vlmprune.prune(bf16_model, vlmprune.build_method("fastv", score_dtype=dtype)) as trace:
            bf16_model(**inputs)
        kept[dtype] = set(trace.stages[0].kept[0].tolist())
    assert kept["model"] != kept["float32"]


# 3. Budget rounding: each method rounds as its code does -------------------------------------------------------


def test_round_budget_rules_on_the_cases_where_they_part():
    assert round_budget(576 * (1 - 0.7), "round") == round(576 * (1 - 0.7)) == 173
    assert round_budget(576 * (1 - 0.7), "int") == 172
    assert round_budget(2880 * (1 - 0.3), "int") == int(2880 * (1 - 0.3)) == 2015
    assert round_budget(2880 * (1 - 0.3), "floor") == 2016
    assert round_budget(2.5, "round") == 2  # Python's round: halves to even, as the llava-hf fork's `round`


def test_fastv_rounds_as_the_llava_hf_fork():
    budget = vlmprune.build_method("fastv", ratio=0.7).stages()[0].budget
    assert budget.resolve(576, 576) == official.budget_fastv(576, 0.7) == 173


def test_int_of_the_float_product_on_2880_tokens():
    for method, params in [("knn", {"keep": None, "ratio": 0.3}), ("random", {"ratio": 0.3})]:
        budget = vlmprune.build_method(method, **params).stages()[0].budget
        assert budget.resolve(2880, 2880) == official.budget_feather_generic(2880, 0.3) == 2015
    first = vlmprune.build_method("feather", ratio=0.3).stages()[0].budget
    assert first.resolve(2880, 2880) == official.budget_feather(2880, 0.3, 0) == 2015


def test_feather_second_stage_rounds_its_squared_ratio_as_the_code():
    second = vlmprune.build_method("feather", ratio=0.15).stages()[1].budget
    assert second.resolve(729, 400) == official.budget_feather(400, 0.15, 1) == 288  # floor(x + 1e-6) gives 289


@pytest.mark.parametrize("n", [144, 576, 729, 2880])
def test_every_budget_equals_its_official_expression(n):
    ratios = [round(0.01 * i, 2) for i in range(100)]
    for ratio in ratios:
        fastv = vlmprune.build_method("fastv", ratio=ratio).stages()[0].budget
        assert fastv.resolve(n, n) == official.budget_fastv(n, ratio), ratio
        feather = vlmprune.build_method("feather", ratio=ratio).stages()
        for current in (n, n // 2 + 7):
            assert feather[0].budget.resolve(n, current) == official.budget_feather(current, ratio, 0), ratio
            assert feather[1].budget.resolve(n, current) == official.budget_feather(current, ratio, 1), ratio
    pdrop = vlmprune.build_method("pdrop").stages()
    for s, stage in enumerate(pdrop):
        assert stage.budget.resolve(n, n) == official.budget_pdrop(n, [0.5, 0.25, 0.125], s)


def test_fastv_keeps_the_rounded_count_in_a_forward(models, make_inputs):
    """144 · (1 − 0.67) = 47.52: the llava-hf fork keeps 48 where `int()` keeps 47."""
    with torch.no_grad(), vlmprune.prune(models["sdpa"], vlmprune.build_method("fastv", ratio=0.67)) as trace:
        models["sdpa"](**make_inputs(["where is the cat", "is it red"]))
    assert trace.stages[0].n_kept == [48, 48] == [official.budget_fastv(144, 0.67)] * 2


# 4. FastV's paper query: the attention a token receives from all other tokens -------------------------------


@pytest.mark.parametrize("chunk", [256, 7])
def test_query_all_is_the_average_attention_received_from_every_other_token(chunk, monkeypatch):
    monkeypatch.setattr(probe_module, "_CHUNK", chunk)  # 7 rows at a time: the chunks must add up to the same
    config, layer, hidden = _layer(torch.float32, 4)
    probe, cos_sin = _probe(config, layer, hidden)
    with torch.no_grad():
        ours = probe("all", "sequence", True)[0]
        reference = official.received_from_all(layer, hidden, cos_sin, IMAGE, rope=True)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(ours, probe("last", "sequence", True)[0])


def test_fastv_paper_query_runs_batched_and_padded_as_each_sample_alone(models, make_inputs):
    method = vlmprune.build_method("fastv", query="all")
    prompts = ["where is the cat", "what is the color of the large object on the left"]
    model = models["sdpa"]
    with torch.no_grad(), vlmprune.prune(model, method) as batched:
        model(**make_inputs(prompts))
    for b, prompt in enumerate(prompts):
        with torch.no_grad(), vlmprune.prune(model, method) as alone:
            model(**make_inputs([prompt], seeds=[b]))
        assert torch.equal(batched.stages[0].kept[b], alone.stages[0].kept[0])
    assert "all" in Attention.__doc__ and "paper" in vlmprune.methods.FastV.__doc__
