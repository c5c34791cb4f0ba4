"""FasterVLM, DivPrune, DART and CDPruner: each method's rule against a re-implementation written from its official
code (`tests/official.py`), on hand-built inputs and on the tiny model, and each method through the command line."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import official
import vlmprune
from conftest import random_image
from eval_data import write_refer
from vlmprune.adapters import get_adapter
from vlmprune.cli.main import main
from vlmprune.criteria import Balanced, ConditionalDPP, PivotDissimilarity, SelectionContext
from vlmprune.criteria.base import kept_positions
from vlmprune.criteria.dpp import dpp_greedy_map
from vlmprune.reference import _decoder_inputs

PROMPT = "what is the color of the large object on the left"


def context(rows: list[torch.Tensor], **kwargs) -> SelectionContext:
    """A context over per-sample image rows (n_b, d): their hidden states, left-aligned and zero-padded."""
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return SelectionContext.from_lists(
        [torch.arange(len(r)) for r in rows],
        image_grids=[[(1, len(r))] for r in rows],
        n_original=[len(r) for r in rows],
        hidden_states_fn=lambda: padded,
        **kwargs,
    )


def image_columns(model, inputs) -> torch.Tensor:
    return torch.nonzero(get_adapter(model).image_token_mask(inputs)[0]).flatten()


# --- FasterVLM ---------------------------------------------------------------------------------------------------


def test_fastervlm_keeps_the_top_cls_attention_of_the_feature_layer(models, make_inputs):
    model = models["eager"]
    inputs = make_inputs([PROMPT, "where is the cat"])
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
        with vlmprune.prune(model, vlmprune.build_method("fastervlm", keep=30)) as trace:
            model(**inputs)
    cls_rows = attentions[model.config.vision_feature_layer][:, :, 0, 1:]  # (images, heads, patches)
    assert [k.tolist() for k in trace.stages[0].kept] == [official.fastervlm_keep(r, 30).tolist() for r in cls_rows]


def test_fastervlm_ratio_rounds_as_its_readme():
    method = vlmprune.build_method("fastervlm", keep=None, ratio=0.9)
    assert method.stages()[0].budget.resolve(576, 576) == 58  # "576 * (1 - 0.9) = 58"
    assert vlmprune.build_method("fastervlm", keep=None, ratio=0.95).stages()[0].budget.resolve(576, 576) == 29


# --- DivPrune ----------------------------------------------------------------------------------------------------


def test_divprune_keeps_one_of_each_pair_of_near_duplicates():
    """Eight directions, four pairs 5 degrees apart, 90 degrees between pairs: four picks take one of each pair."""
    angles = torch.tensor([0.0, 5.0, 90.0, 95.0, 180.0, 185.0, 270.0, 275.0]) * math.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    keep = Balanced(attention=0.0, diversity=1.0).select(context([points]), [4])
    assert sorted(k // 2 for k in kept_positions(keep)[0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(4))
def test_divprune_picks_equal_the_official_greedy_in_a_padded_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, 8, generator=generator) for n in (24, 17)]
    budgets = [7, 5]
    keep = vlmprune.build_method("divprune").stages()[0].criterion.select(context(rows), budgets)
    for b, (features, budget) in enumerate(zip(rows, budgets, strict=True)):
        expected = official.divprune_picks(features, budget / len(features)).sort().values
        assert torch.equal(kept_positions(keep)[b], expected)


def test_divprune_keeps_what_the_official_code_keeps_on_the_llm_input(models, make_inputs):
    model = models["sdpa"]
    inputs = make_inputs([PROMPT])
    with torch.no_grad():
        embeds = _decoder_inputs(model, inputs)["embeds"][0, image_columns(model, inputs)]
        with vlmprune.prune(model, vlmprune.build_method("divprune")) as trace:
            model(**inputs)
    expected = official.divprune_picks(embeds, 0.098).sort().values  # the official SUBSET_RATIO
    assert trace.stages[0].n_kept == [14] and torch.equal(trace.stages[0].kept[0], expected)


# --- DART --------------------------------------------------------------------------------------------------------


def test_dart_keeps_the_pivot_and_the_tokens_least_similar_to_it():
    """One image pivot (the largest key norm), two picks: the two tokens pointing away from it."""
    angles = torch.tensor([0.0, 100.0, 170.0, 185.0, 20.0, 60.0]) * math.pi / 180
    states = torch.stack([angles.cos(), angles.sin()], dim=1)
    keys = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0], [9.0]])  # token 5 (at 60 degrees) is the pivot
    ctx = context(
        [states],
        keys_fn=lambda rope: (keys[None], keys[None]),
        instruction_fn=lambda: (states[None], torch.zeros(1, 6, dtype=torch.bool)),
    )
    keep = PivotDissimilarity(pivot_image=1, pivot_text=0).select(ctx, [2])
    assert kept_positions(keep)[0].tolist() == [2, 3, 5]  # 170 and 185 degrees are farthest from 60


def test_dart_keeps_what_get_retained_image_token_keeps(models, make_inputs):
    model = models["eager"]
    layers, adapter = get_adapter(model).layers, get_adapter(model)
    inputs = make_inputs([PROMPT])
    seen = {}

    def before(module, args, kwargs):
        seen.update(input=args[0] if args else kwargs["hidden_states"], cos_sin=kwargs["position_embeddings"])

    def after(module, args, output):
        seen["output"] = output[0] if isinstance(output, tuple) else output

    handles = [layers[1].register_forward_pre_hook(before, with_kwargs=True), layers[1].register_forward_hook(after)]
    try:
        with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("dart")) as trace:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        _, keys = official.qk(layers[1], seen["input"], seen["cos_sin"], rope=True)
        state = adapter.final_norm(seen["output"])[0]
    start = int(image_columns(model, inputs)[0])
    budget = round(144 * (1 - 0.778))  # the code's max_num_trunction: 32 of 144
    order = official.dart_pivot_order(keys[0], start, 144, (4, 4))
    expected = official.dart_keep(state, keys[0], start, 144, budget, pivot_order=order)
    assert trace.stages[0].n_kept == [4 + 8 * (budget // 8)]
    assert torch.equal(trace.stages[0].kept[0], expected)


# --- CDPruner ----------------------------------------------------------------------------------------------------


def _kernel(seed: int, n: int, rank: int) -> torch.Tensor:
    x = torch.randn(n, rank, generator=torch.Generator().manual_seed(seed))
    return x @ x.T


@pytest.mark.parametrize("seed", range(5))
def test_greedy_map_adds_the_token_that_maximises_the_determinant_at_each_step(seed):
    kernel = _kernel(seed, 7, 7)
    order = dpp_greedy_map(kernel[None], torch.ones(1, 7, dtype=torch.bool), 4)[0].tolist()
    chosen: list[int] = []
    for _ in range(4):
        gains = {j: torch.det(kernel[[*chosen, j]][:, [*chosen, j]]) for j in range(7) if j not in chosen}
        chosen.append(max(gains, key=lambda j: gains[j]))
    assert order == chosen


def test_greedy_map_finds_the_largest_determinant_of_a_small_case():
    """Two near-duplicate pairs and an outlier: of all pairs, the determinant is largest for two distinct tokens."""
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 0.99], [0.7, 0.7]])
    kernel = x @ x.T
    best = max(itertools.combinations(range(5), 2), key=lambda s: torch.det(kernel[list(s)][:, list(s)]))
    order = dpp_greedy_map(kernel[None], torch.ones(1, 5, dtype=torch.bool), 2)[0]
    assert sorted(order.tolist()) == sorted(best)


@pytest.mark.parametrize("seed", range(3))
def test_cdpruner_keeps_what_its_encode_images_keeps(seed):
    generator = torch.Generator().manual_seed(seed)
    features, text = torch.randn(20, 16, generator=generator), torch.randn(5, 16, generator=generator)
    rows = torch.cat([torch.randn(3, 16, generator=generator), text])[None]  # 3 other rows, then the instruction
    instruction = torch.tensor([[False] * 3 + [True] * 5])
    ctx = context([features], instruction_fn=lambda: (rows, instruction))
    keep = ConditionalDPP().select(ctx, [6])
    assert torch.equal(kept_positions(keep)[0], official.cdpruner_keep(features, features, text, 6))


def test_cdpruner_keeps_each_samples_picks_when_another_sample_has_a_larger_budget_than_it_has_tokens():
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(12, 16, generator=generator), torch.randn(4, 16, generator=generator)]
    text = torch.randn(1, 3, 16, generator=generator).expand(2, -1, -1)
    ctx = context(rows, instruction_fn=lambda: (text, torch.ones(2, 3, dtype=torch.bool)))
    keep = ConditionalDPP().select(ctx, [8, 2])  # sample 1 runs out of tokens after 4 of the 8 greedy steps
    alone = context([rows[1]], instruction_fn=lambda: (text[:1], torch.ones(1, 3, dtype=torch.bool)))
    assert keep.sum(dim=1).tolist() == [8, 2]
    assert torch.equal(keep[1, :4], ConditionalDPP().select(alone, [2])[0])


def test_cdpruner_keeps_what_the_official_code_keeps_on_the_llm_input(models, make_inputs):
    model = models["sdpa"]
    inputs = make_inputs([PROMPT])
    columns = image_columns(model, inputs)
    with torch.no_grad():
        embeds = _decoder_inputs(model, inputs)["embeds"][0]
        with vlmprune.prune(model, vlmprune.build_method("cdpruner", keep=40)) as trace:
            model(**inputs)
    image, text = embeds[columns], embeds[int(columns[-1]) + 1 :]
    assert torch.equal(trace.stages[0].kept[0], official.cdpruner_keep(image, image, text, 40))


def test_cdpruner_in_a_padded_batch_keeps_each_samples_own_picks(models, make_inputs):
    model = models["sdpa"]
    method = vlmprune.build_method("cdpruner", keep=30)
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        model(**make_inputs([PROMPT, "where is the cat"]))
        together = [k.tolist() for k in trace.stages[0].kept]
        for b, prompt in enumerate([PROMPT, "where is the cat"]):
            model(**make_inputs([prompt], seeds=[b]))
            assert trace.stages[0].kept[0].tolist() == together[b]


# --- VisionZip and pooling: merged tokens -------------------------------------------------------------------------


def test_visionzip_tokens_are_the_official_dominant_and_contextual_tokens(models, make_inputs):
    """The merged states the trace records equal `CLIPVisionTower_VisionZip.forward`'s, token by token (without
    its [CLS], which the language model does not get here): 34 dominant patches and 6 contextual tokens."""
    model = models["eager"]
    adapter = get_adapter(model)
    inputs = make_inputs([PROMPT])
    layer = adapter.vision_attention_layer
    seen = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args: seen.update(layer_input=args[0])),
        adapter.vision_feature_module.register_forward_pre_hook(lambda m, args: seen.update(features=args[0])),
    ]
    try:
        with torch.no_grad():
            out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
            with vlmprune.prune(model, vlmprune.build_method("visionzip", keep=40)) as trace:
                model(**inputs)
            attn = layer.self_attn
            keys = attn.k_proj(layer.layer_norm1(seen["layer_input"]))[0]
            metric = keys.view(keys.shape[0], -1, attn.head_dim).mean(dim=1)  # `raw_key_states.mean(1)`
    finally:
        for handle in handles:
            handle.remove()
    feature_layer = model.config.vision_feature_layer
    tokens, indices = official.visionzip_tokens(
        out.hidden_states[feature_layer][0], out.attentions[feature_layer][0], metric, 34, 6
    )
    patches = indices[1:] - 1  # the dominant patches, as image-token indices
    rest = [i for i in range(144) if i not in set(patches.tolist())]
    step = max(1, len(rest) // 6)
    targets = [rest[t] for t in range(0, len(rest), step)[:6]]
    expected = dict(zip(sorted(patches.tolist()) + targets, list(tokens[1:]), strict=True))
    stage = trace.stages[0]
    assert stage.kept[0].tolist() == sorted(expected) and stage.merge_space == "vision_features"
    features = seen["features"][0]
    for kept, (ids, weights) in zip(stage.kept[0].tolist(), stage.sources[0], strict=True):
        merged = (weights[:, None] * features[ids]).sum(dim=0)
        torch.testing.assert_close(merged, expected[kept], atol=1e-5, rtol=1e-5)


def test_pooling_averages_each_window_into_its_first_token(models, make_inputs):
    model = models["sdpa"]
    for size, windows in ((2, 36), (5, 9)):  # 12 x 12: 6 x 6 windows of 2 x 2; 3 x 3 windows of 5 x 5 (ceil)
        with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("pooling", size=size)) as trace:
            model(**make_inputs([PROMPT]))
        stage = trace.stages[0]
        assert stage.n_kept == [windows]
        first, last = stage.sources[0][0], stage.sources[0][-1]
        assert first[0].tolist() == [r * 12 + c for r in range(size) for c in range(size)]
        assert torch.allclose(first[1], torch.full((size * size,), 1 / size**2))
        corner = 12 - (12 // size) * size or size  # the last window's side
        assert stage.kept[0][-1].item() == (12 - corner) * 12 + 12 - corner and len(last[0]) == corner**2


def test_a_merging_trace_says_which_tokens_fed_each_kept_one(models, make_inputs):
    with torch.no_grad(), vlmprune.prune(models["sdpa"], vlmprune.build_method("pooling", size=3)) as trace:
        models["sdpa"](**make_inputs([PROMPT, "where is the cat"]))
    saved = trace.to_dict()["stages"][0]
    assert saved["merge_space"] == "hidden" and len(saved["sources"]) == 2 and len(saved["sources"][1]) == 16
    assert saved["sources"][0][1]["ids"] == [3, 4, 5, 15, 16, 17, 27, 28, 29]
    assert saved["sources"][0][1]["weights"] == pytest.approx([1 / 9] * 9)
    assert "merged into 16/144, 16/144 image tokens" in trace.summary()


# --- every method through the command line ------------------------------------------------------------------------


BASELINE_PARAMS = [
    ("fastervlm", "keep=40"),
    ("divprune", "ratio=0.75"),
    ("dart", "keep=32"),
    ("cdpruner", "keep=40"),
    ("visionzip", "keep=40"),
    ("pooling", "size=3"),
    ("sparsevlm", "layers=[1,2,3]"),
]


@pytest.mark.parametrize(("name", "param"), BASELINE_PARAMS)
def test_generate_compare_viz_and_bench_run_each_baseline(name, param, small_model_dir, tmp_path, capsys):
    random_image(0).save(tmp_path / "image.png")
    trace = tmp_path / "trace.json"
    args = ["generate", "--model", small_model_dir, "--image", str(tmp_path / "image.png"), "--prompt", "what is it"]
    assert main([*args, "--method", name, "--param", param, "--save-trace", str(trace)]) == 0
    assert json.loads(trace.read_text())["method"]["name"] == name
    data, out = write_refer(tmp_path / "data", n_refs=2), tmp_path / "compare"
    matched = name != "pooling"  # pooling's grid fixes its count: nothing to match closely
    compare = ["compare", "--model", small_model_dir, "--methods", name, "--param", f"{name}.{param}"]
    compare += ["--match-flops", "0.5"] if matched else []
    where = ["--tasks", "refcoco", "--data", str(data), "--out", str(out), "--batch-size", "2"]
    assert main([*compare, *where, "--max-new-tokens", "4"]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["unpruned", name]
    assert abs(rows[1]["flops_reduction"] - 0.5) < 0.03 if matched else rows[1]["flops_reduction"] > 0.5
    records = [json.loads(line) for line in (out / name / "samples.jsonl").read_text().splitlines()]
    assert ("merged" in records[0]["stages"][0]) == (name in ("visionzip", "pooling", "sparsevlm"))
    pytest.importorskip("matplotlib")
    assert main(["viz", "--run", str(out / name), "--out", str(tmp_path / "viz"), "--samples", "1"]) == 0
    bench = ["bench", "--shape", "llava-tiny", "--methods", name, "--param", f"{name}.{param}", "--batch", "2"]
    bench += ["--repeats", "1"]
    assert main([*bench, "--warmup", "0", "--new-tokens", "2", "--out", str(tmp_path / "bench")]) == 0
    measured = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert any(r["label"] == name for r in measured["results"])
    assert main(["flops", "--model", "llava-1.5-7b", "--method", name, "--text-tokens", "35"]) == 0
