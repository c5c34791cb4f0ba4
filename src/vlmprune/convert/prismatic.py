"""Prismatic VLM checkpoints (TRI-ML/prismatic-vlms) -> transformers `LlavaForConditionalGeneration`.

FEATHER (Endo et al., ICCV 2025) evaluates `prism-siglip-controlled+7b`: a timm SigLIP ViT-SO400M at 384 px
(patch 14, 27 x 27 = 729 tokens, no [CLS]), a GELU MLP projector and Llama-2-7B ("pure", not chat), trained in
one stage on the LLaVA-1.5 data. This module maps such a checkpoint onto the LLaVA classes transformers already
has, so vlmprune's LLaVA adapter prunes it with no Prismatic code.

What Prismatic computes (official code @ 874c5bb, `prismatic/models/vlms/prismatic.py::PrismaticVLM.forward`):

- vision (`backbones/vision/base_vision.py::TimmViTBackbone`): timm `get_intermediate_layers(n={depth - 2})`,
  the output of the second-to-last block, before the final norm and the attention-pool head: (B, N, C).
  transformers' LLaVA takes `hidden_states[vision_feature_layer=-2]` of `SiglipVisionModel`, the same tensor
  (`hidden_states[0]` is the embeddings, `hidden_states[i]` the output of block i - 1), every token kept
  (`vision_feature_select_strategy="full"`: SigLIP has no [CLS]). timm's activation is `nn.GELU()` (exact erf),
  so the converted tower uses `hidden_act="gelu"`, not SigLIP's usual tanh approximation.
- projector (`util/nn_utils.py::MLPProjector`, arch "gelu-mlp" / "no-align+gelu-mlp"):
  Linear(C, D) -> GELU -> Linear(D, D), LLaVA's `multi_modal_projector` (`projector_hidden_act="gelu"`).
- language model: `[BOS] [N patch embeddings] [prompt tokens]`, the patches spliced in right after BOS, with
  no placeholder token. The converted model needs one: an `<image>` token is added to the tokenizer, and the
  chat template puts it right after BOS, where the processor expands it to N copies. LLaVA replaces the
  placeholders' embeddings by the projected patches before the first layer, so the embedding row the new id
  points at is never read: the language model sees exactly Prismatic's sequence, with the same positions
  (0..L-1) and the same causal mask, and the logits are Prismatic's.
- tokens (`backbones/llm/llama2.py::LLaMa2LLMBackbone`): Prismatic adds `<PAD>` to the Llama-2 tokenizer
  (id 32000) and pads the embedding to a multiple of 64 rows (32064). `<image>` takes the next id (32001), a
  row the padding already holds; the vocabulary keeps its 32064 rows, so the logits keep their shape.
- prompt (`backbones/llm/prompting/base_prompter.py::PurePromptBuilder`): `In: {message}\\nOut:` (the builder's
  `In: {msg}\\nOut: ` with the trailing space stripped by `get_prompt`), the message stripped of whitespace and of
  `<image>`; an answer is `{answer}</s>` after `Out: `. The saved chat template writes
  `<image> In: {message}\\nOut:`; the space after `<image>` makes a non-legacy Llama tokenizer (which adds
  the word-initial `▁` only at the start of the text) tokenize `In` as `▁In`, as after BOS in Prismatic, and a
  legacy one does not add a second `▁`. `convert_prismatic` checks this on the real tokenizer before writing.
- images (`TimmViTBackbone.image_transform`, "resize-naive"): bicubic resize to the square input size (no crop,
  no padding), scaled to [0, 1], normalised with mean 0.5 and std 0.5: `SiglipImageProcessorPil`.

Where the weights come from (Prismatic's own `load()`): `RUN_DIR/config.json` names the backbones;
`RUN_DIR/checkpoints/latest-checkpoint.pt` holds `{"model": {"projector": ..., "llm_backbone": ...}}`, the
whole language model included (Prismatic's `from_pretrained` requires both). The vision tower is frozen in
training, so it is not there (except after "full-finetune", where `vision_backbone` is, and is used): it comes
from timm's Hub weights (`timm/ViT-SO400M-14-SigLIP-384`, `open_clip_pytorch_model.bin`, keys
`visual.trunk.*`, or a timm `model.safetensors`). The tokenizer and the Llama config come from the Hugging Face
Llama-2 directory Prismatic names (`meta-llama/Llama-2-7b-hf`); its weights are not read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmprune.errors import ConversionError, UnsupportedModelError

if TYPE_CHECKING:  # transformers is imported where it is used: `vlmprune.convert` loads without it
    from transformers import LlamaConfig, LlavaConfig, LlavaProcessor, PreTrainedTokenizerBase, SiglipVisionConfig

__all__ = [
    "CHECKPOINT_PATH",
    "IMAGE_TOKEN",
    "LLM_BACKBONES",
    "PAD_TOKEN",
    "PRISMATIC_CHAT_TEMPLATE",
    "PROMPT_FAMILY",
    "SIGLIP_BACKBONES",
    "PrismaticRun",
    "SiglipBackbone",
    "convert_prismatic",
    "llama_state_from_prismatic",
    "llava_config",
    "load_checkpoint",
    "load_vision_weights",
    "prismatic_processor",
    "prismatic_prompt",
    "prismatic_tokenizer",
    "projector_state_from_prismatic",
    "read_run_config",
    "siglip_state_from_timm",
    "siglip_vision_config",
    "timm_vit_state",
]

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<PAD>"  # LLaMa2LLMBackbone's `add_special_tokens({"pad_token": "<PAD>"})`
CHECKPOINT_PATH = Path("checkpoints") / "latest-checkpoint.pt"
PROMPT_FAMILY = "prismatic"  # written as `prompt_family` in the converted config: eval's grounding prompts read it


@dataclass(frozen=True)
class SiglipBackbone:
    """A Prismatic SigLIP vision backbone: its timm model, input size and heads (weights do not show heads)."""

    timm_name: str
    image_size: int
    heads: int


# prismatic/models/backbones/vision/siglip_vit.py and materialize.py (default_image_size)
SIGLIP_BACKBONES: dict[str, SiglipBackbone] = {
    "siglip-vit-so400m": SiglipBackbone("vit_so400m_patch14_siglip_224", 224, 16),
    "siglip-vit-so400m-384px": SiglipBackbone("vit_so400m_patch14_siglip_384", 384, 16),
    "siglip-vit-b16-224px": SiglipBackbone("vit_base_patch16_siglip_224", 224, 12),
    "siglip-vit-b16-256px": SiglipBackbone("vit_base_patch16_siglip_256", 256, 12),
    "siglip-vit-b16-384px": SiglipBackbone("vit_base_patch16_siglip_384", 384, 12),
}

# prismatic/models/backbones/llm/llama2.py: the "pure" (non-chat) Llama-2s, prompted by PurePromptBuilder
LLM_BACKBONES: dict[str, str] = {
    "llama2-7b-pure": "meta-llama/Llama-2-7b-hf",
    "llama2-13b-pure": "meta-llama/Llama-2-13b-hf",
}

_ARCHITECTURES = ("gelu-mlp", "no-align+gelu-mlp")
_RESIZE = "resize-naive"

# PurePromptBuilder as a chat template (see the module docstring). One image, before the first `In:`.
PRISMATIC_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set images = 0 -%}{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- endif -%}"
    "{%- set text = text | replace('<image>', '') | trim -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<image> ' * images + 'In: ' + text + '\\nOut:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + (text if text else ' ') + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def prismatic_prompt(message: str) -> str:
    """The text Prismatic tokenizes for one user turn: `PurePromptBuilder.add_turn` then `get_prompt`.

    `In: {message}\\nOut:` with `<image>` removed from the message and the message stripped; the tokenizer adds
    BOS, and the image patches go right after it.
    """
    return f"In: {message.replace('<image>', '').strip()}\nOut:"


@dataclass(frozen=True)
class PrismaticRun:
    """The `model` section of a Prismatic run directory's `config.json`, checked against what converts."""

    model_id: str
    vision_backbone_id: str
    llm_backbone_id: str
    arch_specifier: str
    image_resize_strategy: str
    llm_max_length: int = 2048

    def __post_init__(self) -> None:
        if self.vision_backbone_id not in SIGLIP_BACKBONES:
            raise UnsupportedModelError(
                f"vision backbone {self.vision_backbone_id!r} of {self.model_id!r} is not supported; supported: "
                f"{', '.join(SIGLIP_BACKBONES)}"
            )
        if self.llm_backbone_id not in LLM_BACKBONES:
            raise UnsupportedModelError(
                f"LLM backbone {self.llm_backbone_id!r} of {self.model_id!r} is not supported; supported: "
                f"{', '.join(LLM_BACKBONES)} (the 'pure' prompt format)"
            )
        if self.arch_specifier not in _ARCHITECTURES:
            raise UnsupportedModelError(
                f"projector {self.arch_specifier!r} of {self.model_id!r} is not supported; supported: "
                f"{', '.join(_ARCHITECTURES)}"
            )
        if self.image_resize_strategy != _RESIZE:
            raise UnsupportedModelError(
                f"image_resize_strategy {self.image_resize_strategy!r} of {self.model_id!r} is not supported; "
                f"supported: {_RESIZE}"
            )

    @property
    def backbone(self) -> SiglipBackbone:
        return SIGLIP_BACKBONES[self.vision_backbone_id]


