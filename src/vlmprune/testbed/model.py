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
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from vlmprune.testbed.scenes import COLOURS, IMAGE_SIZE, NUM_BINS, SHAPES, SIZES, bins_to_box
from vlmprune.testing import LLAVA_CHAT_TEMPLATE

__all__ = [
    "BIN_TOKENS",
    "CHECKPOINT_DIR",
    "PATCH_SIZE",
    "SPECIAL_TOKENS",
    "WORDS",
    "build_testbed_model",
    "build_testbed_processor",
    "build_testbed_tokenizer",
    "load_testbed",
    "parse_box",
    "prompt_text",
    "save_testbed",
    "testbed_config",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
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
    """Word-level tokenizer: ids `SPECIAL_TOKENS`, then `WORDS`, then `BIN_TOKENS`.

    Lower-cases and splits on whitespace and punctuation; the bin tokens are added tokens, matched whole
    before that split. Prepends `<s>`, pads on the left (batched generation).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + BIN_TOKENS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in BIN_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        add_bos_token=True,
        model_max_length=1024,
    )


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
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tokenizer = build_testbed_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_testbed_model(
    config: LlavaConfig | None = None, *, seed: int = 0, attn_implementation: str = "sdpa"
) -> LlavaForConditionalGeneration:
    """A freshly initialised testbed model (train mode is left to the caller); one `seed`, one set of weights."""
    config = testbed_config() if config is None else copy.deepcopy(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    generation = model.generation_config
    generation.bos_token_id = config.text_config.bos_token_id
    generation.eos_token_id = config.text_config.eos_token_id
    generation.pad_token_id = config.text_config.pad_token_id
    generation.do_sample = False
    generation.max_new_tokens = 5
    return model


def build_testbed_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    """A `LlavaProcessor`: CLIP normalization at `image_size`, one `<image>` -> `(image_size // patch_size)**2`."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_testbed_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


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
        to_save.save_pretrained(path)
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
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
    return processor, model.eval()
