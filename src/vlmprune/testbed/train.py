"""Training the testbed model from scratch: reproducible from a seed, resumable, two stages.

Why two stages (../shared/reference/testbed-notes.md): trained end to end from random weights, the model
settles on answer priors within ~100 steps and the vision tower's gradient vanishes. Real LLaVA starts from a
pretrained CLIP; here the tower is first given dense supervision of its own:

1. "vision": the CLIP tower alone, with linear heads on its patch features (layer -2, which the LM reads, and
   the last layer, so no layer stays random) predicting per patch: foreground fraction; colour, shape and
   size of the object covering it (or background); and the patch's row and column (RoPE does not put positions
   into the values the LM reads, so the features must carry them). No patch is trained to carry its object's
   box: the language model has to read a box off the positions and content of the tokens it gets, so pruning
   an object's tokens can hurt localization as it does in a real VLM. `patch_box_target=True` (an ablation,
   and the recipe of checkpoints trained before it existed) adds that object's box to every patch's targets;
   a box then stays recoverable while any one patch of the object is kept. What a patch is trained on instead
   (`patch_extent_target`) is where the object lies within it: `[0, 0, 1, 1]` inside an object, the edge's
   offset on its border. A 14-pixel patch grid alone cannot place a small object's box at IoU 0.5 (a reader
   knowing exactly which patches each object covers at least 30% of reaches 0.70 on small held-out objects,
   any pixel of: 0.49); with the extents it places every box exactly, from the border patches' positions and
   content, which pruning can take away.
2. "lm": projector + Llama on question answering, the tower at a lower learning rate with the dense loss
   kept as an auxiliary term (weight `dense_weight`) so its features do not drift. Each image carries several
   question-answer blocks that share the image prefix: block `j` attends to the prefix and causally to
   itself only, with positions restarting after the prefix, so each block is exactly the prompt
   `"USER: <image>\\n{q} ASSISTANT:"` + answer that evaluation sees. The first `easy_images` use 2-3 objects.
   With `referent_attention_weight` > 0, head 0 of decoder layer `referent_attention_layer` is also taught where
   to look: its attention over the image from the token that answers a question about one object is pulled toward
   that object's patches (cross-entropy to their pixel shares). It names patches, never a box: the box is still
   read off the tokens the model is given. With `projector_dense_weight` > 0, linear heads on the projector's
   output are trained on the tower's per-patch targets (no box), so the tokens the language model reads keep each
   patch's colour. Without them colour questions stayed at chance in every run measured, although the tower knows
   every colour: linear probes of the shipped model (`vlmprune testbed eval --probe`) read an object's colour at
   1.00 from the tower, 0.93 from the projector's output, falling to 0.63 through the language model's layers, and
   0.30-0.37 at the answering token, where its shape reads at 1.00.

The loss is cross-entropy on the answer tokens and `</s>` only. Everything is determined by the seed: model
initialisation by `seed`, scene `i` of a stage by `seed` and `i`. A checkpoint (model, heads, optimizer,
scheduler, RNG, stage and data position) is written every `checkpoint_minutes` and when a run stops, so an
interrupted run continues where it stopped and produces the same weights as an uninterrupted one (on the
same device and thread count: floating-point reductions differ between those).

Files in the output directory: `checkpoint.pt` (training state), `model/` (the current model in fp16 with its
processor, `from_pretrained`-loadable), `log.jsonl` (one JSON object per line, `"event"` is `"train"` or
`"eval"`), `config.json` (the `TrainConfig`), `command.txt` (each command line that ran here), and
`checkpoint-vision.pt` (the state when the vision stage ended, to try LM-stage recipes from; see
`Trainer.reconfigure`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration

from vlmprune.adapters import get_adapter
from vlmprune.testbed.evaluate import evaluate
from vlmprune.testbed.model import (
    build_testbed_model,
    build_testbed_processor,
    build_testbed_tokenizer,
    encode_images,
    save_testbed,
    testbed_config,
)
from vlmprune.testbed.scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    TEST_SEED_OFFSET,
    make_scene,
    object_cover,
    patch_targets,
    sample_questions,
    scene_seed,
)

__all__ = [
    "LM_FIELDS",
    "LOGGING_FIELDS",
    "PRECISIONS",
    "DenseHeads",
    "PackedOutputs",
    "TrainConfig",
    "Trainer",
    "lm_logits",
    "scaled_recipe",
    "train",
    "trim_log",
]

PRECISIONS = ("bf16", "fp32")  # what a training step computes in (`Trainer`'s `precision`)
_SEED_STRIDE = 40_000_000  # training scenes of seed s: [s * stride, (s + 1) * stride), all below the test range
_LM_SCENE_OFFSET = 20_000_000  # the LM stage's scenes start here within a seed's range


@dataclass
class TrainConfig:
    """Everything that determines a run; stored in the checkpoint, so a resumed run keeps its own."""

    seed: int = 0
    model: dict[str, int] = field(default_factory=dict)  # keyword arguments of `testbed_config`
    # stage 1: dense per-patch supervision of the vision tower
    vision_images: int = 48_000
    vision_batch: int = 32
    vision_lr: float = 1e-3
    # stage 2: projector + LM (tower and heads at tower_lr_scale * lm_lr), several Q/A blocks per image
    lm_images: int = 400_000
    lm_batch: int = 16
    where_per_image: int = 4
    other_per_image: int = 4
    lm_lr: float = 1e-3  # what every box-free run measured used; 2e-3 learned more slowly (benchmarks/results)
    tower_lr_scale: float = 0.1
    dense_weight: float = 0.5
    patch_box_target: bool = False  # ablation: every object patch also predicts its object's box (see above)
    # every patch holding an object pixel also predicts where that object lies within the patch (see above)
    patch_extent_target: bool = True
    # head 0 of this decoder layer is taught where to look: its image attention from the token before a one-object
    # question's answer toward that object's patches (by pixel share), weighted so in the loss (0: off)
    referent_attention_weight: float = 0.0
    referent_attention_layer: int = 4
    # linear heads on the projector's output predict each patch's foreground, colour, shape, size, row and column
    # (no box), weighted so in the loss: the language model's input keeps what the tower knows (0: off, as before
    # the field existed; without them colour questions stayed at chance)
    projector_dense_weight: float = 0.5
    easy_images: int = 32_000
    # both stages
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # the learning rate decays linearly over this last fraction of a stage
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every_steps: int = 20
    vision_eval_every_images: int = 4_800
    lm_eval_every_images: int = 2_000
    eval_limit: int = 200
    checkpoint_minutes: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0 <= self.seed < TEST_SEED_OFFSET // _SEED_STRIDE:
            raise ValueError(f"seed must be in [0, {TEST_SEED_OFFSET // _SEED_STRIDE}), got {self.seed}")
        for name in ("vision_batch", "lm_batch", "log_every_steps", "eval_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "vision_images",
            "lm_images",
            "easy_images",
            "where_per_image",
            "other_per_image",
            "referent_attention_layer",
            "dense_weight",
            "referent_attention_weight",
            "projector_dense_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.where_per_image + self.other_per_image < 1:
            raise ValueError("where_per_image + other_per_image must be >= 1")

    def steps(self, stage: str) -> int:
        """Optimizer steps of `stage` ("vision" or "lm")."""
        if stage == "vision":
            return math.ceil(self.vision_images / self.vision_batch)
        return math.ceil(self.lm_images / self.lm_batch)


def scaled_recipe(config: TrainConfig, factor: int) -> TrainConfig:
    """`config` with `factor` times the batches of both stages, learning rates scaled by √factor (Adam's square-root
    rule) and warm-up steps divided by `factor`, so the same images are seen in `factor` times fewer steps: the
    recipe for hardware that takes larger batches (a GPU). Evaluation and logging stay per image."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"the batch scale must be a whole number >= 1, got {factor!r}")
    root = math.sqrt(factor)
    return dataclasses.replace(
        config,
        vision_batch=config.vision_batch * factor,
        lm_batch=config.lm_batch * factor,
        vision_lr=config.vision_lr * root,
        lm_lr=config.lm_lr * root,
        warmup_steps=max(1, config.warmup_steps // factor),
        log_every_steps=max(1, config.log_every_steps // factor),
    )


# fields a resumed run may change (see `Trainer.reconfigure`)
LOGGING_FIELDS = frozenset(
    {"log_every_steps", "vision_eval_every_images", "lm_eval_every_images", "eval_limit", "checkpoint_minutes"}
)
LM_FIELDS = frozenset(
    {
        "lm_batch",
        "where_per_image",
        "other_per_image",
        "lm_lr",
        "tower_lr_scale",
        "dense_weight",
        "easy_images",
        "referent_attention_weight",
        "referent_attention_layer",
        "projector_dense_weight",
    }
)

_STAGE_ORDER = {"vision": 0, "lm": 1, "done": 2}


def trim_log(path: str, stage: str, step: int) -> int:
    """Drop the records of `path` written after the checkpoint at (`stage`, `step`); returns how many.

    A run killed between checkpoints logged steps that its resumption repeats; without this the log would
    hold those steps twice, once from weights that no longer exist.
    """
    if not os.path.exists(path):
        return 0
    with open(path) as handle:
        lines = handle.readlines()
    position = (_STAGE_ORDER[stage], step)
    kept = [line for line in lines if (_STAGE_ORDER[(r := json.loads(line))["stage"]], r["step"]) <= position]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as handle:
            handle.writelines(kept)
        os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


# ---------------------------------------------------------------------------------------------- dense heads

_DENSE_SIZES = {"fg": 1, "colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "size": 1 + len(SIZES), "box": 4}


class DenseHeads(nn.Module):
    """Linear per-patch heads (training only, not part of the model): one per entry of `layers`, the tower's
    hidden states that `loss` reads (by default layer -2, which the LM reads, and the last layer).

    Input of a head: `(batch, patches, hidden)` patch features; output: logits split by target (see
    `_DENSE_SIZES`, plus `row` and `col` over the grid side). `patch_loss` takes the features directly, which is
    how the heads on the projector's output (`TrainConfig.projector_dense_weight`) are fed.
    """

    def __init__(self, hidden: int, side: int, layers: tuple[int, ...] = (-2, -1), extent: bool = False) -> None:
        super().__init__()
        self.side = side
        self.layers = layers
        # `extent` (`TrainConfig.patch_extent_target`) last, so heads without it keep the layout of older runs
        self.sizes = {**_DENSE_SIZES, "row": side, "col": side, **({"extent": 4} if extent else {})}
        total = sum(self.sizes.values())
        self.heads = nn.ModuleList(nn.Linear(hidden, total) for _ in layers)

    def split(self, index: int, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of head `index` on `features` `(batch, patches, hidden)`: name -> `(batch, patches, k)`."""
        out = self.heads[index](features)
        return dict(zip(self.sizes, out.split(list(self.sizes.values()), dim=-1), strict=True))

    def loss(
        self, hidden_states: tuple[torch.Tensor, ...], targets: dict[str, torch.Tensor], box: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`patch_loss` of the tower's `layers`; `hidden_states`: its per-layer states `(batch, 1 + patches,
        hidden)` ([CLS] first)."""
        return self.patch_loss([hidden_states[layer][:, 1:] for layer in self.layers], targets, box)

    def patch_loss(
        self, features: list[torch.Tensor], targets: dict[str, torch.Tensor], box: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean dense loss over the heads, and accuracies of the first head (the layer the LM reads), as 0-d tensors
        (read on the host only when logged: a training step does not wait for the device).

        `features`: one `(batch, patches, hidden)` tensor per head; `targets`: `patch_targets` stacked over the
        batch, each `(batch, patches[, 4])`; `box`: whether each object patch also predicts its object's box
        (`TrainConfig.patch_box_target`). Heads built with `extent` also predict, on every patch holding an object
        pixel, where that object lies within the patch (`patch_targets`' `extent`).
        """
        total = features[0].new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        obj = targets["colour"] > 0
        for index, patch_features in enumerate(features):
            logits = self.split(index, patch_features)
            loss = F.binary_cross_entropy_with_logits(logits["fg"].squeeze(-1), targets["fg"])
            for name in ("colour", "shape", "size", "row", "col"):
                loss = loss + F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten(), ignore_index=-100)
            if box:
                loss = loss + _regression_loss(logits["box"], targets["box"], obj)
            if "extent" in self.sizes:
                loss = loss + _regression_loss(logits["extent"], targets["extent"], targets["fg"] > 0)
            total = total + loss / len(features)
            if index == 0:
                with torch.no_grad():
                    metrics["dense_loss"] = loss.detach()
                    fg_pred = logits["fg"].squeeze(-1) > 0
                    metrics["fg_acc"] = (fg_pred == (targets["fg"] > 0.5)).float().mean()
                    objects = obj.sum().clamp(min=1)  # accuracies over object patches (0 when there are none)
                    for name in ("colour", "shape", "size"):
                        right = (logits[name].argmax(-1) == targets[name]) & obj
                        metrics[f"{name}_acc"] = right.sum() / objects
                    rowcol = (logits["row"].argmax(-1) == targets["row"]) & (logits["col"].argmax(-1) == targets["col"])
                    metrics["rowcol_acc"] = rowcol.float().mean()
                    if box:  # in image widths
                        metrics["box_l1"] = _masked_mean(F.l1_loss, logits["box"], targets["box"], obj)
                    if "extent" in self.sizes:  # in patch widths
                        touched = targets["fg"] > 0
                        metrics["extent_l1"] = _masked_mean(F.l1_loss, logits["extent"], targets["extent"], touched)
        return total, metrics


def _regression_loss(logits: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The loss of a regression head, `(batch, patches, 4)` logits against targets in [0, 1]: 10x the smooth L1 of
    their sigmoid over the patches `where` `(batch, patches)` holds."""
    return 10.0 * _masked_mean(partial(F.smooth_l1_loss, beta=0.05), logits, target, where)


def _masked_mean(
    error: Callable[..., torch.Tensor], logits: torch.Tensor, target: torch.Tensor, where: torch.Tensor
) -> torch.Tensor:
    """Mean `error` (elementwise, `reduction="none"`) of `sigmoid(logits)` against `target` over the patches `where`;
    a 0-d zero when there are none, without asking the device which (no host synchronisation)."""
    per_patch = error(logits.sigmoid(), target, reduction="none").mean(-1)
    return (per_patch * where).sum() / where.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------- batches


def _pixels(images: list, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """CLIP-normalized pixels `(batch, 3, H, W)`; equals the processor's output for `IMAGE_SIZE` images."""
    array = np.stack([np.asarray(image, dtype=np.float64) for image in images]) / 255.0
    return torch.from_numpy(((array - mean) / std).transpose(0, 3, 1, 2)).float()


def _targets(scenes: list, patch: int) -> dict[str, torch.Tensor]:
    per_scene = [patch_targets(scene, patch) for scene in scenes]
    return {name: torch.from_numpy(np.stack([t[name] for t in per_scene])) for name in per_scene[0]}


class _Batcher:
    """Builds the batches of a run from (seed, stage, index): the data position is one integer per stage."""

    def __init__(self, config: TrainConfig, model_config) -> None:
        self.config = config
        self.tokenizer = build_testbed_tokenizer()
        vision = model_config.vision_config
        processor = build_testbed_processor(vision.image_size, vision.patch_size)
        self.mean = np.array(processor.image_processor.image_mean)
        self.std = np.array(processor.image_processor.image_std)
        self.patch = model_config.vision_config.patch_size
        self.n_image = (model_config.vision_config.image_size // self.patch) ** 2
        tok = self.tokenizer
        self.prefix = [tok.bos_token_id, *tok.convert_tokens_to_ids(["user", ":"])]
        self.image_start = len(self.prefix)  # position of the first image token
        self.prefix += [model_config.image_token_id] * self.n_image
        self.assistant = tok.convert_tokens_to_ids(["assistant", ":"])
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id
        self.image_token_id = model_config.image_token_id

    def scene_index(self, stage: str, index: int) -> int:
        base = self.config.seed * _SEED_STRIDE + (_LM_SCENE_OFFSET if stage == "lm" else 0)
        return base + index

    def vision_batch(self, start: int) -> dict[str, torch.Tensor]:
        """Images `start..start+vision_batch` of the vision stage: `pixel_values` and dense `targets`."""
        scenes = [
            make_scene(scene_seed("train", self.scene_index("vision", start + k)))
            for k in range(self.config.vision_batch)
        ]
        return {
            "pixel_values": _pixels([s.image() for s in scenes], self.mean, self.std),
            "targets": _targets(scenes, self.patch),
        }

    def lm_batch(self, start: int) -> dict[str, torch.Tensor]:
        """Images `start..start+lm_batch` of the LM stage with their packed question-answer blocks.

        Returns `pixel_values` `(batch, 3, H, W)`, `targets` (dense), `input_ids` `(batch, L)`,
        `attention_mask` `(batch, 1, L, L)` bool (True = may attend), `position_ids` `(batch, L)`,
        `label_index` `(n, 2)` (batch row, position whose logits predict) with `labels` `(n,)`, and for the blocks
        about one object (where, colour, shape, size) `referent_index` `(k, 2)` (batch row, position predicting
        the first answer token) with `referent_cover` `(k, image tokens)`: that object's share of each patch,
        normalized to sum 1 (see `TrainConfig.referent_attention_weight`).
        """
        config = self.config
        scenes, rows = [], []
        for k in range(config.lm_batch):
            index = start + k
            seed = scene_seed("train", self.scene_index("lm", index))
            easy = index < config.easy_images
            scene = make_scene(seed, min_objects=2, max_objects=3) if easy else make_scene(seed)
            rng = np.random.default_rng([seed, 3])
            questions = sample_questions(scene, config.where_per_image, config.other_per_image, rng)
            scenes.append(scene)
            rows.append(questions)
        length = 0
        encoded = []
        for questions in rows:
            blocks = []
            for q in questions:
                q_ids = self.tokenizer(q.text, add_special_tokens=False).input_ids + self.assistant
                a_ids = [*self.tokenizer(q.answer, add_special_tokens=False).input_ids, self.eos]
                blocks.append((q_ids, a_ids))
            encoded.append(blocks)
            length = max(length, len(self.prefix) + sum(len(q) + len(a) for q, a in blocks))
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad, dtype=torch.long)
        positions = torch.zeros((batch, length), dtype=torch.long)
        mask = torch.zeros((batch, 1, length, length), dtype=torch.bool)
        label_index, labels = [], []
        referent_index, referent_cover = [], []
        n_prefix = len(self.prefix)
        causal = torch.ones((n_prefix, n_prefix), dtype=torch.bool).tril()
        for b, (blocks, scene, questions) in enumerate(zip(encoded, scenes, rows, strict=True)):
            cover = object_cover(scene, self.patch)
            input_ids[b, :n_prefix] = torch.tensor(self.prefix)
            positions[b, :n_prefix] = torch.arange(n_prefix)
            mask[b, 0, :n_prefix, :n_prefix] = causal
            cursor = n_prefix
            for (q_ids, a_ids), question in zip(blocks, questions, strict=True):
                if question.referent is not None:
                    referent_index.append((b, cursor + len(q_ids) - 1))
                    referent_cover.append(cover[question.referent] / cover[question.referent].sum())
                ids = q_ids + a_ids
                n = len(ids)
                span = slice(cursor, cursor + n)
                input_ids[b, span] = torch.tensor(ids)
                positions[b, span] = torch.arange(n_prefix, n_prefix + n)
                mask[b, 0, span, :n_prefix] = True
                mask[b, 0, span, span] = torch.ones((n, n), dtype=torch.bool).tril()
                for j, token in enumerate(a_ids):  # the token before each answer token predicts it
                    label_index.append((b, cursor + len(q_ids) - 1 + j))
                    labels.append(token)
                cursor += n
            for p in range(cursor, length):  # padding attends to itself only (no empty softmax rows)
                mask[b, 0, p, p] = True
                positions[b, p] = n_prefix
        return {
            "pixel_values": _pixels([s.image() for s in scenes], self.mean, self.std),
            "targets": _targets(scenes, self.patch),
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "label_index": torch.tensor(label_index, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "referent_index": torch.tensor(referent_index, dtype=torch.long).reshape(-1, 2),
            "referent_cover": torch.from_numpy(
                np.stack(referent_cover) if referent_cover else np.zeros((0, self.n_image), np.float32)
            ),
        }


class _StageBatches(torch.utils.data.Dataset):
    """The batches of a stage from image `first` on, item k starting at image `first + k * batch`: each a pure
    function of (seed, stage, index), so workers build them in any order and a run is bit-identical with any number
    of workers, and resumes at its image count. Endless: the stage's length may change while it runs (`extend`),
    and the trainer drops the stream when the stage ends."""

    def __init__(self, batcher: _Batcher, stage: str, first: int, batch: int) -> None:
        self.batcher, self.stage, self.first, self.batch = batcher, stage, first, batch

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        start = self.first + k * self.batch
        return self.batcher.vision_batch(start) if self.stage == "vision" else self.batcher.lm_batch(start)


class PackedOutputs(NamedTuple):
    """What `lm_logits` returns for a packed batch."""

    logits: torch.Tensor  # (n, vocab) at `label_index`
    vision_hidden_states: tuple[torch.Tensor, ...]  # the tower's, each (batch, 1 + patches, vision hidden)
    image_embeds: torch.Tensor  # (batch, patches, text hidden): the projector's output, what the LM reads
    referent_scores: torch.Tensor | None  # (k, image tokens), with `referent_layer`


def lm_logits(
    model: LlavaForConditionalGeneration,
    batch: dict[str, torch.Tensor],
    referent_layer: int | None = None,
    image_start: int = 0,
) -> PackedOutputs:
    """LLaVA's forward on a packed batch: logits `(n, vocab)` at `label_index`, the tower's hidden states, the
    projected image tokens and, with `referent_layer`, `referent_scores` of that layer.

    The same computation as `LlavaModel.forward` (tower layer `vision_feature_layer`, [CLS] dropped,
    projector, scatter into the `<image>` positions, the language model), with a custom 4-D mask and
    positions, computing the LM head only where there are labels. `referent_scores` `(k, image tokens)` are the
    pre-softmax attention scores of head 0 of decoder layer `referent_layer` from each `referent_index` row to
    the image tokens, which start at position `image_start` (RoPE applied, as the layer computes them).
    """
    inner = model.model
    vision_hidden_states, image_embeds = encode_images(model, batch["pixel_values"])
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    image_mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
    mask = batch["attention_mask"]  # bool: sdpa reads it as is; eager adds a 4-D mask to its scores: make it additive
    if model.config.text_config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(embeds.dtype).min
        )
    output = inner.language_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=batch["position_ids"],
        output_hidden_states=referent_layer is not None,
    )
    index = batch["label_index"]
    logits = model.lm_head(output.last_hidden_state[index[:, 0], index[:, 1]])
    referent_scores = None
    if referent_layer is not None:
        layer_input = output.hidden_states[referent_layer]  # (batch, L, hidden): what the layer's attention reads
        referent_scores = _referent_scores(model, layer_input, batch, referent_layer, image_start)
    return PackedOutputs(logits, vision_hidden_states, image_embeds, referent_scores)


def _referent_scores(
    model: LlavaForConditionalGeneration,
    hidden: torch.Tensor,
    batch: dict[str, torch.Tensor],
    layer_index: int,
    image_start: int,
) -> torch.Tensor:
    """`(k, image tokens)` head-0 attention scores of decoder layer `layer_index` (input `hidden`) from the
    `referent_index` rows to the image tokens, which start at `image_start`."""
    adapter = get_adapter(model)
    layer = adapter.layers[layer_index]
    rows, positions = batch["referent_index"][:, 0], batch["referent_index"][:, 1]
    n_image = batch["referent_cover"].shape[1]
    image_positions = image_start + torch.arange(n_image, device=hidden.device)
    cos, sin = adapter.position_embeddings(hidden, batch["position_ids"])  # each (batch, L, head_dim)
    queries = adapter.project(
        layer,
        adapter.normed_input(layer, hidden[rows, positions]).unsqueeze(1),
        "q",
        (cos[rows, positions].unsqueeze(1), sin[rows, positions].unsqueeze(1)),
    )  # (k, heads, 1, head_dim)
    keys = adapter.project(
        layer,
        adapter.normed_input(layer, hidden[rows][:, image_positions]),
        "k",
        (cos[rows][:, image_positions], sin[rows][:, image_positions]),
    )  # (k, heads, image tokens, head_dim)
    return (queries[:, 0] @ keys[:, 0].transpose(-1, -2)).squeeze(1) * adapter.scaling(layer)


# ---------------------------------------------------------------------------------------------- trainer


def _lr_lambda(warmup: int, total: int, decay: float, final: float) -> Callable[[int], float]:
    """Warm-up, then constant, then a linear decay to `final` over the last `decay` fraction of `total` steps.

    Warm-up-stable-decay rather than cosine: until the decay starts, the factor does not depend on `total`, so
    a run can be lengthened on resume (`Trainer.extend`) and still match a run planned that long from the start.
    """
    decay_start = int(total * (1 - decay))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - final) * min(1.0, (step - decay_start + 1) / max(1, total - decay_start))

    return factor


def _to(batch: dict, device: torch.device) -> dict:
    """`batch` (tensors and one nested dict of tensors) on `device`; from pinned memory the copies do not block."""
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True) for k, v in batch.items()}


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The gradients' global norm, a 0-d tensor on their device (0 when there are none)."""
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


class _StopOnSignal:
    """Turns SIGTERM (and SIGINT) into a request to stop after the current step, so a killed run checkpoints."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


class Trainer:
    """One training run in `out`: `Trainer(out, config).run(minutes=...)`; `Trainer.resume(out)` continues."""

    def __init__(
        self,
        out: str,
        config: TrainConfig,
        *,
        log: Callable[[str], None] | None = print,
        device: str = "cpu",
        workers: int = 0,
        precision: str | None = None,
    ) -> None:
        self.out = out
        self.device = torch.device(device)
        self.workers = workers  # processes rendering the next batches while a step runs (0: rendered in the step)
        # the steps' compute type (weights and optimizer stay float32): bf16 autocast by default on CUDA; on CPU
        # float32 unless asked, where bf16 (AVX-512 BF16) takes about three quarters of a float32 step's time
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.config = config
        self.print = log or (lambda _: None)
        os.makedirs(out, exist_ok=True)
        self.model_config = testbed_config(**config.model)
        self._check_fits_model(config)
        self.model = build_testbed_model(self.model_config, seed=config.seed).train()
        vision = self.model_config.vision_config
        side = vision.image_size // vision.patch_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.heads = DenseHeads(vision.hidden_size, side, extent=config.patch_extent_target)
            torch.manual_seed(config.seed + 2)  # its own seed: the tower's heads are those of runs without it
            # one head, fed the projector's output through `patch_loss` (it reads no tower layer)
            self.projector_heads = DenseHeads(
                self.model_config.text_config.hidden_size, side, layers=(0,), extent=config.patch_extent_target
            )
        self.model.to(self.device)
        self.heads.to(self.device)
        self.projector_heads.to(self.device)
        self.batcher = _Batcher(config, self.model_config)
        self.processor = build_testbed_processor(vision.image_size, vision.patch_size)
        self.stage = "vision" if config.vision_images > 0 else "lm"
        self.step = 0  # optimizer steps within the stage
        self.images = 0  # images seen within the stage
        self.questions = 0  # question-answer blocks seen (LM stage)
        self.train_seconds = 0.0
        self._eval_seconds = 0.0  # how long the last evaluation took
        self._make_optimizer()
        self._running: dict[str, list[torch.Tensor | float]] = {}  # metrics since the last log line
        self._write_config()

    def _check_fits_model(self, config: TrainConfig) -> None:
        depth = self.model_config.text_config.num_hidden_layers
        if config.referent_attention_weight > 0 and config.referent_attention_layer >= depth:
            raise ValueError(
                f"referent_attention_layer {config.referent_attention_layer} is past the language model's "
                f"{depth} layers (0 .. {depth - 1})"
            )

    def _write_config(self) -> None:
        with open(os.path.join(self.out, "config.json"), "w") as handle:
            json.dump(dataclasses.asdict(self.config), handle, indent=1)

    # -- optimizer per stage
    def _make_optimizer(self) -> None:
        config = self.config
        tower = list(self.model.model.vision_tower.parameters())
        if self.stage == "vision":
            groups = [{"params": tower + list(self.heads.parameters()), "lr": config.vision_lr}]
        else:
            tower_ids = {id(p) for p in tower}
            rest = [p for p in self.model.parameters() if id(p) not in tower_ids]
            # the projector heads join only when trained: otherwise the optimizer's state keeps the shape of runs
            # from before they existed, which then resume
            if config.projector_dense_weight > 0:
                rest += list(self.projector_heads.parameters())
            groups = [
                {"params": rest, "lr": config.lm_lr},
                {"params": tower + list(self.heads.parameters()), "lr": config.lm_lr * config.tower_lr_scale},
            ]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        total = config.steps(self.stage)
        warmup = max(1, min(config.warmup_steps, total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(warmup, total, config.decay_fraction, config.final_lr_fraction)
        )

    def decay_started(self) -> bool:
        """Whether the current stage's learning rate has begun its final decay."""
        return self.step >= int(self.config.steps(self.stage) * (1 - self.config.decay_fraction))

    def extend(self, lm_images: int) -> None:
        """Lengthen (or shorten) the LM stage to `lm_images` before its decay has started.

        The learning rate so far does not depend on the stage's length (warm-up-stable-decay), so the result
        equals a run configured with `lm_images` from the start.
        """
        self.reconfigure({"lm_images": lm_images})

    def reconfigure(self, changes: dict[str, object]) -> None:
        """Change config fields of a resumed run where the result still equals a run configured so from the start.

        - `LOGGING_FIELDS` (evaluation and checkpoint cadence) at any time: they do not touch the weights;
        - `LM_FIELDS` (the LM stage's recipe) until the LM stage has taken its first step: the vision stage
          does not read them, so a run resumed from the end of the vision stage (`checkpoint-vision.pt`) with
          new LM settings equals a fresh run with those settings;
        - `lm_images` until the LM stage's learning-rate decay has started (see `_lr_lambda`).
        """
        unknown = sorted(set(changes) - LOGGING_FIELDS - LM_FIELDS - {"lm_images"})
        if unknown:
            raise ValueError(
                f"cannot change {', '.join(unknown)} on resume; changeable: "
                f"{', '.join(sorted(LOGGING_FIELDS | LM_FIELDS | {'lm_images'}))}"
            )
        changes = {k: v for k, v in changes.items() if getattr(self.config, k) != v}
        if not changes:
            return
        lm_started = self.stage == "done" or (self.stage == "lm" and self.step > 0)
        recipe = sorted(set(changes) & LM_FIELDS)
        if recipe and lm_started:
            raise ValueError(f"cannot change {', '.join(recipe)}: the LM stage has started")
        if "lm_images" in changes:
            lm_images = int(changes["lm_images"])  # type: ignore[call-overload]
            if self.stage == "done" or (self.stage == "lm" and self.decay_started()):
                raise ValueError(
                    f"cannot change lm_images in stage {self.stage!r}: the learning-rate decay has started"
                )
            if self.stage == "lm" and lm_images < self.images + self.config.lm_batch:
                raise ValueError(f"lm_images {lm_images} is not beyond the {self.images} images already seen")
        config = dataclasses.replace(self.config, **changes)  # validated by __post_init__
        self._check_fits_model(config)
        self.config = config
        self.batcher.config = self.config
        if self.stage == "lm":
            optimizer_state, scheduler_state = self.optimizer.state_dict(), self.scheduler.state_dict()
            self._make_optimizer()
            if self.step > 0:
                self.optimizer.load_state_dict(optimizer_state)
                self.scheduler.load_state_dict(scheduler_state)
        self._write_config()
        self._log({"event": "reconfigure", "changes": changes})

    # -- checkpoints
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "config": dataclasses.asdict(self.config),
            "stage": self.stage,
            "step": self.step,
            "images": self.images,
            "questions": self.questions,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "heads": self.heads.state_dict(),
            "projector_heads": self.projector_heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "running": {k: [float(x) for x in v] for k, v in self._running.items()},
        }

    def save(self) -> None:
        """Write `checkpoint.pt` atomically and the current model to `model/` (fp16, `from_pretrained`)."""
        path = os.path.join(self.out, "checkpoint.pt")
        torch.save(self.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        save_testbed(self.model.cpu(), os.path.join(self.out, "model"))
        self.model.to(self.device)

    @classmethod
    def resume(
        cls,
        out: str,
        *,
        log: Callable[[str], None] | None = print,
        device: str = "cpu",
        workers: int = 0,
        precision: str | None = None,
    ) -> Trainer:
        """The trainer of `out/checkpoint.pt`, in the state it was saved in."""
        state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False, map_location="cpu")
        # runs from before these fields trained with the box target, without projector heads or extent targets
        stored = {
            "patch_box_target": True,
            "projector_dense_weight": 0.0,
            "patch_extent_target": False,
            **state["config"],
        }
        trainer = cls(out, TrainConfig(**stored), log=log, device=device, workers=workers, precision=precision)
        trainer.stage = state["stage"]
        trainer.step, trainer.images, trainer.questions = state["step"], state["images"], state["questions"]
        trainer.train_seconds = state["train_seconds"]
        trainer.model.load_state_dict(state["model"])
        trainer.heads.load_state_dict(state["heads"])
        if "projector_heads" in state:
            trainer.projector_heads.load_state_dict(state["projector_heads"])
        if trainer.stage != "done":
            trainer._make_optimizer()
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        trainer._running = state["running"]
        trim_log(os.path.join(out, "log.jsonl"), trainer.stage, trainer.step)
        return trainer

    # -- logging
    def _log(self, record: dict) -> None:
        record = {
            "time": round(time.time(), 1),
            "stage": self.stage,
            "step": self.step,
            "images": self.images,
            "questions": self.questions,
            "train_seconds": round(self.train_seconds, 1),
            **record,
        }
        with open(os.path.join(self.out, "log.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _accumulate(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for key, value in metrics.items():
            self._running.setdefault(key, []).append(value)

    def _flush_train_log(self) -> None:
        if not self._running:
            return
        means = {k: round(sum(float(x) for x in v) / len(v), 5) for k, v in self._running.items()}
        self._running = {}
        self._log({"event": "train", **means})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
        self.print(f"[{self.stage} step {self.step}/{self.config.steps(self.stage)}] {shown}")

    @torch.no_grad()
    def dense_eval(self) -> dict[str, float]:
        """Dense-head metrics on 64 held-out test scenes (the tower's own learning, independent of the LM), and in
        the LM stage with `projector_dense_weight` the projector heads' as `projected_*`."""
        scenes = [make_scene(scene_seed("test", 900_000 + k)) for k in range(64)]
        pixels = _pixels([s.image() for s in scenes], self.batcher.mean, self.batcher.std).to(self.device)
        hidden, projected = encode_images(self.model, pixels)
        targets = {k: v.to(self.device) for k, v in _targets(scenes, self.batcher.patch).items()}
        _, metrics = self.heads.loss(hidden, targets, self.config.patch_box_target)
        if self.stage == "lm" and self.config.projector_dense_weight > 0:
            _, projected_metrics = self.projector_heads.patch_loss([projected], targets)
            metrics.update({f"projected_{k}": v for k, v in projected_metrics.items()})
        return {k: float(v) for k, v in metrics.items()}

    def evaluate(self) -> None:
        started = time.time()
        dense = {f"heldout_{k}": round(v, 4) for k, v in self.dense_eval().items()}
        record: dict[str, object] = {"event": "eval", **dense}
        if self.stage != "vision":
            result = evaluate(self.model, self.processor, split="test", limit=self.config.eval_limit)
            record.update(
                localization_acc=result.localization_acc,
                other_acc=result.other_acc,
                mean_iou=round(result.mean_iou, 4),
                per_kind=result.per_kind,
            )
            self.print(f"[eval {self.stage} images {self.images}] {result.summary()}")
        self.print(
            f"[eval {self.stage} images {self.images}] dense: "
            + ", ".join(f"{k[8:]} {v:.3f}" for k, v in dense.items())
        )
        self._log(record)
        self._eval_seconds = time.time() - started

    # -- steps
    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The batch starting at the stage's current image, built here or by the workers ahead of time."""
        if self.workers == 0:
            build = self.batcher.vision_batch if self.stage == "vision" else self.batcher.lm_batch
            return build(self.images)
        if self._batches is None:  # from here to the stage's end, in order (reset when the stage or recipe changes)
            size = self.config.vision_batch if self.stage == "vision" else self.config.lm_batch
            stream = _StageBatches(self.batcher, self.stage, self.images, size)
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.workers,
                prefetch_factor=4,
                pin_memory=self.device.type == "cuda",  # so the copies to the device need not wait (`_to`)
            )
            self._batches = iter(loader)
        return next(self._batches)

    def _train_step(self) -> None:
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        batch = self._next_batch()
        if self.stage == "lm":  # counted on the host copy: no wait for the device
            self.questions += int((batch["labels"] == self.batcher.eos).sum())
        batch = _to(batch, self.device)
        if self.stage == "vision":
            with autocast:
                hidden = self.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
                loss, metrics = self.heads.loss(hidden, batch["targets"], config.patch_box_target)
            n_images = config.vision_batch
        else:
            supervise = config.referent_attention_weight > 0
            with autocast:
                logits, hidden, image_embeds, referent_scores = lm_logits(
                    self.model,
                    batch,
                    config.referent_attention_layer if supervise else None,
                    self.batcher.image_start,
                )
                lm_loss = F.cross_entropy(logits.float(), batch["labels"])
                dense_loss, dense_metrics = self.heads.loss(hidden, batch["targets"], config.patch_box_target)
                loss = lm_loss + config.dense_weight * dense_loss
                if config.projector_dense_weight > 0:
                    projected_loss, projected_metrics = self.projector_heads.patch_loss(
                        [image_embeds], batch["targets"]
                    )
                    loss = loss + config.projector_dense_weight * projected_loss
                if referent_scores is not None and referent_scores.shape[0]:
                    log_p = referent_scores.float().log_softmax(-1)
                    referent_loss = -(batch["referent_cover"] * log_p).sum(-1).mean()
                    loss = loss + config.referent_attention_weight * referent_loss
            metrics = {
                "lm_loss": lm_loss.detach(),
                "token_acc": (logits.argmax(-1) == batch["labels"]).float().mean(),
                "dense_loss": dense_metrics["dense_loss"],
                "colour_acc": dense_metrics["colour_acc"],
            }
            if config.projector_dense_weight > 0:
                metrics.update(
                    projected_loss=projected_metrics["dense_loss"], projected_colour_acc=projected_metrics["colour_acc"]
                )
            if referent_scores is not None and referent_scores.shape[0]:
                with torch.no_grad():  # the supervised head's image attention that lands on the referred object
                    on_object = (log_p.exp() * (batch["referent_cover"] > 0)).sum(-1).mean()
                metrics.update(referent_loss=referent_loss.detach(), referent_mass=on_object)
            n_images = config.lm_batch
        loss.backward()
        tower = list(self.model.model.vision_tower.parameters())
        metrics["tower_grad"] = _grad_norm(tower)
        if self.stage == "lm":
            metrics["lm_grad"] = _grad_norm(list(self.model.model.language_model.parameters()))
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self._accumulate(metrics)
        self.step += 1
        self.images += n_images

    def _eval_due(self, before: int) -> bool:
        every = self.config.vision_eval_every_images if self.stage == "vision" else self.config.lm_eval_every_images
        return every > 0 and before // every != self.images // every

    def plan_to_finish(self, seconds_left: float, images_per_second: float) -> None:
        """Set the LM stage's length so that, at `images_per_second` (evaluations included), it ends within
        `seconds_left`, before its learning-rate decay has started (`extend`: the result equals a run configured
        so from the start). The decay then starts at the next step at the latest."""
        batch = self.config.lm_batch
        steps = self.step + int(max(0.0, seconds_left) * images_per_second) // batch
        earliest = (
            math.ceil((self.step + 1) / (1 - self.config.decay_fraction)) if self.config.decay_fraction < 1 else 0
        )
        steps = max(steps, earliest, self.step + 1)
        if abs(steps * batch - self.config.lm_images) > 0.01 * self.config.lm_images:
            self.extend(steps * batch)
            self.print(f"[lm step {self.step}] the stage now ends after {steps * batch} images, to finish in time")

    def run(
        self, *, minutes: float | None = None, max_steps: int | None = None, fit_minutes: float | None = None
    ) -> str:
        """Train until the run is done, `minutes` of wall time pass, or `max_steps` steps; returns the stage.

        With `fit_minutes`, the LM stage is lengthened or shortened (every 30 s, or a tenth of a shorter budget,
        until its decay starts) so the run ends about `fit_minutes` after this call began, at the throughput
        measured so far in the stage (`plan_to_finish`); a final evaluation and checkpoint follow. A checkpoint is
        written every `checkpoint_minutes`, at stage ends, and when this call returns.
        """
        start = time.time()
        last_checkpoint = start
        steps = 0
        deadline = None if fit_minutes is None else start + 60 * fit_minutes
        measured_from: tuple[float, int] | None = None  # (time, images) where this call's LM throughput counts from
        last_plan = start
        replan_every = None if fit_minutes is None else min(30.0, 6 * fit_minutes)  # seconds: 30, or a tenth of it
        self._batches = None  # the recipe may have changed since the last call (`reconfigure`)
        stop = _StopOnSignal()
        try:
            if self.stage == "vision" and self.step == 0:
                self.evaluate()
            while self.stage != "done":
                if stop.requested:
                    self.print(f"signal {stop.requested}: checkpointing and stopping")
                    break
                if max_steps is not None and steps >= max_steps:
                    break
                if minutes is not None and time.time() - start >= minutes * 60:
                    break
                step_start = time.time()
                if deadline is not None and self.stage == "lm":
                    if measured_from is None:
                        measured_from = (step_start, self.images)
                    elif step_start - last_plan >= replan_every and not self.decay_started():
                        rate = (self.images - measured_from[1]) / (step_start - measured_from[0])
                        reserve = 2 * self._eval_seconds + 10  # the stage's final evaluation and checkpoints
                        self.plan_to_finish(deadline - step_start - reserve, rate)
                        last_plan = step_start
                before = self.images
                self._train_step()
                self.train_seconds += time.time() - step_start
                steps += 1
                if self.step % self.config.log_every_steps == 0:
                    self._flush_train_log()
                stage_over = self.step >= self.config.steps(self.stage)
                if self._eval_due(before) or stage_over:
                    self._flush_train_log()
                    self.evaluate()
                if stage_over:
                    self._batches = None
                    self.print(f"stage {self.stage} done after {self.images} images")
                    self.stage = "lm" if self.stage == "vision" and self.config.lm_images > 0 else "done"
                    self.step, self.images = 0, 0
                    if self.stage != "done":
                        self._make_optimizer()
                        self.evaluate()  # the new stage's starting point (chance level for the LM stage)
                    self.save()
                    if self.stage == "lm":  # kept: LM recipes can be tried from here (`reconfigure`)
                        shutil.copyfile(
                            os.path.join(self.out, "checkpoint.pt"), os.path.join(self.out, "checkpoint-vision.pt")
                        )
                    last_checkpoint = time.time()
                elif time.time() - last_checkpoint >= self.config.checkpoint_minutes * 60:
                    self.save()
                    last_checkpoint = time.time()
            self._flush_train_log()
            self.save()
        finally:
            stop.restore()
            self._batches = None  # the workers end with their iterator
        return self.stage


def train(
    out: str,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    minutes: float | None = None,
    max_steps: int | None = None,
    fit_minutes: float | None = None,
    log: Callable[[str], None] | None = print,
    device: str = "cpu",
    workers: int = 0,
    precision: str | None = None,
) -> Trainer:
    """Start (or with `resume`, continue) the run in `out`; see `Trainer.run`. Returns the trainer. `workers`
    processes render the next batches while a step runs; the result is the same with any number."""
    checkpoint = os.path.join(out, "checkpoint.pt")
    if resume and os.path.exists(checkpoint):
        trainer = Trainer.resume(out, log=log, device=device, workers=workers, precision=precision)
    else:
        if os.path.exists(checkpoint):
            raise FileExistsError(f"{out} already holds a run (checkpoint.pt); pass resume to continue it")
        trainer = Trainer(out, config or TrainConfig(), log=log, device=device, workers=workers, precision=precision)
    trainer.run(minutes=minutes, max_steps=max_steps, fit_minutes=fit_minutes)
    return trainer
