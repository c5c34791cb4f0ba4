"""Tiny random-weight LLaVA-NeXT and LLaVA-OneVision models and processors, built locally with no network access.

`build_tiny_llava_next()`: a CLIP tower (hidden 32, 2 layers, 56 px crops of patch 14: 4x4 patches per crop) with
any-resolution pinpoints of up to 2x2 crops, and a 6-layer Llama of hidden 64. `build_tiny_llava_onevision()`: the
same sizes with a SigLIP tower (no [CLS]) and a Qwen2 text model, `anyres_max_2` so that a large crop grid is
interpolated down as in the real model's `anyres_max_9`. Processors use the PIL image processors and the word-level
tokenizer of `vlmprune.testing.llava` (with a `<video>` token for OneVision).
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

from vlmprune.cost.shapes import ModelShape
from vlmprune.testing.llava import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, WORDS, word_level_tokenizer

__all__ = [
    "VIDEO_TOKEN",
    "anyres_setup_for_shape",
    "build_tiny_llava_next",
    "build_tiny_llava_next_processor",
    "build_tiny_llava_onevision",
    "build_tiny_llava_onevision_processor",
    "tiny_llava_next_config",
    "tiny_llava_onevision_config",
]

VIDEO_TOKEN = "<video>"
CROP, PATCH = 56, 14  # 4x4 patches per crop
PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def _tokenizer(video: bool = False) -> PreTrainedTokenizerFast:
    return word_level_tokenizer(WORDS, added_tokens=(VIDEO_TOKEN,) if video else ())


def _text_kwargs(tokenizer: PreTrainedTokenizerFast, layers: int, shape: ModelShape | None = None) -> dict:
    dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=0)
    if shape is not None:
        dims = dict(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            vocab_size=shape.vocab,
        )
    return dict(
        dims,
        vocab_size=max(dims["vocab_size"], len(tokenizer)),
        num_hidden_layers=layers,
        max_position_embeddings=32768,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _vision_kwargs(crop: int, shape: ModelShape | None = None, extra_layers: int = 0) -> dict:
    if shape is None or shape.vision is None:
        dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    else:
        vision = shape.vision
        dims = dict(
            hidden_size=vision.hidden,
            intermediate_size=vision.intermediate,
            num_hidden_layers=vision.layers + extra_layers,
            num_attention_heads=max(1, vision.hidden // 64),
        )
    return dict(dims, image_size=crop, patch_size=PATCH)


def tiny_llava_next_config(
    text_layers: int = 6, *, shape: ModelShape | None = None, crop: int = CROP, pinpoints: list = PINPOINTS
) -> LlavaNextConfig:
    """A `LlavaNextConfig`: CLIP features of layer -2 without [CLS], pinpoints of up to 2x2 crops of 56 px.

    With `shape`, its dimensions instead (`anyres_setup_for_shape`)."""
    tokenizer = _tokenizer()
    vision = _vision_kwargs(crop, shape, extra_layers=1)  # features from layer -2: the last layer is not run
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(projection_dim=vision["hidden_size"], **vision),
        text_config=LlamaConfig(**_text_kwargs(tokenizer, text_layers, shape)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def tiny_llava_onevision_config(
    text_layers: int = 6,
    *,
    shape: ModelShape | None = None,
    crop: int = CROP,
    pinpoints: list = PINPOINTS,
    aspect_ratio: str = "anyres_max_2",
) -> LlavaOnevisionConfig:
    """A `LlavaOnevisionConfig`: SigLIP features of the last layer (no [CLS]), a Qwen2 text model, `anyres_max_2`.

    With `shape`, its dimensions instead (`anyres_setup_for_shape`)."""
    tokenizer = _tokenizer(video=True)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs(crop, shape)),
        text_config=Qwen2Config(**_text_kwargs(tokenizer, text_layers, shape)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=aspect_ratio,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _init(model_class, config, seed: int, attn_implementation: str):
    config = copy.deepcopy(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation=attn_implementation)
    # Placeholder ids are never generated (their output rows are zero, below any real token's top logit): a reference
    # that re-reads its own answer would take a generated `<image>` for an image.
    with torch.no_grad():
        for token in (config.image_token_id, getattr(config, "video_token_id", None)):
            if token is not None:
                model.lm_head.weight[token] = 0
    generation = model.generation_config
    generation.bos_token_id = config.text_config.bos_token_id
    generation.eos_token_id = config.text_config.eos_token_id
    generation.pad_token_id = config.text_config.pad_token_id
    generation.do_sample = False
    return model.eval()


def build_tiny_llava_next(
    config: LlavaNextConfig | None = None, *, attn_implementation: str = "sdpa", seed: int = 0
) -> LlavaNextForConditionalGeneration:
    """A random-weight tiny `LlavaNextForConditionalGeneration` in eval mode; one `seed`, one set of weights."""
    return _init(LlavaNextForConditionalGeneration, config or tiny_llava_next_config(), seed, attn_implementation)


def build_tiny_llava_onevision(
    config: LlavaOnevisionConfig | None = None, *, attn_implementation: str = "sdpa", seed: int = 0
) -> LlavaOnevisionForConditionalGeneration:
    """A random-weight tiny `LlavaOnevisionForConditionalGeneration` in eval mode."""
    return _init(
        LlavaOnevisionForConditionalGeneration, config or tiny_llava_onevision_config(), seed, attn_implementation
    )


def build_tiny_llava_next_processor(crop: int = CROP, pinpoints: list = PINPOINTS) -> LlavaNextProcessor:
    """A `LlavaNextProcessor` for `build_tiny_llava_next` (CLIP normalisation, 56 px crops, the same pinpoints)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


