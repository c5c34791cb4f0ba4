"""Accuracy of a testbed model on a split: localization Acc@IoU>=0.5 and other-question accuracy.

Greedy `model.generate` (KV cache), batched with left padding, on the fixed pairs of `eval_questions`:
scene `i` of the split gives one localization and one other question. An answer to another question is right
when its text equals the target; a box is right when `parse_box` reads four bins whose box has IoU >= 0.5
with the drawn box (an unreadable answer counts as wrong).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlmprune.testbed.model import parse_box, prompt_text
from vlmprune.testbed.scenes import OTHER_KINDS, Question, box_iou, box_to_bins, eval_questions

__all__ = ["EvalResult", "evaluate", "generate_answers", "prior_baseline"]


@dataclass
class EvalResult:
    """Accuracies over `n` scenes; `per_kind` maps each question kind ("where", "colour", ...) to accuracy."""

    localization_acc: float
    other_acc: float
    mean_iou: float
    per_kind: dict[str, float]
    n: int

    def to_dict(self) -> dict[str, object]:
        return {
            "localization_acc": self.localization_acc,
            "other_acc": self.other_acc,
            "mean_iou": self.mean_iou,
            "per_kind": dict(self.per_kind),
            "n": self.n,
        }

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in self.per_kind.items() if k != "where")
        return (
            f"localization Acc@0.5 {self.localization_acc:.3f} (mean IoU {self.mean_iou:.3f}); "
            f"other {self.other_acc:.3f} ({kinds}); {self.n} scenes"
        )


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: list,
    questions: list[str],
    *,
    max_new_tokens: int = 5,
) -> list[str]:
    """Greedy answers (special tokens stripped) to `questions[i]` about `images[i]`, one batch."""
    inputs = processor(images=images, text=[prompt_text(q) for q in questions], return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def is_correct(question: Question, answer: str) -> tuple[bool, float]:
    """(right or wrong, IoU) of `answer` to `question`; IoU is 0 for non-localization questions."""
    if question.is_localization:
        box = parse_box(answer)
        iou = box_iou(box, question.box) if box is not None and question.box is not None else 0.0
        return iou >= 0.5, iou
    return answer == question.answer, 0.0


def _score(pairs: list[tuple[Question, str]], n: int) -> EvalResult:
    """Accuracies of the (question, answer) `pairs` of `n` scenes."""
    right: dict[str, list[bool]] = defaultdict(list)
    ious: list[float] = []
    for question, answer in pairs:
        ok, iou = is_correct(question, answer)
        right[question.kind].append(ok)
        if question.is_localization:
            ious.append(iou)
    others = [ok for kind in OTHER_KINDS for ok in right.get(kind, [])]
    per_kind = {kind: sum(v) / len(v) for kind in ("where", *OTHER_KINDS) if (v := right.get(kind))}
    return EvalResult(
        localization_acc=sum(right["where"]) / len(right["where"]),
        other_acc=sum(others) / len(others),
        mean_iou=sum(ious) / len(ious),
        per_kind=per_kind,
        n=n,
    )


def prior_baseline(*, split: str = "test", limit: int = 200, prior_scenes: int = 3000) -> EvalResult:
    """What answering blind scores: each kind's most common training answer, and the mean training box.

    The priors come from the evaluation pairs of the first `prior_scenes` training scenes; the score is on
    the same `limit` scenes of `split` that `evaluate` uses. A model at this level has learnt the answer
    distribution, not the image.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    boxes = []
    for index in range(prior_scenes):
        _, where, other = eval_questions("train", index)
        answers[other.kind][other.answer] += 1
        boxes.append(where.box)
    mean_box = [sum(b[i] for b in boxes) / len(boxes) for i in range(4)]
    box_answer = " ".join(f"<b{b:02d}>" for b in box_to_bins(mean_box))
    guess = {kind: counter.most_common(1)[0][0] for kind, counter in answers.items()}
    pairs = []
    for index in range(limit):
        _, where, other = eval_questions(split, index)  # type: ignore[arg-type]
        pairs += [(where, box_answer), (other, guess.get(other.kind, ""))]
    return _score(pairs, limit)


def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    *,
    split: str = "test",
    limit: int = 200,
    batch_size: int = 32,
    run_pruned: Callable[[Callable[[], list[str]]], list[str]] | None = None,
    progress: Callable[[int], None] = lambda _: None,
) -> EvalResult:
    """Both accuracies of `model` on the first `limit` scenes of `split` (`limit` questions of each family).

    `run_pruned`, if given, wraps each batch's generation (e.g. inside `vlmprune.prune`); it receives a
    function returning the answers and returns them. `progress` is told how many questions each batch answered.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    was_training = model.training
    model.eval()
    items: list[tuple[object, Question]] = []
    for index in range(limit):
        scene, where, other = eval_questions(split, index)  # type: ignore[arg-type]
        image = scene.image()
        items += [(image, where), (image, other)]
    pairs: list[tuple[Question, str]] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]

            def run_batch(chunk: list[tuple[object, Question]] = chunk) -> list[str]:
                return generate_answers(model, processor, [c[0] for c in chunk], [c[1].text for c in chunk])

            answers = run_pruned(run_batch) if run_pruned is not None else run_batch()
            pairs += [(question, answer) for (_, question), answer in zip(chunk, answers, strict=True)]
            progress(len(chunk))
    finally:
        model.train(was_training)
    return _score(pairs, limit)
