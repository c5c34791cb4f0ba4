"""Tiny random-weight LLaVA-1.5 models and processors, built locally with no network access.

For tests, examples and benchmarks: `build_tiny_llava()` gives a ~9M-parameter LLaVA (CLIP tower of hidden
64 and 2 layers at 336 px / patch 14, so 24x24 = 576 image tokens; a Llama with RoPE of hidden 128 and
4 layers) and `build_tiny_processor()` a matching `LlavaProcessor` whose tokenizer is a word-level
vocabulary of common English words. `save_tiny_llava(path)` writes both so that `from_pretrained(path)`
loads them back offline, as it would a Hub checkpoint.

The tokenizer's ids: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3, `<image>` 4, then the words. The config's
vocabulary size, `image_token_id`, and bos/eos/pad ids are taken from the tokenizer, so they always agree.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
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

from vlmprune.cost.shapes import ModelShape

__all__ = [
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "WORDS",
    "build_tiny_llava",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "init_llava",
    "llava_config_for_shape",
    "llava_processor",
    "save_llava_weights",
    "save_tiny_llava",
    "tiny_llava_config",
    "word_level_llava_config",
    "word_level_tokenizer",
]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

# Lower-case words (the tokenizer lower-cases its input), the LLaVA-1.5 role names and punctuation that
# the whitespace pre-tokenizer splits off as tokens of their own.
_WORD_LIST = """
    user assistant : . , ? ! ' " - ( ) / 0 1 2 3 4 5 6 7 8 9
    the a an and or but not no yes of to in on at by for with from as is are was were be been being
    this that these those it its there here what which who whom whose where when why how
    i you he she we they me him her us them my your his our their
    do does did have has had can could will would should may might must shall
    image picture photo describe description detail details briefly show shows shown see look
    color colour red green blue yellow black white orange purple brown gray grey pink
    left right top bottom middle center front back behind above below under over near next
    one two three four five six seven eight nine ten many few some all any each every
    man woman person people child boy girl dog cat bird horse car bus train bike plane boat
    tree sky road street building house table chair room window door water grass sun cloud
    big small large little long short tall old new young good bad hot cold
    sitting standing walking running holding wearing eating playing looking riding
    count number text say says written sign answer question word words
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())

# LLaVA-1.5 conversation format, as in llava-hf's checkpoints: "USER: <image>\n{text} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def word_level_tokenizer(
    words: tuple[str, ...],
    *,
    added_tokens: tuple[str, ...] = (),
    model_max_length: int = 4096,
    named_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: ids `SPECIAL_TOKENS`, then `words`, then `added_tokens`.

    Lower-cases, splits on whitespace and punctuation, prepends `<s>`, pads on the left (as batched
    generation needs). `added_tokens` are matched whole before that split (e.g. `<b07>`). Unknown words map
    to `<unk>`. `named_tokens` are the tokenizer's named special tokens (default: `image_token` is `<image>`).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words + added_tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    if added_tokens:
        backend.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in added_tokens])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN} if named_tokens is None else named_tokens,
        padding_side="left",
        add_bos_token=True,
        model_max_length=model_max_length,
    )


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: `word_level_tokenizer(WORDS)`."""
    return word_level_tokenizer(WORDS)


def word_level_llava_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    text_layers: int,
    text_hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vision_hidden: int,
    vision_layers: int,
    image_size: int,
    patch_size: int,
    max_positions: int,
    vocab_size: int | None = None,
) -> LlavaConfig:
    """A `LlavaConfig` (CLIP tower, Llama with RoPE) whose token ids come from `tokenizer`.

    `vocab_size` defaults to the tokenizer's size; a larger value is allowed (the extra rows are never
    produced). Image features: layer -2 of the tower, CLS dropped ("default"), so one image is
    `(image_size // patch_size) ** 2` tokens.
    """
    n_vocab = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_vocab
    if vocab_size < n_vocab:
        raise ValueError(f"vocab_size must be >= the tokenizer's {n_vocab} tokens, got {vocab_size}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
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
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
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


def tiny_llava_config(
    *,
    text_layers: int = 4,
    text_hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    image_size: int = 336,
    patch_size: int = 14,
    vocab_size: int | None = None,
) -> LlavaConfig:
    """The tiny models' `LlavaConfig` (see `word_level_llava_config`): grouped-query attention, 24x24 grid."""
    return word_level_llava_config(
        build_tiny_tokenizer(),
        text_layers=text_layers,
        text_hidden=text_hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        image_size=image_size,
        patch_size=patch_size,
        max_positions=4096,
        vocab_size=vocab_size,
    )