class _OnevisionProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor`, whose video processor's class check needs torchvision (transformers 5.x exports
    `BaseVideoProcessor` only with it): that one check is skipped; images are processed as the parent does."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


class _OnevisionImagesOnNextProcessor(LlavaNextImageProcessorPil):
    """LLaVA-NeXT's PIL image processor with OneVision's `batch_num_images` (images per sample), for transformers
    releases whose OneVision PIL image processor imports torchvision (5.4). The pixels differ from OneVision's (a
    shortest-edge resize and centre crop for the base crop); the crops, `image_sizes` and so the token layout do
    not."""

    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_sizes", "batch_num_images"]

    def preprocess(self, images, *args, **kwargs):
        if isinstance(images, list | tuple) and images and isinstance(images[0], list | tuple):
            per_sample = [len(group) for group in images]
        else:
            per_sample = [1] * (len(images) if isinstance(images, list | tuple) else 1)
        out = super().preprocess(images, *args, **kwargs)
        out["batch_num_images"] = torch.tensor(per_sample)
        return out


def _onevision_image_processor(crop: int, pinpoints: list):
    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
    except ImportError:  # transformers 5.4: that module imports the torchvision processor's
        return _OnevisionImagesOnNextProcessor(
            size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints
        )
    return LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints)


def build_tiny_llava_onevision_processor(
    crop: int = CROP, pinpoints: list = PINPOINTS, aspect_ratio: str = "anyres_max_2"
) -> LlavaOnevisionProcessor:
    """A `LlavaOnevisionProcessor` for `build_tiny_llava_onevision` (PIL image processor; its video processor needs
    torchvision to process videos, which the tests build by hand)."""
    image_processor = _onevision_image_processor(crop, pinpoints)
    return _OnevisionProcessor(
        image_processor=image_processor,
        tokenizer=_tokenizer(video=True),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": CROP, "width": CROP}),
        num_image_tokens=(crop // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio,
        chat_template=LLAVA_CHAT_TEMPLATE,
        video_token=VIDEO_TOKEN,
    )


def anyres_setup_for_shape(shape: ModelShape) -> tuple:
    """(model class, config, processor, image side in pixels) of a random-weight LLaVA-NeXT or OneVision of `shape`.

    For benchmarks of real model sizes: crops of `shape.grid` patches of 14 px, pinpoints up to k x k crops with
    k² = `shape.images` − 1 (the base image), and a square image of k crops a side, so that the prompt holds
    `shape.image_tokens` image tokens (OneVision: `anyres_max_{k²}`, nothing interpolated).
    """
    k = math.isqrt(shape.images - 1)
    crop = shape.grid[0] * PATCH
    if shape.family not in ("llava_next", "llava_onevision") or k * k != shape.images - 1 or shape.vision is None:
        raise ValueError(f"{shape.name} is a {shape.family} shape, not an any-resolution LLaVA with k x k crops")
    pinpoints = [[i * crop, j * crop] for i in range(1, k + 1) for j in range(1, k + 1)]
    if shape.family == "llava_next":
        config = tiny_llava_next_config(shape.layers, shape=shape, crop=crop, pinpoints=pinpoints)
        return LlavaNextForConditionalGeneration, config, build_tiny_llava_next_processor(crop, pinpoints), k * crop
    aspect = f"anyres_max_{k * k}"
    config = tiny_llava_onevision_config(shape.layers, shape=shape, crop=crop, pinpoints=pinpoints, aspect_ratio=aspect)
    processor = build_tiny_llava_onevision_processor(crop, pinpoints, aspect)
    return LlavaOnevisionForConditionalGeneration, config, processor, k * crop