def read_run_config(run_dir: str | os.PathLike[str]) -> PrismaticRun:
    """The run described by `run_dir/config.json` (Prismatic's `load()` reads its `model` section)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{run_dir} is not a Prismatic run directory: it has no config.json")
    try:
        model = json.loads(path.read_text())["model"]
        fields = {
            key: str(model[key])
            for key in ("model_id", "vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy")
        }
        max_length = int(model.get("llm_max_length", 2048))
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"{path} cannot be read: {error}") from None
    except KeyError as error:
        raise ConversionError(f"{path} has no model.{error.args[0]} (not a Prismatic run config)") from None
    return PrismaticRun(**fields, llm_max_length=max_length)


def _torch_load(path: Path) -> Any:
    """A torch checkpoint, tensors only (`weights_only`), memory-mapped where the file format allows."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise ConversionError(f"{path} cannot be read as a torch checkpoint: {error}") from None
    except Exception as error:  # pickle and zip errors have no common base
        raise ConversionError(f"{path} cannot be read as a torch checkpoint: {error}") from None
    try:  # an old (non-zip) torch.save file cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"{path} cannot be read as a torch checkpoint: {error}") from None


def load_checkpoint(run_dir: str | os.PathLike[str]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"projector": ..., "llm_backbone": ..., ["vision_backbone": ...]}` from `run_dir`'s latest checkpoint."""
    path = Path(run_dir) / CHECKPOINT_PATH
    if not path.is_file():
        raise ConversionError(f"{run_dir} has no checkpoint: {CHECKPOINT_PATH} is missing")
    data = _torch_load(path)
    model = data.get("model") if isinstance(data, Mapping) else None
    if not isinstance(model, Mapping):
        raise ConversionError(f"{path} has no 'model' state dicts (not a Prismatic checkpoint)")
    missing = [key for key in ("projector", "llm_backbone") if key not in model]
    if missing:
        raise ConversionError(
            f"{path} has no {' or '.join(missing)} weights (an align-stage checkpoint? Prismatic needs both)"
        )
    return {key: dict(value) for key, value in model.items()}


def load_vision_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A timm SigLIP ViT's state dict from a `.safetensors` file or a torch file (open_clip's `.bin` included)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"vision weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own error types
            raise ConversionError(f"{path} cannot be read as safetensors: {error}") from None
    state = _torch_load(path)
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} holds no state dict")
    return dict(state)


# Where a timm ViT's keys live in the files it comes in: open_clip's Hub file (`visual.trunk.`), Prismatic's
# `vision_backbone` state dict (`featurizer.`), a plain timm state dict (no prefix).
_TIMM_PREFIXES = ("visual.trunk.", "featurizer.", "")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_NAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_UNUSED = ("attn_pool.", "head.", "fc_norm.")  # the pooling head: after the penultimate block, never run


def timm_vit_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm ViT keys of `state` (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...), prefix removed."""
    for prefix in _TIMM_PREFIXES:
        if f"{prefix}pos_embed" in state:
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    raise ConversionError(
        "the vision weights are not a timm ViT (no pos_embed, visual.trunk.pos_embed or featurizer.pos_embed)"
    )


def _vit_dims(timm_state: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int, int]:
    """(hidden C, intermediate, depth, patch size, tokens N) from the weights' shapes."""
    try:
        tokens, hidden = timm_state["pos_embed"].shape[-2:]
        patch = timm_state["patch_embed.proj.weight"].shape[-1]
        intermediate = timm_state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise ConversionError(f"the vision weights have no {error.args[0]} (not a timm ViT)") from None
    depth = 1 + max(int(m.group(1)) for key in timm_state if (m := _BLOCK.match(key)))
    return int(hidden), int(intermediate), depth, int(patch), int(tokens)


def siglip_vision_config(timm_state: Mapping[str, torch.Tensor], backbone: SiglipBackbone) -> SiglipVisionConfig:
    """A `SiglipVisionConfig` for the timm ViT `timm_state` (SigLIP keys, see `timm_vit_state`) at `backbone`'s size.

    timm's ViT: LayerNorm eps 1e-6, exact GELU, no [CLS], no pooling head used.
    """
    from transformers import SiglipVisionConfig

    hidden, intermediate, depth, patch, tokens = _vit_dims(timm_state)
    side = backbone.image_size // patch
    if side * side != tokens:
        raise ConversionError(
            f"the vision weights have {tokens} position embeddings, not the {side}x{side} grid of "
            f"{backbone.timm_name} at {backbone.image_size} px with patch {patch}"
        )
    if hidden % backbone.heads:
        raise ConversionError(f"vision hidden size {hidden} is not a multiple of {backbone.heads} heads")
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=depth,
        num_attention_heads=backbone.heads,
        image_size=backbone.image_size,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def siglip_state_from_timm(timm_state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of transformers' `SiglipVisionTransformer` from a timm SigLIP ViT's state dict.

    `blocks.i.attn.qkv` (3C, C) is split into q, k, v (C, C) each (timm's order); `pos_embed` (1, N, C) becomes
    the (N, C) position embedding table; the final `norm` is `post_layernorm` (not applied to the features).
    """
    for key, value in timm_state.items():
        if key.startswith(_UNUSED):
            continue
        if key == "pos_embed":
            yield "embeddings.position_embedding.weight", value.reshape(value.shape[-2:])
        elif key.startswith("patch_embed.proj."):
            yield f"embeddings.patch_embedding.{key.rsplit('.', 1)[1]}", value
        elif key.startswith("norm."):
            yield f"post_layernorm.{key.rsplit('.', 1)[1]}", value
        elif (block := _BLOCK.match(key)) is not None:
            index, rest = block.groups()
            name, _, kind = rest.rpartition(".")
            prefix = f"encoder.layers.{index}."
            if name == "attn.qkv":
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    yield f"{prefix}self_attn.{part}_proj.{kind}", chunk.clone()  # its own storage, for safetensors
            elif name in _BLOCK_NAMES:
                yield f"{prefix}{_BLOCK_NAMES[name]}.{kind}", value
            else:
                raise ConversionError(f"vision weight {key!r} has no SigLIP counterpart (not a SigLIP ViT)")
        else:
            raise ConversionError(f"vision weight {key!r} has no SigLIP counterpart (not a SigLIP ViT)")


def projector_state_from_prismatic(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """`MLPProjector` (`projector.0` Linear, `projector.1` GELU, `projector.2` Linear) -> LLaVA's projector names."""
    names = {"projector.0.": "linear_1.", "projector.2.": "linear_2."}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        if prefix is None:
            raise ConversionError(f"projector weight {key!r} is not part of a gelu-mlp projector")
        yield names[prefix] + key[len(prefix) :], value


def llama_state_from_prismatic(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """`LLaMa2LLMBackbone` (`llm.model.*`, `llm.lm_head.*`) -> `LlamaForCausalLM` names (`model.*`, `lm_head.*`).

    Rotary `inv_freq` buffers (saved by old transformers) are recomputed from the config, so they are dropped.
    """
    for key, value in state.items():
        if not key.startswith("llm."):
            raise ConversionError(f"LLM weight {key!r} is not under llm. (not a Prismatic LLM backbone)")
        if key.endswith("rotary_emb.inv_freq"):
            continue
        yield key[len("llm.") :], value


def prismatic_tokenizer(llm_dir: str | os.PathLike[str], max_length: int = 2048) -> PreTrainedTokenizerBase:
    """The Llama-2 tokenizer in `llm_dir` as Prismatic uses it (`<PAD>` added), plus the `<image>` placeholder.

    Pads on the left, as batched generation needs (Prismatic generates one sample at a time).
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(llm_dir), model_max_length=max_length)
    except (OSError, ValueError) as error:
        raise ConversionError(f"no Llama-2 tokenizer in {llm_dir}: {str(error).strip().splitlines()[0]}") from None
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def prismatic_processor(tokenizer: PreTrainedTokenizerBase, vision: SiglipVisionConfig) -> LlavaProcessor:
    """`LlavaProcessor`: resize-naive to the tower's square size, SigLIP normalisation, one `<image>` -> N tokens."""
    from transformers import LlavaProcessor, SiglipImageProcessorPil
    from transformers.image_utils import PILImageResampling

    size = vision.image_size
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,  # timm's data config for SigLIP
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=PRISMATIC_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def llava_config(vision: SiglipVisionConfig, text: LlamaConfig, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    """The `LlavaConfig`: features of layer -2, every token ("full"), exact-GELU projector, `prompt_family`."""
    from transformers import LlavaConfig

    side = vision.image_size // vision.patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=side * side,
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.pad_token_id = pad_token_id
    config.prompt_family = PROMPT_FAMILY
    return config


_LLM_REQUIRED = ("llm.model.embed_tokens.weight", "llm.model.norm.weight", "llm.lm_head.weight")


def _llama_config(llm_dir: str | os.PathLike[str], llm_state: Mapping[str, torch.Tensor], min_rows: int) -> LlamaConfig:
    """`llm_dir`'s Llama config checked against the checkpoint, its vocabulary the embedding's rows (>= min_rows)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.fspath(llm_dir))
    except (OSError, ValueError) as error:
        raise ConversionError(f"no Llama config in {llm_dir}: {str(error).strip().splitlines()[0]}") from None
    if config.model_type != "llama":
        raise ConversionError(f"{llm_dir} holds a {config.model_type!r} config, not Llama-2's")
    missing = [key for key in _LLM_REQUIRED if key not in llm_state]
    if missing:
        raise ConversionError(f"the checkpoint's llm_backbone has no {', '.join(missing)}")
    embed = llm_state["llm.model.embed_tokens.weight"]
    indices = (int(m.group(1)) for key in llm_state if (m := re.match(r"llm\.model\.layers\.(\d+)\.", key)))
    layers = 1 + max(indices, default=-1)
    if embed.shape[1] != config.hidden_size or layers != config.num_hidden_layers:
        raise ConversionError(
            f"the checkpoint's LLM (hidden {embed.shape[1]}, {layers} layers) does not match the config in "
            f"{llm_dir} (hidden {config.hidden_size}, {config.num_hidden_layers} layers)"
        )
    config.vocab_size = max(int(embed.shape[0]), min_rows)
    config.tie_word_embeddings = False
    return config


def _check_prompt_tokens(tokenizer: PreTrainedTokenizerBase, image_token_id: int) -> None:
    """The chat template's ids are Prismatic's with one `<image>` after BOS, or raises.

    Checked on `tokenizer` as saved and loaded back, the form the converted model's users get.
    """
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    for question in ('Please provide the bounding box coordinate of the region this sentence describes: "a cat"',):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(
            messages, chat_template=PRISMATIC_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
        )
        ours = tokenizer(text)["input_ids"]
        theirs = tokenizer(prismatic_prompt(question))["input_ids"]
        if ours != [*theirs[:1], image_token_id, *theirs[1:]]:
            raise ConversionError(
                f"this tokenizer splits the converted prompt {text!r} into {tokenizer.convert_ids_to_tokens(ours)}, "
                f"not Prismatic's {tokenizer.convert_ids_to_tokens(theirs)} with <image> after BOS"
            )


def _with_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (V, D) grown to `rows` rows with zeros (rows only the `<image>` placeholder can point at)."""
    if weight.shape[0] >= rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def convert_prismatic(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    llm_dir: str | os.PathLike[str],
    vision_weights: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[int], None] = lambda _: None,
) -> Path:
    """Writes `run_dir`'s Prismatic VLM to `out_dir` as a `LlavaForConditionalGeneration` with its processor.

    Args:
        run_dir: a Prismatic run directory (`config.json`, `checkpoints/latest-checkpoint.pt`).
        out_dir: where to write; must be empty or absent. Loads back with `AutoModelForImageTextToText` and
            `AutoProcessor`.
        llm_dir: the Hugging Face Llama-2 directory the run names (config and tokenizer; weights unread).
        vision_weights: the timm SigLIP weights (a file); unused when the checkpoint holds `vision_backbone`.
        dtype: the weights' dtype in `out_dir`.
        progress: called with 1 per tensor written.
    Returns: `out_dir`.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty directory")
    run = read_run_config(run_dir)
    checkpoint = load_checkpoint(run_dir)
    if "vision_backbone" in checkpoint:  # full-finetune runs train (and save) the tower
        vision_state = timm_vit_state(checkpoint["vision_backbone"])
    elif vision_weights is None:
        raise ConversionError(
            f"the checkpoint has no vision_backbone: give the timm weights of {run.backbone.timm_name} "
            "(e.g. open_clip_pytorch_model.bin of timm's Hub repo)"
        )
    else:
        vision_state = timm_vit_state(load_vision_weights(vision_weights))
    vision = siglip_vision_config(vision_state, run.backbone)

    llm_state = checkpoint["llm_backbone"]
    tokenizer = prismatic_tokenizer(llm_dir, run.llm_max_length)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = _llama_config(llm_dir, llm_state, image_token_id + 1)
    rows = text.vocab_size
    text.pad_token_id = tokenizer.pad_token_id
    _check_prompt_tokens(tokenizer, image_token_id)
    projector = dict(projector_state_from_prismatic(checkpoint["projector"]))
    first = projector.get("linear_1.weight")
    if first is None or "linear_2.weight" not in projector:
        raise ConversionError("the checkpoint's projector lacks projector.0.weight or projector.2.weight")
    if first.shape != (text.hidden_size, vision.hidden_size):
        raise ConversionError(
            f"the projector maps {tuple(first.shape[::-1])}, not vision {vision.hidden_size} -> LLM {text.hidden_size}"
        )
    config = llava_config(vision, text, image_token_id, tokenizer.pad_token_id)

    # The llava-hf Hub layout, which every transformers 5.x release reads (see testing/llava.py).
    named = [
        *((f"vision_tower.vision_model.{k}", v) for k, v in siglip_state_from_timm(vision_state)),
        *((f"multi_modal_projector.{k}", v) for k, v in projector.items()),
        *((f"language_model.{k}", v) for k, v in llama_state_from_prismatic(llm_state)),
    ]
    state: dict[str, torch.Tensor] = {}
    for name, value in named:
        if name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            value = _with_rows(value, rows)
        state[name] = value.detach().to(dtype).contiguous()
        progress(1)

    out.mkdir(parents=True, exist_ok=True)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)
    prismatic_processor(tokenizer, vision).save_pretrained(out)
    save_file(state, os.fspath(out / "model.safetensors"), metadata={"format": "pt"})
    return out
