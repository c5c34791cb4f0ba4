"""Where the testbed model keeps, and where it loses, what an object looks like: linear probes along its path.

On held-out scenes with one object, the object's colour and shape are read by a linear classifier (multinomial
logistic regression fitted on the first scenes, scored on the others) from:
- `tower`: the vision features of the layer the language model reads, pooled over the object's patches (weighted
  by the share of each patch it covers);
- `projected`: the projector's output, the image tokens the language model is given, pooled the same way;
- `image@k` / `last@k`: the language model's residual stream after layer `k` (0: its input), pooled over the
  object's tokens / at the last prompt token, where the answer is read;
and the model's own answers to "what colour is the object ?" and "what shape is the object ?" are scored. A colour
the tower knows and the answers do not is lost on the way, at the site where the probe's accuracy falls: in the
shipped checkpoint, the projector (`vlmprune testbed eval --probe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vlmprune.testbed.evaluate import generate_answers
from vlmprune.testbed.model import encode_images, prompt_text
from vlmprune.testbed.scenes import COLOURS, SHAPES, make_scene, object_cover, scene_seed

__all__ = ["ProbeResult", "attribute_probe", "linear_probe_accuracy"]

_ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES}
_PROBE_SEED_OFFSET = 700_000  # held-out scenes of their own (one object each), away from `eval_questions`' range


@dataclass
class ProbeResult:
    """`sites[site][attribute]`: held-out linear-probe accuracy (sites in the model's order, see the module);
    `answers[attribute]`: the model's greedy answer accuracy on the same scenes; `n` scenes, `fitted` of them
    used to fit the probes."""

    sites: dict[str, dict[str, float]]
    answers: dict[str, float]
    n: int
    fitted: int

    def summary(self) -> str:
        lines = [
            f"linear probes of one object's attributes ({self.n - self.fitted} scenes scored, {self.fitted} fitted)"
        ]
        lines += [f"  {'site':<10} " + " ".join(f"{a:>7}" for a in _ATTRIBUTES)]
        for site, accuracy in self.sites.items():
            lines.append(f"  {site:<10} " + " ".join(f"{accuracy[a]:7.3f}" for a in _ATTRIBUTES))
        lines.append(f"  {'answers':<10} " + " ".join(f"{self.answers[a]:7.3f}" for a in _ATTRIBUTES))
        return "\n".join(lines)


def linear_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, fitted: int, *, l2: float = 1e-3, steps: int = 200
) -> float:
    """Accuracy on rows `fitted:` of a multinomial logistic regression fitted (L-BFGS, standardized features, `l2`
    weight penalty) on rows `:fitted` of `features` `(n, d)` with integer `labels` `(n,)`."""
    x = features.detach().double()
    mean, std = x[:fitted].mean(0), x[:fitted].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:fitted] @ weight + bias, labels[:fitted])
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (x[fitted:] @ weight + bias).argmax(-1)
    return float((predicted == labels[fitted:]).double().mean())


@torch.no_grad()
def attribute_probe(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    *,
    scenes: int = 600,
    fit_fraction: float = 2 / 3,
    batch_size: int = 100,
) -> ProbeResult:
    """Probe accuracies of colour and shape along the model's path, and its answers, on `scenes` held-out
    one-object scenes (`fit_fraction` of them fit the probes); see the module."""
    fitted = int(scenes * fit_fraction)
    if not 0 < fitted < scenes:
        raise ValueError(
            f"need scenes >= 2 and a fit fraction leaving scenes on both sides, got {scenes}, {fit_fraction}"
        )
    drawn = [
        make_scene(scene_seed("test", _PROBE_SEED_OFFSET + i), min_objects=1, max_objects=1) for i in range(scenes)
    ]
    patch = model.config.vision_config.patch_size
    cover = torch.from_numpy(np.stack([object_cover(scene, patch)[0] for scene in drawn])).float()
    weights = cover / cover.sum(-1, keepdim=True)  # (scenes, patches)
    labels = {
        name: torch.tensor([values.index(scene.objects[0].attribute(name)) for scene in drawn])
        for name, values in _ATTRIBUTES.items()
    }
    sites: dict[str, list[torch.Tensor]] = {}
    for start in range(0, scenes, batch_size):
        chunk = drawn[start : start + batch_size]
        pooling = weights[start : start + batch_size].to(model.device)
        inputs = processor(
            images=[scene.image() for scene in chunk],
            text=[prompt_text("what colour is the object ?")] * len(chunk),
            return_tensors="pt",
        ).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        vision, projected = encode_images(model, inputs["pixel_values"])
        found = {"tower": vision[model.config.vision_feature_layer][:, 1:], "projected": projected}
        output = model(**inputs, output_hidden_states=True)
        image = inputs["input_ids"][0] == model.config.image_token_id  # one prompt: the same positions in each row
        pooled = {name: torch.einsum("bp,bph->bh", pooling, f.float()) for name, f in found.items()}
        for layer, hidden in enumerate(output.hidden_states):
            pooled[f"image@{layer}"] = torch.einsum("bp,bph->bh", pooling, hidden[:, image].float())
            pooled[f"last@{layer}"] = hidden[:, -1].float()
        for name, value in pooled.items():
            sites.setdefault(name, []).append(value.cpu())
    order = ["tower", "projected", *(f"image@{k}" for k in range(len(output.hidden_states)))]
    order += [f"last@{k}" for k in range(len(output.hidden_states))]
    accuracy = {
        site: {name: linear_probe_accuracy(torch.cat(sites[site]), labels[name], fitted) for name in _ATTRIBUTES}
        for site in order
    }
    answers = {}
    for name in _ATTRIBUTES:
        scored = drawn[fitted:]
        replies = []
        for start in range(0, len(scored), batch_size):
            chunk = scored[start : start + batch_size]
            replies += generate_answers(
                model, processor, [s.image() for s in chunk], [f"what {name} is the object ?"] * len(chunk)
            )
        truth = [scene.objects[0].attribute(name) for scene in scored]
        answers[name] = sum(r == t for r, t in zip(replies, truth, strict=True)) / len(scored)
    return ProbeResult(accuracy, answers, scenes, fitted)
