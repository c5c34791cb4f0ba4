"""The engine against independent references, on a tiny random LLaVA (6 layers, 12 x 12 image grid)."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from helpers import renumber_flags
from vlmprune.methods import METHODS
from vlmprune.reference import (
    positions_from_mask,
    pre_llm_greedy,
    pre_llm_logits,
    reference_greedy,
    reference_logits,
)

# Every registered method, with parameters that fit a 6-layer model; extra rows cover policy variants.
METHOD_CASES = {
    "fastv": ("fastv", {}),
    "fastv-text-mean-renumbered": (
        "fastv",
        {"layer": 3, "ratio": 0.75, "query": "text_mean", "positions": "renumbered"},
    ),
    "fastv-no-rope-image-softmax": ("fastv", {"rope": False, "softmax": "image"}),
    "fastv-layer0-scored-after": ("fastv", {"layer": 0, "scoring": "after"}),
    "pdrop": ("pdrop", {"layers": (2, 3, 5)}),
    "pdrop-original-positions": ("pdrop", {"layers": (1, 4), "positions": "original", "scoring": "before"}),
    "feather": ("feather", {"layers": (2, 4)}),
    "feather-top-up": ("feather", {"layers": (2, 4), "top_up": True}),
    "feather-adjacent-stages": ("feather", {"layers": (2, 3)}),
    "random": ("random", {}),
    "uniform": ("uniform", {"layer": 2}),
    "pdrop-token-counts": ("pdrop", {"layers": (2, 3, 5), "keep": 15}),
    "feather-token-counts": ("feather", {"layers": (2, 4), "keep": (30, 12)}),
    "knn": ("knn", {"layer": 2, "keep": 40}),  # the official 196 needs more image tokens than the tiny model has
    "knn-ratio": ("knn", {"layer": 2, "keep": None, "ratio": 0.75}),
    "btp": ("btp", {"layers": (1, 2, 3, 4)}),
    "btp-paper-renumbered": ("btp", {"variant": "paper", "layers": (2, 3, 4, 5), "positions": "renumbered"}),
    "vispruner": ("vispruner", {}),
    "vispruner-original-positions-odd-residual": (
        "vispruner",
        {"keep": 41, "important_ratio": 0.3, "positions": "original"},
    ),
    "vispruner-ratio": ("vispruner", {"keep": None, "ratio": 0.75}),
    "fastervlm": ("fastervlm", {"keep": 40}),
    "fastervlm-ratio-original-positions": ("fastervlm", {"keep": None, "ratio": 0.9, "positions": "original"}),
    "divprune": ("divprune", {}),
    "divprune-count-original-positions": ("divprune", {"keep": 30, "ratio": None, "positions": "original"}),
    "dart": ("dart", {}),
    "dart-layer3-renumbered-no-rope": (
        "dart",
        {"layer": 3, "ratio": 0.5, "positions": "renumbered", "key_rope": False},
    ),
    "cdpruner": ("cdpruner", {"keep": 40}),
    "cdpruner-ratio-theta": ("cdpruner", {"keep": None, "ratio": 0.8, "theta": 0.5, "positions": "original"}),
    "visionzip": ("visionzip", {}),
    "visionzip-ratio-original-positions": ("visionzip", {"keep": None, "ratio": 0.7, "positions": "original"}),
    "pooling": ("pooling", {}),
    "pooling-3x3-vision-features": ("pooling", {"size": 3, "space": "vision_features"}),
    "pooling-5x5-original-positions": ("pooling", {"size": 5, "positions": "original"}),
    "sparsevlm": ("sparsevlm", {"layers": (2, 3, 5), "keep": 64}),  # the official layers 3, 7, 16 need 17 layers
    "sparsevlm-adaptive-original-positions": (
        "sparsevlm",
        {"layers": (2, 4), "adaptive": True, "positions": "original"},
    ),
    "sparsevlm-counts-no-recycling": ("sparsevlm", {"layers": (1, 4), "counts": (50, 20), "recycle": False}),
}
assert {name for name, _ in METHOD_CASES.values()} == set(METHODS), "every method needs a row"

PROMPTS = ["what is the color of the large object on the left", "where is the cat"]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_pruned_forward_equals_masked_reference(models, make_inputs, backend, case):
    model = models[backend]
    name, params = METHOD_CASES[case]
    method = vlmprune.build_method(name, **params)
    inputs = make_inputs(PROMPTS)
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        logits = model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits
    assert len(trace.stages) == len(method.stages())
    reference = reference_logits(model, inputs, trace, renumber_flags(method, len(trace.tokens_per_layer[0])))
    rows = trace.output_index
    for b in range(rows.shape[0]):
        real = rows[b] >= 0
        torch.testing.assert_close(logits[b, real], reference[b, rows[b, real]], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_greedy_generation_equals_masked_reference(models, make_inputs, backend, case):
    model = models[backend]
    name, params = METHOD_CASES[case]
    method = vlmprune.build_method(name, **params)
    inputs = make_inputs(PROMPTS)
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    expected = reference_greedy(
        model, inputs, trace, renumber_flags(method, model.config.text_config.num_hidden_layers), 8
    )
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_generation_on_a_static_cache_equals_masked_reference(models, make_inputs, backend, case):
    """A static cache's layers each keep their own (pruned) length; decoding masks the slots they do not use."""
    model = models[backend]
    name, params = METHOD_CASES[case]
    method = vlmprune.build_method(name, **params)
    inputs = make_inputs(PROMPTS)
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
    expected = reference_greedy(
        model, inputs, trace, renumber_flags(method, model.config.text_config.num_hidden_layers), 8
    )
    assert torch.equal(generated[:, inputs["input_ids"].shape[1] :], expected)


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_padded_batch_equals_samples_run_alone(models, make_inputs, case):
    model = models["sdpa"]
    name, params = METHOD_CASES[case]
    method = vlmprune.build_method(name, **params)
    batch = make_inputs(PROMPTS, seeds=[0, 1])
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        together = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1] :]
        kept_together = [[k.tolist() for k in stage.kept] for stage in trace.stages]
        for b, (prompt, seed) in enumerate(zip(PROMPTS, [0, 1], strict=True)):
            single = make_inputs([prompt], seeds=[seed])
            alone = model.generate(**single, max_new_tokens=8, do_sample=False)[:, single["input_ids"].shape[1] :]
            assert torch.equal(together[b], alone[0]), f"sample {b} differs"
            assert [stage.kept[0].tolist() for stage in trace.stages] == [k[b] for k in kept_together]


