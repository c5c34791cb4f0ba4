"""How much the testbed model's localization rests on the referred object's own tokens.

A model that reads a box off the positions and content of the tokens it is given loses the box when every
token of the referred object is dropped, and barely notices when as many other tokens go. A model whose every
patch was trained to carry its object's box (the `patch_box_target` ablation of the trainer) might keep the box
while any one of the object's patches survives. `referred_object_dependence` measures the three cases on held-out
scenes, through the same engine the methods use (a stage before the language model that keeps a given set of
tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlmprune.criteria.base import Criterion, SelectionContext
from vlmprune.engine import prune
from vlmprune.methods.base import PreLLMMethod
from vlmprune.testbed.evaluate import generate_answers, is_correct
from vlmprune.testbed.scenes import eval_questions, object_cover

__all__ = ["DropResult", "referred_object_dependence"]


@dataclass
class DropResult:
    """Localization Acc@0.5 on `n` scenes: unpruned, without the referred object's patches, without as many
    patches drawn at random from the rest, and with one patch of the referred object left (the one it covers
    most); `dropped` is the mean number of the referred object's patches."""

    unpruned: float
    referred_dropped: float
    others_dropped: float
    one_left: float
    dropped: float
    n: int

    def summary(self) -> str:
        return (
            f"localization {self.unpruned:.3f} unpruned, {self.referred_dropped:.3f} without the referred object's "
            f"patches, {self.others_dropped:.3f} without as many other patches, {self.one_left:.3f} with one of "
            f"its patches left ({self.dropped:.1f} patches per object, {self.n} scenes)"
        )


class _GivenTokens(Criterion):
    """Keeps the image tokens that `keep` `(batch, image tokens)` marks, whatever the budget."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep

    def select(self, ctx: SelectionContext, budgets: list[int]) -> torch.Tensor:
        return self.keep.to(ctx.present.device) & ctx.present

    def counts(self, ctx: SelectionContext, budgets: list[int]) -> list[int] | None:
        return None


@dataclass
class _KeepGiven(PreLLMMethod):
    """Before the language model, keep exactly the tokens `given` `(batch, image tokens)` marks (an analysis
    probe, not a registered method)."""

    name: ClassVar[str] = "keep-given"
    paper: ClassVar[str] = "testbed probe"

    keep: int | None = None
    ratio: float | None = 0.0
    given: torch.Tensor = field(default_factory=lambda: torch.ones(1, 1, dtype=torch.bool))

    def criterion(self) -> Criterion:
        return _GivenTokens(self.given)


@torch.no_grad()
def referred_object_dependence(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    *,
    split: str = "test",
    limit: int = 100,
    batch_size: int = 32,
    seed: int = 0,
) -> DropResult:
    """Localization on the first `limit` scenes of `split`, unpruned and with three sets of patches dropped.

    Per scene: the localization question of `eval_questions`; "referred" drops every patch holding a pixel of
    the object asked about; "others" drops as many patches drawn uniformly (seeded by `seed` and the scene)
    from the patches that hold none of it; "one left" drops all of the object's patches but the one it covers
    most (where a model whose every patch carries its object's box might still localize).
    """
    patch = model.config.vision_config.patch_size
    items, drops = [], {"referred": [], "others": [], "one_left": []}
    for index in range(limit):
        scene, where, _ = eval_questions(split, index)  # type: ignore[arg-type]
        cover = object_cover(scene, patch)[where.referent]
        referred = cover > 0
        rest = np.flatnonzero(~referred)
        others = np.zeros_like(referred)
        others[np.random.default_rng([seed, index]).choice(rest, size=int(referred.sum()), replace=False)] = True
        items.append((scene.image(), where))
        drops["referred"].append(referred)
        drops["others"].append(others)
        one_left = referred.copy()
        one_left[cover.argmax()] = False
        drops["one_left"].append(one_left)
    was_training = model.training
    model.eval()
    accuracy = {}
    try:
        for name in ("unpruned", *drops):
            right = []
            for start in range(0, limit, batch_size):
                chunk = items[start : start + batch_size]
                images, texts = [c[0] for c in chunk], [c[1].text for c in chunk]
                if name == "unpruned":
                    answers = generate_answers(model, processor, images, texts)
                else:
                    keep = ~torch.from_numpy(np.stack(drops[name][start : start + batch_size]))
                    with prune(model, _KeepGiven(given=keep)):
                        answers = generate_answers(model, processor, images, texts)
                right += [is_correct(q, a)[0] for (_, q), a in zip(chunk, answers, strict=True)]
            accuracy[name] = float(np.mean(right))
    finally:
        model.train(was_training)
    dropped = float(np.mean([d.sum() for d in drops["referred"]]))
    return DropResult(
        accuracy["unpruned"], accuracy["referred"], accuracy["others"], accuracy["one_left"], dropped, limit
    )