def init_llava(
    config: LlavaConfig, *, seed: int = 0, attn_implementation: str = "sdpa"
) -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` initialised from `seed` (one seed, one set of weights), in train mode.

    The generation config takes bos/eos/pad from the text config and decodes greedily.
    """
    # a model keeps (and _from_config mutates) its config: copy it so models built from one config stay apart
    config = copy.deepcopy(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    generation = model.generation_config
    generation.bos_token_id = config.text_config.bos_token_id
    generation.eos_token_id = config.text_config.eos_token_id
    generation.pad_token_id = config.text_config.pad_token_id
    generation.do_sample = False
    return model


def build_tiny_llava(
    config: LlavaConfig | None = None, *, attn_implementation: str = "sdpa", seed: int = 0
) -> LlavaForConditionalGeneration:
    """A random-weight tiny `LlavaForConditionalGeneration` in eval mode; one `seed`, one set of weights."""
    model = init_llava(
        tiny_llava_config() if config is None else config, seed=seed, attn_implementation=attn_implementation
    )
    return model.eval()


def llava_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int) -> LlavaProcessor:
    """A `LlavaProcessor`: CLIP normalization at `image_size`, one `<image>` -> `(image_size // patch_size)**2`."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_tiny_processor(image_size: int = 336, patch_size: int = 14) -> LlavaProcessor:
    """A `LlavaProcessor` for `build_tiny_llava` (see `llava_processor`)."""
    return llava_processor(build_tiny_tokenizer(), image_size, patch_size)


def save_tiny_llava(
    path: str | os.PathLike[str],
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **config_kwargs: int,
) -> str:
    """Write a tiny model and its processor to `path` with `save_pretrained`; returns the path as a string.

    `config_kwargs` go to `tiny_llava_config`. The directory loads back offline with
    `AutoProcessor.from_pretrained(path)` and `AutoModelForImageTextToText.from_pretrained(path)`.
    """
    path = os.fspath(path)
    config = tiny_llava_config(**config_kwargs)
    model = build_tiny_llava(config, attn_implementation=attn_implementation, seed=seed)
    processor = build_tiny_processor(
        image_size=config.vision_config.image_size, patch_size=config.vision_config.patch_size
    )
    save_llava_weights(model, path)
    processor.save_pretrained(path)
    return path


# In-memory parameter prefixes of transformers 5.x's LLaVA, most specific first, and where the llava-hf Hub
# checkpoints keep them. Every transformers release reads the Hub's layout; the layout `save_pretrained` writes
# has changed (5.6 and later drop CLIP's `vision_model` level), and a release older than the writer's misreads it.
_LLAVA_HUB_LAYOUT = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def save_llava_weights(model: LlavaForConditionalGeneration, path: str | os.PathLike[str]) -> None:
    """`model.save_pretrained(path)`, the weights written in the llava-hf Hub layout, which every 5.x release reads."""
    path = os.fspath(path)
    model.save_pretrained(path)
    tied = model.config.get_text_config().tie_word_embeddings
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name.startswith("lm_head."):
            continue
        ours, hub = next((prefix, hub) for prefix, hub in _LLAVA_HUB_LAYOUT if name.startswith(prefix))
        state[hub + name[len(ours) :]] = tensor.detach().contiguous()
    for stale in Path(path).glob("model*.safetensors*"):  # a sharded save's files and index
        stale.unlink()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def llava_config_for_shape(shape: ModelShape) -> LlavaConfig:
    """A `tiny_llava_config` with `shape`'s dimensions (LLaVA layout: square grid, patch 14, CLIP tower).

    For benchmarks of real model sizes with random weights; the vocabulary is the tiny tokenizer's, grown to
    the shape's so the LM head costs what it does in the real model. A Prismatic shape (converted to LLaVA by
    `vlmprune convert-prismatic`) gets a SigLIP tower (`vlmprune.testing.prismatic.prismatic_config_for_shape`).
    """
    if shape.family == "prismatic":
        from vlmprune.testing.prismatic import prismatic_config_for_shape

        return prismatic_config_for_shape(shape)
    if shape.family != "llava" or shape.vision is None or shape.images != 1 or shape.grid[0] != shape.grid[1]:
        raise ValueError(f"{shape.name} is a {shape.family} shape, not a one-image LLaVA layout with a square grid")
    return tiny_llava_config(
        text_layers=shape.layers,
        text_hidden=shape.hidden,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        intermediate=shape.intermediate,
        vision_hidden=shape.vision.hidden,
        vision_layers=shape.vision.layers + 1,  # features come from layer -2: the last layer is not run
        image_size=shape.grid[0] * 14,
        patch_size=14,
        vocab_size=max(shape.vocab, len(build_tiny_tokenizer())),
    )
