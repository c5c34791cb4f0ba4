"""The testbed model: a small LLaVA (CLIP tower with [CLS], Llama with RoPE), its tokenizer and processor.

Shape (the defaults of `testbed_config`): CLIP 224 px / patch 14, so a 16x16 grid of 256 image tokens,
hidden 128, 4 layers, features from layer -2 with [CLS] dropped ("default", as LLaVA-1.5); a 2-layer GELU
projector; a Llama of 8 layers, hidden 192, 4 heads, RoPE. About 4.5M parameters, 9 MB in fp16.

The tokenizer is word-level over the scenes' vocabulary, plus `NUM_BINS` coordinate tokens `<b00>..<b31>`:
a box answer is `"<b12> <b03> <b20> <b09>"` then `</s>`, read back by `parse_box`. Prompts use the
LLaVA-1.5 format `"USER: <image>\\n{question} ASSISTANT:"` (the processor's chat template).

`CHECKPOINT_DIR` is the package data directory that holds the trained model; `load_testbed()` loads it (or
any directory written by `save_testbed`) with `from_pretrained`, offline.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from vlmprune.errors import VlmpruneError
from vlmprune.testbed.scenes import COLOURS, IMAGE_SIZE, NUM_BINS, SHAPES, SIZES, bins_to_box
from vlmprune.testing import (
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    init_llava,
    llava_processor,
    save_llava_weights,
    word_level_llava_config,
    word_level_tokenizer,
)

__all__ = [
    "BIN_TOKENS",
    "CHECKPOINT_DIR",
    "PATCH_SIZE",
    "SPECIAL_TOKENS",
    "WORDS",
    "build_testbed_model",
    "build_testbed_processor",
    "build_testbed_tokenizer",
    "encode_images",
    "load_testbed",
    "parse_box",
    "prompt_text",
    "save_testbed",
    "testbed_config",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
PATCH_SIZE = 14
WORDS: tuple[str, ...] = (
    "user", "assistant", ":", "?", ".",
    "where", "what", "how", "many", "is", "are", "there", "the", "a", "an", "object", "objects",
    "colour", "shape", "size", "yes", "no",
    *SHAPES, *(f"{s}s" for s in SHAPES), *COLOURS, *SIZES,
    *(str(d) for d in range(10)),
)  # fmt: skip
BIN_TOKENS: tuple[str, ...] = tuple(f"<b{k:02d}>" for k in range(NUM_BINS))
_BIN_RE = re.compile(r"<b(\d\d)>")


def build_testbed_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids `SPECIAL_TOKENS`, then `WORDS`, then `BIN_TOKENS` (matched whole)."""
    return word_level_tokenizer(WORDS, added_tokens=BIN_TOKENS, model_max_length=1024)


def testbed_config(
    *,
    text_layers: int = 8,
    text_hidden: int = 192,
    text_heads: int = 4,
    text_intermediate: int = 512,
    vision_hidden: int = 128,
    vision_layers: int = 4,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
) -> LlavaConfig:
    """The `LlavaConfig` of the testbed model; token ids come from `build_testbed_tokenizer()`.

    One image is `(image_size // patch_size) ** 2` tokens (CLIP layer -2, [CLS] dropped).
    """
    return word_level_llava_config(
        build_testbed_tokenizer(),
        text_layers=text_layers,
        text_hidden=text_hidden,
        heads=text_heads,
        kv_heads=text_heads,
        intermediate=text_intermediate,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        image_size=image_size,
        patch_size=patch_size,
        max_positions=1024,
    )


def build_testbed_model(
    config: LlavaConfig | None = None, *, seed: int = 0, attn_implementation: str = "sdpa"
) -> LlavaForConditionalGeneration:
    """A freshly initialised testbed model (train mode is left to the caller); one `seed`, one set of weights."""
    model = init_llava(
        testbed_config() if config is None else config, seed=seed, attn_implementation=attn_implementation
    )
    model.generation_config.max_new_tokens = 5
    return model


def build_testbed_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    """The testbed's `LlavaProcessor` (see `vlmprune.testing.llava_processor`)."""
    return llava_processor(build_testbed_tokenizer(), image_size, patch_size)


def encode_images(
    model: LlavaForConditionalGeneration, pixel_values: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """LLaVA's image path for `pixel_values` `(batch, 3, H, W)`: the tower's hidden states (each
    `(batch, 1 + patches, vision hidden)`) and the image tokens the language model reads, the projector's output
    `(batch, patches, text hidden)` on tower layer `vision_feature_layer` with [CLS] dropped (as
    `LlavaModel.get_image_features` computes them for the "default" feature selection)."""
    inner = model.model
    hidden_states = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden_states, inner.multi_modal_projector(hidden_states[model.config.vision_feature_layer][:, 1:])


def prompt_text(question: str) -> str:
    """The LLaVA-1.5 prompt for one question about one image (what the chat template writes)."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def parse_box(text: str, num_bins: int = NUM_BINS) -> list[float] | None:
    """The normalized `[x1, y1, x2, y2]` of the first four bin tokens in `text`; None when there are fewer."""
    bins = [int(m) for m in _BIN_RE.findall(text)]
    if len(bins) < 4 or any(b >= num_bins for b in bins[:4]):
        return None
    return bins_to_box(bins[:4], num_bins)


def save_testbed(model: LlavaForConditionalGeneration, path: str | os.PathLike[str], *, fp16: bool = True) -> str:
    """Write `model` (fp16 safetensors by default) and a matching processor to `path`; returns the path."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    to_save = copy.deepcopy(model).to(torch.float16) if fp16 else model
    vision = model.config.vision_config
    with _quiet():
        save_llava_weights(to_save, path)
        build_testbed_processor(vision.image_size, vision.patch_size).save_pretrained(path)
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars inside (saving every few minutes would fill a training log with them)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_testbed(
    path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[LlavaProcessor, LlavaForConditionalGeneration]:
    """`(processor, model)` from `path` (default: the shipped `CHECKPOINT_DIR`), model in eval mode."""
    path = os.fspath(CHECKPOINT_DIR if path is None else path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"no testbed model in {path} (config.json missing); train one with `vlmprune testbed train`"
        )
    with _quiet():
        processor = LlavaProcessor.from_pretrained(path)
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True
        )
    unmatched = sorted({*info["missing_keys"], *info["unexpected_keys"]})
    if unmatched:  # from_pretrained only warns, and the model would answer from random weights
        raise VlmpruneError(
            f"the testbed model in {path} does not match transformers {transformers.__version__}'s LLaVA: "
            f"{len(unmatched)} weights missing or unexpected (e.g. {unmatched[0]}); re-export it with "
            "`vlmprune testbed export`, or run `vlmprune env` and report the output"
        )
    return processor, model.eval()
