"""LLaVA-NeXT: every method against the oracles on a tiny random model, images of different aspect ratios batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_oracles import *  # noqa: F403 (the oracle tests every family runs)
from family_oracles import Family
from PIL import Image

import vlmprune
from vlmprune.adapters import get_adapter
from vlmprune.testing.llava_next import (
    build_tiny_llava_next,
    build_tiny_llava_next_processor,
    tiny_llava_next_config,
)

# (height, width) of each sample's image: a square one (2x2 crops), a wide one (1x2 crops, unpadded rows), a tall one
SIZES = [(100, 100), (30, 112), (100, 60)]
PROMPTS = ["what is the color of the large object on the left", "where is the cat", "is it red"]


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor():
    return build_tiny_llava_next_processor()


@pytest.fixture(scope="module")
def family(processor):
    config = tiny_llava_next_config()
    models = {impl: build_tiny_llava_next(config, attn_implementation=impl) for impl in ("eager", "sdpa")}

    def make_inputs(indices: list[int]) -> dict:
        texts = [f"USER: <image>\n{PROMPTS[i]} ASSISTANT:" for i in indices]
        images = [image(i, SIZES[i]) for i in indices]
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))

    return Family(models=models, make_inputs=make_inputs, size=len(SIZES))
