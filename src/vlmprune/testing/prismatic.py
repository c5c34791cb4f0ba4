"""A tiny random-weight Prismatic VLM written in Prismatic's own checkpoint layout, with no network access.

For testing `vlmprune convert-prismatic` (and anything else that reads Prismatic runs): `write_tiny_prismatic(root)`
writes what converting the real `prism-siglip-controlled+7b` needs, shrunk:

- `root/run/`: the run directory, `config.json` (its `model` section names `siglip-vit-so400m-384px`,
  `llama2-7b-pure`, `no-align+gelu-mlp`, `resize-naive`) and `checkpoints/latest-checkpoint.pt` =
  `{"model": {"projector": {"projector.0.weight", ...}, "llm_backbone": {"llm.model.*", "llm.lm_head.weight"}}}`,
  the Llama's embedding padded, as Prismatic pads it, with `<PAD>` and up to a multiple of 64 rows;
- `root/timm/open_clip_pytorch_model.bin`: a SigLIP-like timm ViT (keys `visual.trunk.patch_embed.proj.weight`,
  `visual.trunk.blocks.0.attn.qkv.weight`, ..., plus text-tower keys the converter must skip), as timm's Hub repo
  ships it: hidden 64, 3 blocks, 16 heads (the so400m's count), patch 32 at 384 px, so a 12 x 12 grid;
- `root/llama/`: a Hugging Face Llama directory (config and tokenizer, like `meta-llama/Llama-2-7b-hf`): a Llama
  of hidden 64 and 4 layers, and a `LlamaTokenizer` (byte-fallback BPE with Llama's `▁` word marks and its byte
  tokens, so `\\n` is `<0x0A>`) trained here on a few English words and the grounding prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, LlavaConfig, SiglipVisionConfig

from vlmprune.cost.shapes import ModelShape
from vlmprune.testing.llava import WORDS, tiny_llava_config

__all__ = [
    "TinyPrismatic",
    "prismatic_config_for_shape",
    "tiny_llama_tokenizer",
    "tiny_timm_siglip",
    "write_tiny_prismatic",
]

# What the BPE learns its merges from: the prompt format, the grounding question and a few answers.
_CORPUS = (
    "In: Please provide the bounding box coordinate of the region this sentence describes:",
    'Out: [0.12, 0.34, 0.56, 0.78] "the red cat on the left" the dog',
    " ".join(WORDS),
)


@dataclass(frozen=True)
class TinyPrismatic:
    """Where `write_tiny_prismatic` put the run, the timm vision weights and the Llama directory."""

    run_dir: Path
    vision_weights: Path
    llm_dir: Path


def tiny_llama_tokenizer(*, legacy: bool = False, vocab_size: int = 400) -> LlamaTokenizer:
    """A Llama-2-like tokenizer: `<unk>` 0, `<s>` 1, `</s>` 2, the 256 byte tokens, then BPE pieces of `_CORPUS`.

    `legacy` is Llama's flag: False puts the word mark `▁` only at the start of the text, True after each special
    token too.
    """
    trainer_backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False)
    trainer_backend.train_from_iterator(list(_CORPUS), trainer)
    trained = json.loads(trainer_backend.to_str())["model"]
    base = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    vocab = {token: i for i, token in enumerate(base)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True, add_eos_token=False)


def tiny_timm_siglip(
    *, hidden: int = 64, layers: int = 3, intermediate: int = 128, patch: int = 32, image_size: int = 384, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random timm SigLIP ViT state dict (timm's key names, no [CLS], `attn_pool` head), seeded.

    Weights are drawn with std 1/√fan_in so that features stay of order one through the blocks.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def norm(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + normal(hidden, std=0.1), f"{name}.bias": normal(hidden, std=0.1)}

    side = image_size // patch
    state = {
        "patch_embed.proj.weight": normal(hidden, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "patch_embed.proj.bias": normal(hidden, std=0.1),
        "pos_embed": normal(1, side * side, hidden, std=0.5),
    }
    for i in range(layers):
        block = f"blocks.{i}"
        state |= norm(f"{block}.norm1") | norm(f"{block}.norm2")
        state |= {
            f"{block}.attn.qkv.weight": normal(3 * hidden, hidden, std=hidden**-0.5),
            f"{block}.attn.qkv.bias": normal(3 * hidden, std=0.1),
            f"{block}.attn.proj.weight": normal(hidden, hidden, std=hidden**-0.5),
            f"{block}.attn.proj.bias": normal(hidden, std=0.1),
            f"{block}.mlp.fc1.weight": normal(intermediate, hidden, std=hidden**-0.5),
            f"{block}.mlp.fc1.bias": normal(intermediate, std=0.1),
            f"{block}.mlp.fc2.weight": normal(hidden, intermediate, std=intermediate**-0.5),
            f"{block}.mlp.fc2.bias": normal(hidden, std=0.1),
        }
    state |= norm("norm")
    state |= {  # the attention-pool head ('map'): never reached by Prismatic's features
        "attn_pool.latent": normal(1, 1, hidden, std=0.1),
        "attn_pool.q.weight": normal(hidden, hidden, std=0.1),
        "attn_pool.q.bias": normal(hidden, std=0.1),
    }
    return state


def write_tiny_prismatic(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    legacy: bool = False,
    text_hidden: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    vision_layers: int = 3,
    full_finetune: bool = False,
    pad_to_multiple_of: int = 64,
) -> TinyPrismatic:
    """Writes a tiny Prismatic run, its timm vision weights and its Llama directory under `root` (see module doc).

    `full_finetune` also saves the tower in the checkpoint (`vision_backbone`, keys `featurizer.*`), as
    Prismatic's "full-finetune" stage does. `pad_to_multiple_of` rounds the embedding's rows up as Prismatic does
    (64); 1 leaves no spare row for the converter's `<image>` id.
    """
    root = Path(root)
    run_dir, timm_dir, llm_dir = root / "run", root / "timm", root / "llama"
    for folder in (run_dir / "checkpoints", timm_dir, llm_dir):
        folder.mkdir(parents=True, exist_ok=True)

    tokenizer = tiny_llama_tokenizer(legacy=legacy)
    base_vocab = len(tokenizer)  # the Hub Llama-2's 32000
    llama = LlamaConfig(
        vocab_size=base_vocab,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    llama.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)

    # LLaMa2LLMBackbone: `<PAD>` added, then resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    rows = -(-(base_vocab + 1) // pad_to_multiple_of) * pad_to_multiple_of
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(LlamaConfig(**(llama.to_dict() | {"vocab_size": rows})))
        vision = tiny_timm_siglip(layers=vision_layers, seed=seed + 1)
        hidden = vision["pos_embed"].shape[-1]
        projector = torch.nn.Sequential(
            torch.nn.Linear(hidden, text_hidden), torch.nn.GELU(), torch.nn.Linear(text_hidden, text_hidden)
        )
    checkpoint = {
        "projector": {f"projector.{k}": v for k, v in projector.state_dict().items()},
        "llm_backbone": {f"llm.{k}": v for k, v in llm.state_dict().items()},
    }
    if full_finetune:
        checkpoint["vision_backbone"] = {f"featurizer.{k}": v for k, v in vision.items()}
    torch.save({"model": checkpoint}, run_dir / "checkpoints" / "latest-checkpoint.pt")

    config = {
        "model": {
            "model_id": "prism-siglip-controlled+7b",
            "arch_specifier": "no-align+gelu-mlp",
            "vision_backbone_id": "siglip-vit-so400m-384px",
            "llm_backbone_id": "llama2-7b-pure",
            "image_resize_strategy": "resize-naive",
            "llm_max_length": 2048,
        },
        "run_id": "prism-siglip-controlled+7b+tiny",
        "seed": seed,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # timm's Hub file for SigLIP is open_clip's: the image tower under visual.trunk., the text tower beside it
    hub = {f"visual.trunk.{k}": v for k, v in vision.items()}
    hub |= {"text.token_embedding.weight": torch.zeros(8, hidden), "logit_scale": torch.zeros(())}
    vision_weights = timm_dir / "open_clip_pytorch_model.bin"
    torch.save(hub, vision_weights)
    return TinyPrismatic(run_dir=run_dir, vision_weights=vision_weights, llm_dir=llm_dir)


def prismatic_config_for_shape(shape: ModelShape) -> LlavaConfig:
    """A random-weight-ready `LlavaConfig` laid out as a converted Prismatic model of `shape`'s dimensions.

    For benchmarks (`vlmprune bench --shape prismatic-7b`): a SigLIP tower of `shape.vision.layers` blocks (all of
    them run, as in Prismatic's timm tower) at patch 14, features of layer -2, every token ("full"), and the tiny
    word-level tokenizer's ids (`tiny_llava_config`), whose processor gives the same (grid)² image tokens.
    """
    if shape.family != "prismatic" or shape.vision is None or shape.images != 1 or shape.grid[0] != shape.grid[1]:
        raise ValueError(f"{shape.name} is a {shape.family} shape, not a one-image Prismatic layout")
    vision = shape.vision
    config = tiny_llava_config(
        text_layers=shape.layers,
        text_hidden=shape.hidden,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        intermediate=shape.intermediate,
        vision_hidden=vision.hidden,
        vision_layers=vision.layers,
        image_size=shape.grid[0] * 14,
        patch_size=14,
        vocab_size=shape.vocab,
    )
    config.vision_config = SiglipVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.layers,
        num_attention_heads=max(1, vision.hidden // 72),  # so400m: 16 heads of 72
        image_size=shape.grid[0] * 14,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    config.vision_feature_select_strategy = "full"
    config.projector_hidden_act = "gelu"
    return config