# the cases that prune once, before the language model
PRE_LLM_CASES = [
    case
    for case, (name, params) in METHOD_CASES.items()
    if [s.layer for s in vlmprune.build_method(name, **params).stages()] == [0]
]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", PRE_LLM_CASES)
def test_pruning_before_the_llm_equals_the_llm_run_on_the_kept_embeddings_alone(models, make_inputs, backend, case):
    model = models[backend]
    name, params = METHOD_CASES[case]
    method = vlmprune.build_method(name, **params)
    renumber = method.stages()[0].positions == "renumbered"
    inputs = make_inputs(PROMPTS)
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        logits = model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert [t.item() for t in trace.tokens_per_layer[:, 0]] == [t.item() for t in trace.tokens_per_layer[:, -1]]
    expected = pre_llm_logits(model, inputs, trace, renumber)
    rows = trace.output_index
    for b, (columns, reference) in enumerate(expected):
        real = rows[b] >= 0
        assert torch.equal(rows[b, real], columns)
        torch.testing.assert_close(logits[b, real], reference, atol=2e-4, rtol=1e-4)
    for b, tokens in enumerate(pre_llm_greedy(model, inputs, trace, renumber, 6)):
        assert torch.equal(generated[b], tokens), f"sample {b}"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_keeping_every_token_changes_nothing(models, make_inputs, backend):
    model = models[backend]
    inputs = make_inputs(PROMPTS)
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        for method in (
            vlmprune.build_method("fastv", ratio=0.0),
            vlmprune.build_method("pdrop", layers=(1, 3), keep_fractions=(1.0, 1.0), positions="original"),
        ):
            with vlmprune.prune(model, method) as trace:
                logits = model(**inputs).logits
                tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            assert all(k == n for s in trace.stages for k, n in zip(s.n_kept, s.n_before, strict=True))
            real = inputs["attention_mask"].bool()
            torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
            assert torch.equal(tokens, expected_tokens)


