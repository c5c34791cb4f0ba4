"""LLaVA-OneVision: every method against the oracles on a tiny random model, with images and videos batched.

The batch: an image whose unpadded grid is interpolated down (anyres_max), a video alone, and an image of another
aspect ratio followed by a video. The word-level tokenizer has no video processor that runs without torchvision, so
videos are random frames and their placeholders are spliced into the processor's ids.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import vlmprune
from conftest import random_image
from family_oracles import *  # noqa: F403 (the oracle tests every family runs)
from family_oracles import Family
from vlmprune.adapters import get_adapter
from vlmprune.testing.llava_next import (
    build_tiny_llava_onevision,
    build_tiny_llava_onevision_processor,
    tiny_llava_onevision_config,
)

FRAMES = 4
# per sample: (image size or None, whether a video follows), prompt
SAMPLES = [((100, 100), False), (None, True), ((100, 60), True)]
PROMPTS = ["what is the color of the large object on the left", "where is the cat", "is it red"]
STAND_IN = "ten"  # a word the prompts never use, replaced by the video placeholder id


@pytest.fixture(scope="module")
def processor():
    return build_tiny_llava_onevision_processor()


@pytest.fixture(scope="module")
def family(processor):
    config = tiny_llava_onevision_config()
    models = {impl: build_tiny_llava_onevision(config, attn_implementation=impl) for impl in ("eager", "sdpa")}
    side = config.vision_config.image_size // config.vision_config.patch_size
    video_tokens = FRAMES * math.ceil(side / 2) ** 2 + 1

    def make_inputs(indices: list[int]) -> dict:
        texts, images, videos = [], [], []
        for i in indices:
            size, video = SAMPLES[i]
            parts = ["USER:"]
            if size is not None:
                parts.append("<image>\n")
                images.append(random_image(i, size))
            if video:
                parts.append(" ".join([STAND_IN] * video_tokens) + "\n")
                generator = torch.Generator().manual_seed(i)
                videos.append(
                    torch.randn(
                        FRAMES, 3, config.vision_config.image_size, config.vision_config.image_size, generator=generator
                    )
                )
            texts.append(" ".join(parts) + f"{PROMPTS[i]} ASSISTANT:")
        inputs = dict(processor(images=images or None, text=texts, return_tensors="pt", padding=True))
        ids = inputs["input_ids"]
        ids[ids == processor.tokenizer.convert_tokens_to_ids(STAND_IN)] = config.video_token_id
        if videos:
            inputs["pixel_values_videos"] = torch.stack(videos)
        return inputs

    return Family(models=models, make_inputs=make_inputs, size=len(SAMPLES))


def captured_features(model, inputs) -> torch.Tensor:
    """(crops then frames, side², channels): what the projector gets in a forward, images' crops first."""
    captured = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return torch.cat(captured)


def test_grids_follow_anyres_max_and_video_frames(family):
    model = family.models["sdpa"]
    inputs = family.make_inputs([0, 1, 2])
    adapter = get_adapter(model)
    mask = adapter.image_token_mask(inputs)
    grids = adapter.image_grids(mask.sum(1).tolist(), inputs)
    # (100, 100): 2x2 crops, an 8x8 grid over anyres_max_2's 32 patches: interpolated by sqrt(2) to 5x5;
    # (100, 60): 2x2 crops unpadded to 8x4, not interpolated; a video: 4 frames pooled from 4x4 to 2x2
    frames = [(2, 2)] * FRAMES
    assert grids == [[(4, 4), (5, 5)], frames, [(4, 4), (8, 4), *frames]]
    images = inputs["input_ids"] == model.config.image_token_id
    videos = inputs["input_ids"] == model.config.video_token_id
    assert not (mask & ~(images | videos)).any()
    # newlines: one per row of each image's big grid, one after each video
    assert ((images | videos) & ~mask).sum(1).tolist() == [5, 1, 8 + 1]


def test_vision_features_follow_the_models_own_packing_and_pooling(family):
    model = family.models["sdpa"]
    inputs = family.make_inputs([0, 1, 2])
    adapter = get_adapter(model)
    features = captured_features(model, inputs)
    counts = adapter.image_token_mask(inputs).sum(1).tolist()
    crops = [item.crops for item in adapter._items(inputs)["image"]]
    images, frames = features[: sum(crops)], features[sum(crops) :]
    packed, _ = model.model.pack_image_features(
        list(torch.split(images, crops)), inputs["image_sizes"], image_newline=None, vision_aspect_ratio="anyres_max_2"
    )
    pooled = model.model.apply_pooling(frames).reshape(2, -1, features.shape[-1])
    expected = [packed[0], pooled[0], torch.cat([packed[1], pooled[1]])]
    for got, want in zip(adapter.split_vision_features(features, counts, inputs), expected, strict=True):
        torch.testing.assert_close(got, want)
    if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
        return  # transformers before pre-encoded generation
    # as newer `generate` calls the forward: images and videos encoded first, neither pixels nor sizes given
    with torch.no_grad():
        encoded = {
            "image": model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
            ),
            "video": model.model.get_video_features(inputs["pixel_values_videos"]),
        }
    pre_encoded = {"input_ids": inputs["input_ids"], "mm_encoder_outputs": encoded}
    assert torch.equal(adapter.image_token_mask(pre_encoded), adapter.image_token_mask(inputs))
    assert adapter.image_grids(counts, pre_encoded) == adapter.image_grids(counts, inputs)
    for got, want in zip(adapter.split_vision_features(features, counts, pre_encoded), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_several_images_in_one_prompt_are_one_crop_each(family, processor):
    model = family.models["sdpa"]
    text = ["USER: <image>\n<image>\ncompare the two pictures ASSISTANT:"]
    inputs = dict(
        processor(images=[[random_image(0, (100, 100)), random_image(1, (30, 112))]], text=text, return_tensors="pt")
    )
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("fastv", ratio=0.75)) as trace:
        model(**inputs)
    assert trace.stages[0].image_grids == [[(4, 4), (4, 4)]]
    assert trace.stages[0].n_before == [32] and trace.stages[0].n_kept == [8]
