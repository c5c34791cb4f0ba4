"""Tiny random-weight LLaVA-NeXT and LLaVA-OneVision models and processors, built locally with no network access.

`build_tiny_llava_next()`: a CLIP tower (hidden 32, 2 layers, 56 px crops of patch 14: 4x4 patches per crop) with
any-resolution pinpoints of up to 2x2 crops, and a 6-layer Llama of hidden 64. `build_tiny_llava_onevision()`: the
same sizes with a SigLIP tower (no [CLS]) and a Qwen2 text model, `anyres_max_2` so that a large crop grid is
interpolated down as in the real model's `anyres_max_9`. Processors use the PIL image processors and the word-level
tokenizer of `vlmprune.testing.llava` (with a `<video>` token for OneVision).
"""

from __future__ import annotations

import copy
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

from vlmprune.testing.llava import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, WORDS, word_level_tokenizer

__all__ = [
    "VIDEO_TOKEN",
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


def _text_kwargs(tokenizer: PreTrainedTokenizerFast, layers: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _vision_kwargs() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CROP,
        patch_size=PATCH,
    )


def tiny_llava_next_config(text_layers: int = 6) -> LlavaNextConfig:
    """A `LlavaNextConfig`: CLIP features of layer -2 without [CLS], pinpoints of up to 2x2 crops of 56 px."""
    tokenizer = _tokenizer()
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(projection_dim=32, **_vision_kwargs()),
        text_config=LlamaConfig(**_text_kwargs(tokenizer, text_layers)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def tiny_llava_onevision_config(text_layers: int = 6) -> LlavaOnevisionConfig:
    """A `LlavaOnevisionConfig`: SigLIP features of the last layer (no [CLS]), a Qwen2 text model, `anyres_max_2`."""
    tokenizer = _tokenizer(video=True)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs()),
        text_config=Qwen2Config(**_text_kwargs(tokenizer, text_layers)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_2",
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _init(model_class, config, seed: int, attn_implementation: str):
    config = copy.deepcopy(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation=attn_implementation)
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


def build_tiny_llava_next_processor() -> LlavaNextProcessor:
    """A `LlavaNextProcessor` for `build_tiny_llava_next` (CLIP normalisation, 56 px crops, the same pinpoints)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS
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


def _onevision_image_processor():
    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
    except ImportError:  # transformers 5.4: that module imports the torchvision processor's
        return _OnevisionImagesOnNextProcessor(
            size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS
        )
    return LlavaOnevisionImageProcessorPil(size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS)


def build_tiny_llava_onevision_processor() -> LlavaOnevisionProcessor:
    """A `LlavaOnevisionProcessor` for `build_tiny_llava_onevision` (PIL image processor; its video processor needs
    torchvision to process videos, which the tests build by hand)."""
    image_processor = _onevision_image_processor()
    return _OnevisionProcessor(
        image_processor=image_processor,
        tokenizer=_tokenizer(video=True),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": CROP, "width": CROP}),
        num_image_tokens=(CROP // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
        chat_template=LLAVA_CHAT_TEMPLATE,
        video_token=VIDEO_TOKEN,
    )
