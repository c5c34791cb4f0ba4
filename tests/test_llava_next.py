"""LLaVA-NeXT: every method against the oracles on a tiny random model, images of different aspect ratios batched."""

from __future__ import annotations

import inspect

import pytest
import torch

import vlmprune
from conftest import random_image
from family_oracles import *  # noqa: F403 (the oracle tests every family runs)
from family_oracles import Family
from vlmprune.adapters import get_adapter
from vlmprune.testing.llava_next import (
    build_tiny_llava_next,
    build_tiny_llava_next_processor,
    tiny_llava_next_config,
)

# (height, width) of each sample's image: a square one (2x2 crops), a wide one (1x2 crops, unpadded rows), a tall one
SIZES = [(100, 100), (30, 112), (100, 60)]
PROMPTS = ["what is the color of the large object on the left", "where is the cat", "is it red"]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_llava_next_processor()


@pytest.fixture(scope="module")
def family(processor):
    config = tiny_llava_next_config()
    models = {impl: build_tiny_llava_next(config, attn_implementation=impl) for impl in ("eager", "sdpa")}

    def make_inputs(indices: list[int]) -> dict:
        texts = [f"USER: <image>\n{PROMPTS[i]} ASSISTANT:" for i in indices]
        images = [random_image(i, SIZES[i]) for i in indices]
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))

    return Family(models=models, make_inputs=make_inputs, size=len(SIZES))


def captured_features(model, inputs) -> torch.Tensor:
    """(crops, side², channels): what the projector gets in a forward, every crop of the batch."""
    captured = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured[0]


def packed_features(model, features, inputs) -> list[torch.Tensor]:
    """Per image, the model's own packing of `features` (crops per image, unpadded, newlines left out)."""
    adapter = get_adapter(model)
    crops = [item.crops for item in adapter._items(inputs)["image"]]
    packed, _ = model.model.pack_image_features(
        list(torch.split(features, crops)), inputs["image_sizes"], "default", image_newline=None
    )
    return packed


def test_newlines_are_not_image_tokens_and_grids_are_each_images_true_shape(family):
    model = family.models["sdpa"]
    inputs = family.make_inputs([0, 1, 2])
    adapter = get_adapter(model)
    mask = adapter.image_token_mask(inputs)
    placeholders = inputs["input_ids"] == model.config.image_token_id
    grids = adapter.image_grids(mask.sum(1).tolist(), inputs)
    # (100, 100): 2x2 crops, nothing unpadded; (30, 112): 1x2 crops, 1 row of 4 cut top and bottom; (100, 60): 2x2
    # crops, 2 columns of 8 cut left and right. A newline ends each row of the big grid.
    assert grids == [[(4, 4), (8, 8)], [(4, 4), (2, 8)], [(4, 4), (8, 4)]]
    assert mask.sum(1).tolist() == [16 + 64, 16 + 16, 16 + 32]
    assert (placeholders & ~mask).sum(1).tolist() == [8, 2, 8]
    assert not (mask & ~placeholders).any()
    # the newline is the last placeholder of each row: sample 1's rows of 8 are followed by one
    row = placeholders[1].nonzero().flatten()[16:]
    assert mask[1, row].tolist() == ([True] * 8 + [False]) * 2


def test_vision_features_follow_the_models_own_packing(family):
    model = family.models["sdpa"]
    inputs = family.make_inputs([0, 1, 2])
    adapter = get_adapter(model)
    features = captured_features(model, inputs)
    counts = adapter.image_token_mask(inputs).sum(1).tolist()
    expected = packed_features(model, features, inputs)
    split = adapter.split_vision_features(features, counts, inputs)
    for got, want in zip(split, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
        return  # transformers before pre-encoded generation
    # as newer `generate` calls the forward: images encoded first, no image_sizes; the layout is read from them
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    pre_encoded = {"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": encoded}}
    assert torch.equal(adapter.image_token_mask(pre_encoded), adapter.image_token_mask(inputs))
    assert adapter.image_grids(counts, pre_encoded) == adapter.image_grids(counts, inputs)
    for got, want in zip(adapter.split_vision_features(features, counts, pre_encoded), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_per_image_budgets_split_each_samples_budget_over_its_grids(family):
    model = family.models["sdpa"]
    inputs = family.make_inputs([0, 1, 2])
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("fastv"), budget_scope="per_image") as trace:
        model(**inputs)
    assert trace.method["budget_scope"] == "per_image"
    stage = trace.stages[0]
    for kept, grids in zip(stage.kept, stage.image_grids, strict=True):
        base = grids[0][0] * grids[0][1]
        total = sum(r * c for r, c in grids)
        # half of each grid's tokens, within one of its proportional share
        assert abs(int((kept < base).sum()) - base // 2) <= 1
        assert abs(int((kept >= base).sum()) - (total - base) // 2) <= 1


def test_per_image_merging_merges_each_grids_tokens_into_its_own_tokens(family):
    model = family.models["sdpa"]
    inputs = family.make_inputs([0, 1, 2])
    method = vlmprune.build_method("visionzip", keep=None, ratio=0.5)
    with torch.no_grad(), vlmprune.prune(model, method, budget_scope="per_image") as trace:
        model(**inputs)
    stage = trace.stages[0]
    merged = 0
    for kept, grids, sources in zip(stage.kept, stage.image_grids, stage.sources, strict=True):
        ends = torch.tensor([r * c for r, c in grids]).cumsum(0)
        for token, (ids, _) in zip(kept, sources, strict=True):
            assert (torch.searchsorted(ends, ids, right=True) == torch.searchsorted(ends, token, right=True)).all()
            merged += len(ids) > 1
    assert merged > 0


def test_an_unknown_budget_scope_is_refused(family):
    method = vlmprune.build_method("fastv")
    with (
        pytest.raises(vlmprune.VlmpruneError, match="budget_scope"),
        vlmprune.prune(family.models["sdpa"], method, budget_scope="per_crop"),
    ):
        pass


@pytest.mark.parametrize("shape", ["llava-next-tiny", "llava-onevision-tiny"])
def test_bench_and_flops_cover_the_any_resolution_families(shape, tmp_path, capsys):
    from vlmprune.cli.main import main

    out = tmp_path / "bench"
    argv = ["bench", "--shape", shape, "--methods", "fastv", "--batch", "1", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--new-tokens", "2", "--no-original-fastv", "--out", str(out)]) == 0
    assert "| fastv | 1 |" in capsys.readouterr().out
    assert main(["flops", "--model", shape.replace("tiny", "7b"), "--method", "vispruner"]) == 0


def test_grounding_formats_name_each_family():
    from vlmprune.eval.prompts import grounding_format_for

    assert grounding_format_for("llava_next").frame == "pad"
    assert grounding_format_for("llava_onevision").frame == "stretch"