def test_fastv_keeps_the_top_tokens_of_the_eager_attention_map(models, make_inputs):
    """FastV as originally written: layer K-1's attention weights, head mean, last row, top-k image columns."""
    model = models["eager"]
    inputs = make_inputs(PROMPTS[:1])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
        image = inputs["input_ids"][0] == model.config.image_token_id
        for layer, ratio, scoring in ((2, 0.5, "before"), (3, 0.75, "before"), (2, 0.5, "after")):
            scoring_layer = layer - 1 if scoring == "before" else layer
            scores = attentions[scoring_layer][0].mean(0)[-1, image]
            expected = torch.topk(scores, int(image.sum() * (1 - ratio))).indices.sort().values
            method = vlmprune.build_method("fastv", layer=layer, ratio=ratio, scoring=scoring)
            with vlmprune.prune(model, method) as trace:
                model(**inputs)
            assert torch.equal(trace.stages[0].kept[0], expected)


def test_trace_counts_tokens_per_layer(models, make_inputs):
    model = models["sdpa"]
    inputs = make_inputs(PROMPTS)
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("pdrop", layers=(2, 3, 5))) as trace:
        model(**inputs)
    real = inputs["attention_mask"].sum(1)
    text = real - 144
    assert trace.image_tokens == [144, 144]
    expected_image = torch.tensor([144, 144, 72, 36, 36, 18])
    assert torch.equal(trace.image_tokens_per_layer, expected_image.expand(2, -1))
    assert torch.equal(trace.tokens_per_layer, text[:, None] + expected_image)
    assert trace.stages[0].grid == (12, 12)
    assert [s.layer for s in trace.stages] == [2, 3, 5]
    assert all(torch.all(k[1:] > k[:-1]) for s in trace.stages for k in s.kept)


def test_feather_counts_may_differ_between_samples(models, make_inputs):
    model = models["sdpa"]
    inputs = make_inputs(PROMPTS)
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("feather", layers=(2, 4))) as trace:
        model(**inputs)
    first = trace.stages[0]
    grid = {r * 12 + c for r in range(0, 12, 3) for c in range(0, 12, 3)}
    for kept in first.kept:
        assert grid <= set(kept.tolist())
        assert int(144 * 0.3) <= kept.numel() <= int(144 * 0.3) + len(grid)
    second = trace.stages[1]
    assert second.n_kept == [int(n * 0.09 + 1e-6) for n in first.n_kept]


def test_several_images_in_one_prompt(models, processor):
    from conftest import random_image

    model = models["sdpa"]
    text = ["USER: <image>\n<image>\ncompare the two pictures ASSISTANT:"]
    inputs = dict(processor(images=[[random_image(0), random_image(1)]], text=text, return_tensors="pt"))
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("fastv", ratio=0.75)) as trace:
        model(**inputs)
    stage = trace.stages[0]
    assert stage.image_grids == [[(12, 12), (12, 12)]]
    assert stage.n_before == [288] and stage.n_kept == [72]


@pytest.mark.parametrize(
    "policy",
    [{}, {"query": "text_mean"}, {"softmax": "image", "rope": False}, {"softmax": "none"}, {"scoring": "after"}],
)
def test_scores_from_query_rows_equal_scores_from_the_whole_attention_map(models, make_inputs, policy):
    model, inputs = models["sdpa"], make_inputs(PROMPTS)
    kept = []
    for full_map in (False, True):
        with (
            torch.no_grad(),
            vlmprune.prune(model, vlmprune.build_method("fastv", full_map=full_map, **policy)) as trace,
        ):
            model(**inputs)
        kept.append([k.tolist() for k in trace.stages[0].kept])
    assert kept[0] == kept[1]
