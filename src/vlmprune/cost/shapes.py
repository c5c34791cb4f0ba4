"""Model shapes for cost accounting: the dimensions that FLOPs and KV-cache size depend on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vlmprune.errors import VlmpruneError

__all__ = ["SHAPES", "ModelShape", "VisionShape", "get_shape", "shape_from_config"]


@dataclass(frozen=True)
class VisionShape:
    """A ViT vision tower and its projector.

    Attributes:
        tokens: tokens the tower runs on per image (LLaVA's CLIP: 576 patches + [CLS]).
        projector: (in, out) of each linear layer of the projector, applied to the image tokens the LLM gets.
    """

    hidden: int
    intermediate: int
    layers: int
    tokens: int
    projector: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ModelShape:
    """A VLM's dimensions.

    Attributes:
        hidden, intermediate, layers: the language model's d, m and depth.
        heads, kv_heads, head_dim: attention heads; kv_heads < heads is grouped-query attention.
        vocab: LM-head rows.
        mlp_projections: linear layers in one MLP block (3 for SwiGLU/LLaMA, 2 for a GELU MLP).
        image_tokens: image tokens per prompt reaching the LLM by default.
        grid: (rows, cols) of one image's token grid, for methods that sample a grid.
        images: images per prompt (LLaVA-NeXT's crops count as images).
        vision: the vision tower, or None to leave it out of the exact count.
        family: the model family the layout is ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
            "qwen3_vl", "prismatic"): the transformers model_type.
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    image_tokens: int
    grid: tuple[int, int]
    images: int = 1
    mlp_projections: int = 3
    head_dim: int = 0
    vision: VisionShape | None = field(default=None)
    family: str = "llava"

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    def parameters(self) -> int:
        """Approximate parameter count (decoder, embeddings and head, vision tower, projector)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = d * (2 * q + 2 * kv) + self.mlp_projections * d * self.intermediate
        total = self.layers * layer + 2 * self.vocab * d
        if self.vision is not None:
            v = self.vision
            total += v.layers * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate)
            total += sum(i * o for i, o in v.projector)
        return total

    def with_image_tokens(self, image_tokens: int) -> ModelShape:
        return replace(self, image_tokens=image_tokens)


_CLIP_L_336 = VisionShape(hidden=1024, intermediate=4096, layers=23, tokens=577, projector=((1024, 4096), (4096, 4096)))
_CLIP_L_336_13B = replace(_CLIP_L_336, projector=((1024, 5120), (5120, 5120)))
_SIGLIP_SO400M = VisionShape(
    hidden=1152, intermediate=4304, layers=27, tokens=729, projector=((1152, 4096), (4096, 4096))
)
# LLaVA-OneVision's SigLIP SO400M at 384 px (27 x 27 patches, no [CLS]; the llava-hf checkpoints keep 26 of its 27
# layers and take the last one's features) + GELU MLP to Qwen2-7B
_SIGLIP_SO400M_OV = VisionShape(
    hidden=1152, intermediate=4304, layers=26, tokens=729, projector=((1152, 3584), (3584, 3584))
)
_QWEN25_VIT = VisionShape(
    hidden=1280, intermediate=3420, layers=32, tokens=4096, projector=((5120, 5120), (5120, 3584))
)
# Qwen2-VL's ViT (675M; MLP ratio 4): 4096 patches of a 896x896 image, merged 2x2 into 1024 tokens
_QWEN2_VIT = VisionShape(hidden=1280, intermediate=5120, layers=32, tokens=4096, projector=((5120, 5120), (5120, 3584)))
# Qwen3-VL's SigLIP-2 ViT (patch 16): 4096 patches of a 1024x1024 image; the merger and the three DeepStack
# mergers (same shape) each run on every image token
_QWEN3_VIT = VisionShape(
    hidden=1152, intermediate=4304, layers=27, tokens=4096, projector=((4608, 4608), (4608, 4096)) * 4
)
# the tiny Qwen-VL models of vlmprune.testing.qwen_vl (4x4 tokens of a 112 px image, 128 px for Qwen3-VL)
_QWEN_TINY_VIT = VisionShape(hidden=32, intermediate=64, layers=2, tokens=64, projector=((128, 128), (128, 64)))

SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        # Vicuna-7B + CLIP ViT-L/14-336 (features from layer -2, so 23 of its 24 layers run) + 2-layer MLP
        ModelShape("llava-1.5-7b", 4096, 11008, 32, 32, 32, 32064, 576, (24, 24), vision=_CLIP_L_336),
        ModelShape("llava-1.5-13b", 5120, 13824, 40, 40, 40, 32064, 576, (24, 24), vision=_CLIP_L_336_13B),
        # anyres at 672x672: base image + 2x2 crops, 5 x 576 tokens (the PyramidDrop/VisPruner accounting)
        ModelShape(
            "llava-next-7b",
            4096,
            11008,
            32,
            32,
            32,
            32064,
            2880,
            (24, 24),
            images=5,
            vision=_CLIP_L_336,
            family="llava_next",
        ),
        # Qwen2-7B + its ViT (2x2 patch merger); 1024 tokens is a 896x896 image
        ModelShape("qwen2-vl-7b", 3584, 18944, 28, 28, 4, 152064, 1024, (32, 32), vision=_QWEN2_VIT, family="qwen2_vl"),
        # Qwen2-7B + SigLIP: anyres_max_9 at 1152x1152, a base crop and 3x3 crops of 729 patches, the 81x81 grid
        # kept as is (not above 9 crops' worth); newlines (one per row, 81) are not image tokens
        ModelShape(
            "llava-onevision-7b",
            3584,
            18944,
            28,
            28,
            4,
            152064,
            7290,
            (27, 27),
            images=10,
            vision=_SIGLIP_SO400M_OV,
            family="llava_onevision",
        ),
        # Qwen2.5-7B + its ViT (window attention, 2x2 patch merger); 1024 tokens is a 896x896 image
        ModelShape(
            "qwen2.5-vl-7b", 3584, 18944, 28, 28, 4, 152064, 1024, (32, 32), vision=_QWEN25_VIT, family="qwen2_5_vl"
        ),
        # Qwen3-8B (head dim 128) + its ViT with DeepStack; 1024 tokens is a 1024x1024 image
        ModelShape(
            "qwen3-vl-8b",
            4096,
            12288,
            36,
            32,
            8,
            151936,
            1024,
            (32, 32),
            head_dim=128,
            vision=_QWEN3_VIT,
            family="qwen3_vl",
        ),
        *(
            ModelShape(f"{name}-tiny", 64, 128, 6, 4, 2, 234, 16, (4, 4), vision=_QWEN_TINY_VIT, family=family)
            for name, family in (("qwen2-vl", "qwen2_vl"), ("qwen2.5-vl", "qwen2_5_vl"), ("qwen3-vl", "qwen3_vl"))
        ),
        # FEATHER's model (prism-siglip-controlled+7b): Llama-2-7B + SigLIP SO400M at 384 px (27 x 27 = 729 tokens,
        # no [CLS]) + GELU MLP; Prismatic adds <PAD> and pads the vocabulary to a multiple of 64 (32064 rows)
        ModelShape(
            "prismatic-7b", 4096, 11008, 32, 32, 32, 32064, 729, (27, 27), vision=_SIGLIP_SO400M, family="prismatic"
        ),
        # a smoke-test LLaVA (6 layers, 12 x 12 grid) that benchmarks in seconds
        ModelShape(
            "llava-tiny",
            128,
            256,
            6,
            4,
            2,
            228,
            144,
            (12, 12),
            vision=VisionShape(64, 256, 1, 145, ((64, 128), (128, 128))),
        ),
        # smoke-test LLaVA-NeXT and OneVision (6 layers, 4 x 4 patches a crop, a base image and 2 x 2 crops)
        ModelShape(
            "llava-next-tiny",
            64,
            128,
            6,
            4,
            2,
            229,
            80,
            (4, 4),
            images=5,
            vision=VisionShape(32, 64, 1, 17, ((32, 64), (64, 64))),
            family="llava_next",
        ),
        ModelShape(
            "llava-onevision-tiny",
            64,
            128,
            6,
            4,
            2,
            229,
            80,
            (4, 4),
            images=5,
            vision=VisionShape(32, 64, 2, 16, ((32, 64), (64, 64))),
            family="llava_onevision",
        ),
        # the CPU benchmark's LLaVA-1.5 layout (576 tokens, 32 layers) with a narrow LLM and a tiny tower
        ModelShape(
            "llava-cpu-mid",
            512,
            1376,
            32,
            8,
            8,
            228,
            576,
            (24, 24),
            vision=VisionShape(64, 256, 1, 577, ((64, 512), (512, 512))),
        ),
    )
}


def get_shape(name: str) -> ModelShape:
    """A named shape; raises naming the known ones."""
    if name not in SHAPES:
        raise VlmpruneError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)} (or give a config file)")
    return SHAPES[name]


# a Qwen-VL config names no image size: its shapes count a 32x32 grid of merged tokens (896 px at patch 14)
QWEN_DEFAULT_GRID = (32, 32)


def shape_from_config(config: Any, name: str = "config") -> ModelShape:
    """The shape of a transformers LLaVA-style config (`text_config` + `vision_config`), or of a Qwen-VL one
    (dynamic resolution: `QWEN_DEFAULT_GRID` image tokens unless told otherwise)."""
    text = getattr(config, "text_config", None)
    vision = getattr(config, "vision_config", None)
    if text is None or vision is None:
        raise VlmpruneError(f"{name}: expected a VLM config with text_config and vision_config")
    if getattr(config, "model_type", "") in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return _qwen_shape(config, text, vision, name)
    heads = text.num_attention_heads
    side = vision.image_size // vision.patch_size
    feature_layer = getattr(config, "vision_feature_layer", -1)
    vision_layers = vision.num_hidden_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    hidden = text.hidden_size
    # a SigLIP tower has no [CLS]: it runs on the patches alone
    cls_tokens = 0 if str(getattr(vision, "model_type", "")).startswith("siglip") else 1
    projector_hidden = getattr(config, "projector_hidden_size", None) or hidden
    return ModelShape(
        name=name,
        hidden=hidden,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab=text.vocab_size,
        image_tokens=side * side,
        grid=(side, side),
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        vision=VisionShape(
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            layers=vision_layers,
            tokens=side * side + cls_tokens,
            projector=((vision.hidden_size, projector_hidden), (projector_hidden, hidden)),
        ),
    )


def _qwen_shape(config: Any, text: Any, vision: Any, name: str) -> ModelShape:
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL config's shape: each image token is 2x2 patches merged by an MLP (Qwen3-VL
    also runs one DeepStack merger per `deepstack_visual_indexes`)."""
    heads = text.num_attention_heads
    merge = vision.spatial_merge_size**2
    rows, cols = QWEN_DEFAULT_GRID
    if config.model_type == "qwen2_vl":  # Qwen2-VL's tower names its width embed_dim and its MLP by a ratio
        width, intermediate = vision.embed_dim, vision.embed_dim * vision.mlp_ratio
    else:
        width, intermediate = vision.hidden_size, vision.intermediate_size
    merged = width * merge
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", ()) or ())
    return ModelShape(
        name=name,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab=text.vocab_size,
        image_tokens=rows * cols,
        grid=(rows, cols),
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vision=VisionShape(
            hidden=width,
            intermediate=intermediate,
            layers=vision.depth,
            tokens=rows * cols * merge,
            projector=((merged, merged), (merged, text.hidden_size)) * mergers,
        ),
        family=config.model_type,
    )
