"""Shared fixtures: tiny random-weight LLaVA models (one per attention backend) and their inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmprune.testing import build_tiny_llava, build_tiny_processor, tiny_llava_config

IMAGE_SIZE, PATCH = 168, 14  # a 12 x 12 grid: 144 image tokens per image
TEXT_LAYERS = 6


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_llava_config(text_layers=TEXT_LAYERS, image_size=IMAGE_SIZE, patch_size=PATCH)


@pytest.fixture(scope="session")
def processor():
    return build_tiny_processor(image_size=IMAGE_SIZE, patch_size=PATCH)


@pytest.fixture(scope="session")
def models(tiny_config):
    """One set of random weights, loaded under each attention backend."""
    return {impl: build_tiny_llava(tiny_config, attn_implementation=impl, seed=0) for impl in ("eager", "sdpa")}


def random_image(seed: int, size: int | tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """Random pixels of a square `size` side, or (height, width) `size`."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def make_inputs(processor):
    """Processor inputs for prompts (each with one image), left-padded when lengths differ."""

    def make(prompts: list[str], seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
        seeds = seeds or list(range(len(prompts)))
        texts = [f"USER: <image>\n{p} ASSISTANT:" for p in prompts]
        images = [random_image(s) for s in seeds]
        return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))

    return make


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """The `models` weights and processor saved with `save_pretrained`, for commands that load a directory."""
    from vlmprune.testing import save_tiny_llava

    return save_tiny_llava(
        tmp_path_factory.mktemp("small-llava"), text_layers=TEXT_LAYERS, image_size=IMAGE_SIZE, patch_size=PATCH
    )
