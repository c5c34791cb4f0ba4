"""Tiny random-weight models and processors of each supported family, built locally with no network access.

For tests, examples and benchmarks: every builder makes a model from a config with random weights (seeded) and a
processor whose tokenizer is a small word-level vocabulary, so nothing is downloaded. One module per family.
"""

from __future__ import annotations

from vlmprune.testing.llava import (
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    WORDS,
    build_tiny_llava,
    build_tiny_processor,
    build_tiny_tokenizer,
    init_llava,
    llava_config_for_shape,
    llava_processor,
    save_llava_weights,
    save_tiny_llava,
    tiny_llava_config,
    word_level_llava_config,
    word_level_tokenizer,
)
from vlmprune.testing.prismatic import TinyPrismatic, prismatic_config_for_shape, write_tiny_prismatic

__all__ = [
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "WORDS",
    "TinyPrismatic",
    "build_tiny_llava",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "init_llava",
    "llava_config_for_shape",
    "llava_processor",
    "prismatic_config_for_shape",
    "save_llava_weights",
    "save_tiny_llava",
    "tiny_llava_config",
    "word_level_llava_config",
    "word_level_tokenizer",
    "write_tiny_prismatic",
]
