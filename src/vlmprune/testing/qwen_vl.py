"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models and processors, built locally with no network access.

For tests, examples and benchmarks: `build_tiny_qwen_vl(family)` gives a model of a few hundred thousand parameters
(a vision tower of depth 2 and hidden 32 with 2x2 patch merging; a text model of 6 layers, hidden 64, 4 query and
2 key-value heads of dim 16, with M-RoPE) and `build_tiny_qwen_processor(family)` the family's processor with the
PIL image processor (no torchvision) and a word-level tokenizer that knows Qwen's special tokens. Images of 56 to
128 pixels a side give merged grids of 2x2 to 4x4 tokens. `save_tiny_qwen_vl(path, family)` writes both so that
`from_pretrained(path)` loads them back offline.

Family traits kept: Qwen2.5-VL's tower attends in windows (window 56 px: 2x2 merged tokens) except at its last
layer (`fullatt_block_indexes`); Qwen3-VL's tower has learned position embeddings, patch 16, and DeepStack (the
outputs of both tower layers are merged and added to the first two decoder layers' hidden states at the visual
positions), and interleaved M-RoPE.
"""

from __future__ import annotations

import copy
import os
from typing import Literal

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmprune.cost.shapes import ModelShape
from vlmprune.processors import image_only_processor
from vlmprune.testing.llava import WORDS, word_level_tokenizer

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "QWEN_FAMILIES",
    "QWEN_TOKENS",
    "SHAPE_FAMILIES",
    "QwenFamily",
    "build_tiny_qwen_processor",
    "build_tiny_qwen_tokenizer",
    "build_tiny_qwen_vl",
    "image_side",
    "qwen_vl_config_for_shape",
    "qwen_vl_model_class",
    "save_tiny_qwen_vl",
    "tiny_qwen_vl_config",
]

QwenFamily = Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
QWEN_FAMILIES: tuple[QwenFamily, ...] = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# `ModelShape.family` (the transformers model_type) -> the family's name here
SHAPE_FAMILIES: dict[str, QwenFamily] = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}

# Qwen's chat and vision special tokens, matched whole by the word-level tokenizer
QWEN_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's conversation format: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n..."
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_MODEL_CLASSES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
    "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor),
}
_PATCH = {"qwen2-vl": 14, "qwen2.5-vl": 14, "qwen3-vl": 16}


def _check_family(family: str) -> None:
    if family not in _MODEL_CLASSES:
        raise ValueError(f"unknown Qwen family {family!r}; expected one of {', '.join(QWEN_FAMILIES)}")


def build_tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer (`vlmprune.testing.llava.WORDS`) with `QWEN_TOKENS` and their names."""
    return word_level_tokenizer(
        WORDS,
        added_tokens=QWEN_TOKENS,
        named_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def tiny_qwen_vl_config(
    family: QwenFamily,
    *,
    text_layers: int = 6,
    text_hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int | None = None,
    vision_hidden: int = 32,
    vision_intermediate: int | None = None,
    vision_layers: int = 2,
    vocab_size: int | None = None,
):
    """The tiny model's config for `family` (token ids from `build_tiny_qwen_tokenizer`).

    Defaults: head dim `text_hidden // heads`, MLPs twice as wide as their model, the tokenizer's vocabulary (a
    larger `vocab_size` adds rows never produced). M-RoPE's (t, h, w) sections split half the head dim in the
    released models' proportions (Qwen2/2.5-VL 16:24:24, Qwen3-VL 24:20:20).
    """
    _check_family(family)
    tokenizer = build_tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_TOKENS}
    head_dim = head_dim or text_hidden // heads
    half = head_dim // 2
    spatial = round(half * (5 / 16 if family == "qwen3-vl" else 3 / 8))
    sections = [half - 2 * spatial, spatial, spatial]
    vision_intermediate = vision_intermediate or 2 * vision_hidden
    text = {
        "vocab_size": max(vocab_size or 0, len(tokenizer)),
        "hidden_size": text_hidden,
        "intermediate_size": intermediate or 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    vision_heads = max(2, vision_hidden // 80)  # the released towers' heads are 72 to 80 wide
    vision = {"depth": vision_layers, "num_heads": vision_heads, "patch_size": _PATCH[family], "spatial_merge_size": 2}
    if family == "qwen2-vl":
        mlp_ratio = vision_intermediate // vision_hidden  # an int in the config
        vision |= {"embed_dim": vision_hidden, "hidden_size": text_hidden, "mlp_ratio": mlp_ratio}
    else:
        vision |= {
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate,
            "out_hidden_size": text_hidden,
        }
    if family == "qwen2.5-vl":
        vision |= {"window_size": 56, "fullatt_block_indexes": [vision_layers - 1]}
    if family == "qwen3-vl":
        text["rope_parameters"]["mrope_interleaved"] = True
        vision |= {"num_position_embeddings": 64, "deepstack_visual_indexes": list(range(vision_layers))}
    config_class = _MODEL_CLASSES[family][0]
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_tiny_qwen_vl(family: QwenFamily, config=None, *, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-weight tiny model of `family` in eval mode; one `seed`, one set of weights; greedy decoding."""
    _check_family(family)
    config = copy.deepcopy(tiny_qwen_vl_config(family) if config is None else config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family][1]._from_config(config, attn_implementation=attn_implementation)
    _never_emitted(model, build_tiny_qwen_tokenizer())
    generation = model.generation_config
    text = config.get_text_config()
    generation.bos_token_id, generation.eos_token_id = text.bos_token_id, text.eos_token_id
    generation.pad_token_id = text.pad_token_id
    generation.do_sample = False
    return model.eval()


# Tokens greedy decoding never emits: fed back, a vision placeholder would ask for an image the prompt lacks, and an
# end of sequence would stop one sample of a batch early, which the step-by-step references do not model.
_NEVER_EMITTED = ("</s>", "<pad>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _never_emitted(model, tokenizer: PreTrainedTokenizerFast) -> None:
    """Makes each `_NEVER_EMITTED` token's output row the mean of two word rows: its logit is then the mean of
    theirs, never above the larger, and a tie goes to the word's lower id."""
    head = model.get_output_embeddings().weight
    words = [tokenizer.convert_tokens_to_ids(word) for word in WORDS[:2]]
    with torch.no_grad():
        for token in _NEVER_EMITTED:
            head[tokenizer.convert_tokens_to_ids(token)] = head[words].mean(dim=0)


def build_tiny_qwen_processor(family: QwenFamily, *, min_side: int = 56, max_side: int = 128):
    """The family's processor for `build_tiny_qwen_vl`: images resized to multiples of 2 patches (28 px; 32 px for
    Qwen3-VL) between `min_side`² and `max_side`² pixels; PIL image processor; no video processor."""
    _check_family(family)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=_PATCH[family],
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_side * min_side, "longest_edge": max_side * max_side},
    )
    return image_only_processor(
        _MODEL_CLASSES[family][2], image_processor, build_tiny_qwen_tokenizer(), QWEN_CHAT_TEMPLATE
    )


def qwen_vl_config_for_shape(shape: ModelShape):
    """A `tiny_qwen_vl_config` with `shape`'s dimensions (families qwen2_vl, qwen2_5_vl, qwen3_vl), for benchmarks of
    real model sizes with random weights; the vocabulary is grown to the shape's."""
    family = SHAPE_FAMILIES.get(shape.family)
    if family is None or shape.vision is None:
        raise ValueError(f"{shape.name} is a {shape.family} shape, not a Qwen-VL layout")
    return tiny_qwen_vl_config(
        family,
        text_layers=shape.layers,
        text_hidden=shape.hidden,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate=shape.intermediate,
        vision_hidden=shape.vision.hidden,
        vision_intermediate=shape.vision.intermediate,
        vision_layers=shape.vision.layers,
        vocab_size=shape.vocab,
    )


def qwen_vl_model_class(family: QwenFamily) -> type:
    """The transformers model class of `family`."""
    _check_family(family)
    return _MODEL_CLASSES[family][1]


def image_side(family: QwenFamily, grid: tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels of an image whose merged token grid is `grid` (2x2 patches per token)."""
    return grid[0] * 2 * _PATCH[family], grid[1] * 2 * _PATCH[family]


def save_tiny_qwen_vl(path: str | os.PathLike[str], family: QwenFamily, *, seed: int = 0) -> str:
    """Write the tiny model of `family` and its processor's parts; returns the path as a string.

    The directory loads back offline with `vlmprune.processors.load_processor(path)` (`AutoProcessor` where
    torchvision is installed) and `AutoModelForImageTextToText.from_pretrained(path)`.
    """
    path = os.fspath(path)
    build_tiny_qwen_vl(family, seed=seed).save_pretrained(path)
    processor = build_tiny_qwen_processor(family)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    with open(os.path.join(path, "chat_template.jinja"), "w") as handle:
        handle.write(processor.chat_template)
    return path
