"""BTP's calibration: where a model's layers change the image tokens, and the pruning layers that implies.

Balanced Token Pruning (Li et al., NeurIPS 2025, arXiv 2505.22038, §4.3, §5, App. 7.3, 7.6) places its
pruning layers with a small calibration set (64 images): for each decoder layer it counts the image tokens whose
hidden state leaves the layer with a cosine similarity to the one that entered it below τ = 0.93, and puts
the pruning layers immediately before and after the sharp shifts of that count. The image tokens' states do not
depend on the question (the causal mask hides it from them), so one prompt serves every task. No calibration
script was released; `propose_layers` states the rule used here.

A calibration file (JSON) records the model, the image set, the threshold, the per-layer counts and the proposed
layers; `vlmprune.build_method("btp", calibration=FILE)` prunes at those layers.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vlmprune.errors import CalibrationError

__all__ = [
    "DEFAULT_ACTIVE_SHARE",
    "DEFAULT_IMAGES",
    "DEFAULT_STAGES",
    "DEFAULT_THRESHOLD",
    "Calibration",
    "calibrate",
    "count_changed_tokens",
    "load_calibration",
    "propose_layers",
]

FORMAT = "vlmprune-btp-calibration"
VERSION = 1
DEFAULT_THRESHOLD = 0.93  # the paper's τ
DEFAULT_IMAGES = 64  # the paper's calibration set size
DEFAULT_STAGES = 4  # the LLaVA code's schedule: three pruning stages and the final drop of every image token
DEFAULT_ACTIVE_SHARE = 0.05  # a layer "changes the image" when it moves at least this share of its tokens
PROMPT = "Describe the image."


@dataclass
class Calibration:
    """What `vlmprune calibrate` measured on one model, and the layers it proposes.

    Attributes:
        model: the model id or directory as given.
        family: the adapter's model family.
        depth: decoder layers of the language model.
        image_tokens: image tokens per image (None if the images had different counts).
        threshold: τ; a token changes at a layer when cos(input, output) < τ.
        images: the image directory, and `image_files` the files measured, in order.
        changed_tokens: per layer, image tokens per image that changed (mean over the images).
        changed_share: per layer, the share of each image's tokens that changed (mean over the images).
        stages, active_share: the settings of `propose_layers`.
        layers: the proposed pruning layers (0-based; the last drops every image token), or None if the counts
            imply none (`note` says why).
    """

    model: str
    family: str
    depth: int
    image_tokens: int | None
    threshold: float
    images: str
    image_files: list[str]
    changed_tokens: list[float]
    changed_share: list[float]
    stages: int
    active_share: float
    layers: tuple[int, ...] | None
    note: str = ""
    source: str = field(default="", compare=False)  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        data["layers"] = None if self.layers is None else list(self.layers)
        return {"format": FORMAT, "version": VERSION, **data}

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=1)
            handle.write("\n")

    @classmethod
    def from_dict(cls, data: object, source: str = "") -> Calibration:
        """A calibration from `to_dict()`'s JSON; `CalibrationError` naming `source` if anything is off."""
        where = f"calibration file {source}" if source else "calibration"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{where} is not a vlmprune calibration file (write one with `vlmprune calibrate`)")
        if data.get("version") != VERSION:
            raise CalibrationError(f"{where} has version {data.get('version')!r}; this vlmprune reads {VERSION}")
        try:
            calibration = cls(
                model=str(data["model"]),
                family=str(data["family"]),
                depth=_integer(data["depth"]),
                image_tokens=None if data["image_tokens"] is None else _integer(data["image_tokens"]),
                threshold=float(data["threshold"]),
                images=str(data["images"]),
                image_files=[str(f) for f in data["image_files"]],
                changed_tokens=[float(x) for x in data["changed_tokens"]],
                changed_share=[float(x) for x in data["changed_share"]],
                stages=_integer(data["stages"]),
                active_share=float(data["active_share"]),
                layers=None if data["layers"] is None else tuple(_integer(x) for x in data["layers"]),
                note=str(data.get("note", "")),
                source=source,
            )
        except KeyError as error:
            raise CalibrationError(f"{where} lacks the field {error.args[0]!r}") from None
        except (TypeError, ValueError):
            raise CalibrationError(
                f"{where} has a field of the wrong type (rewrite it with `vlmprune calibrate`)"
            ) from None
        layers, depth = calibration.layers, calibration.depth
        for name in ("changed_tokens", "changed_share"):
            if len(getattr(calibration, name)) != depth:
                raise CalibrationError(f"{where} has {len(getattr(calibration, name))} {name} for its {depth} layers")
        if layers is not None and (
            not layers or list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= depth
        ):
            raise CalibrationError(f"{where} proposes layers {list(layers)}, not increasing within 1..{depth - 1}")
        return calibration

    def check_model(self, depth: int, image_grids: list[list[tuple[int, int]]]) -> None:
        """`CalibrationError` unless a model with `depth` layers and these image grids is the one calibrated."""
        where = f"calibration file {self.source}" if self.source else "the calibration"
        redo = "run `vlmprune calibrate` on this model"
        if depth != self.depth:
            raise CalibrationError(
                f"{where} was made for {self.model}, whose language model has {self.depth} layers; this one has "
                f"{depth}: {redo}"
            )
        if self.image_tokens is not None:
            for grids in image_grids:
                for rows, cols in grids:
                    if rows * cols != self.image_tokens:
                        raise CalibrationError(
                            f"{where} was made for {self.model}, with {self.image_tokens} tokens per image; this "
                            f"model gives {rows * cols} ({rows}x{cols}): {redo}"
                        )


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise TypeError(f"not an integer: {value!r}")
    return int(value)


def load_calibration(path: str | os.PathLike) -> Calibration:
    """The calibration in `path`; `CalibrationError` (one line) if it is missing, unreadable or malformed."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        raise CalibrationError(
            f"calibration file {path} does not exist (write one with `vlmprune calibrate`)"
        ) from None
    return _load(os.path.realpath(path), stat.st_mtime_ns, stat.st_size, path)


@functools.lru_cache(maxsize=16)
def _load(real: str, mtime_ns: int, size: int, shown: str) -> Calibration:
    """Read once per file version: methods rebuilt with other budgets (FLOPs matching) read it many times."""
    try:
        with open(real) as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"cannot read calibration file {shown}: {error}") from None
    except json.JSONDecodeError as error:
        raise CalibrationError(
            f"calibration file {shown} is not valid JSON ({error.msg} at line {error.lineno})"
        ) from None
    return Calibration.from_dict(data, shown)


def propose_layers(
    changed_share: list[float], stages: int, active_share: float = DEFAULT_ACTIVE_SHARE
) -> tuple[int, ...]:
    """The pruning layers the per-layer change counts imply: `stages` increasing 0-based layers.

    The paper puts the layers "before and after the sharp shifts" of the count; read here as:

    - a layer is active when at least `active_share` of the image tokens change across it;
    - the last stage, which drops every image token, comes right after the last active layer (the image
      tokens no longer change there), at the last layer if even that one is active;
    - the other stages go at the `stages - 1` layers l (1 <= l < the last stage) where the share changes most
      from layer l - 1 to layer l, ties to the earlier layer: a rise there means pruning just before the layers
      start to rework the image, a fall just after they have finished. Layer 0 is excluded: a BTP stage scores
      with the layer before its own.

    Raises:
        CalibrationError: no layer is active, or there are too few layers before the last stage.
    """
    depth = len(changed_share)
    if stages < 1:
        raise CalibrationError(f"stages must be >= 1, got {stages}")
    active = [layer for layer, share in enumerate(changed_share) if share >= active_share]
    if not active:
        most = max(changed_share, default=0.0)
        raise CalibrationError(
            f"no layer changes {active_share:.0%} of the image tokens (at most {most:.1%}): lower the active "
            "share or raise the threshold"
        )
    last = min(active[-1] + 1, depth - 1)
    candidates = list(range(1, last))
    if len(candidates) < stages - 1:
        raise CalibrationError(
            f"the image tokens stop changing after layer {active[-1]}: {len(candidates)} layers before the last "
            f"stage at {last} leave no room for {stages - 1} more stages; ask for fewer stages"
        )
    shifts = {layer: abs(changed_share[layer] - changed_share[layer - 1]) for layer in candidates}
    chosen = sorted(candidates, key=lambda layer: (-shifts[layer], layer))[: stages - 1]
    return (*sorted(chosen), last)


@torch.no_grad()
def count_changed_tokens(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[int], None] = lambda _: None,
) -> tuple[list[float], list[float], list[int]]:
    """Per decoder layer, image tokens whose hidden state the layer turns by cos < `threshold`.

    Runs the unpruned model on each batch of processor inputs (one image per prompt); each layer's input and
    output rows of the image tokens are compared in float32.

    Returns:
        (changed tokens per layer summed over the images, changed shares per layer summed over the images,
        the image-token count of each image).
    """
    from vlmprune.adapters import get_adapter

    adapter = get_adapter(model)
    depth = adapter.num_layers
    tokens, shares, per_image = [0.0] * depth, [0.0] * depth, []
    state: dict[str, torch.Tensor] = {}

    def before(index: int):
        def hook(module, args, kwargs):
            state[f"in{index}"] = args[0] if args else kwargs["hidden_states"]

        return hook

    def after(index: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(state.pop(f"in{index}").float(), out.float(), dim=-1)
            changed = ((cosine < threshold) & state["image"]).sum(dim=1).tolist()
            tokens[index] += sum(changed)
            shares[index] += sum(c / n for c, n in zip(changed, state["counts"], strict=True))

        return hook

    handles = []
    try:
        for i, layer in enumerate(adapter.layers):
            handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(after(i), with_kwargs=True))
        for inputs in batches:
            image = adapter.image_token_mask(inputs).to(model.device)
            counts = image.sum(dim=1).tolist()
            if min(counts) == 0:
                raise CalibrationError("a calibration prompt has no image tokens (the processor inserted none)")
            state.update(image=image, counts=counts)
            model(**inputs, use_cache=False)
            per_image += counts
            progress(len(counts))
    finally:
        for handle in handles:
            handle.remove()
    return tokens, shares, per_image


def calibrate(
    model: torch.nn.Module,
    processor: Any,
    images: list[Any],
    *,
    model_name: str,
    image_dir: str,
    image_files: list[str],
    threshold: float = DEFAULT_THRESHOLD,
    stages: int = DEFAULT_STAGES,
    active_share: float = DEFAULT_ACTIVE_SHARE,
    batch_size: int = 8,
    progress: Callable[[int], None] = lambda _: None,
) -> Calibration:
    """Measure `model` on `images` (PIL images) and propose BTP's pruning layers.

    If the counts imply no layers, the calibration is returned with `layers=None` and the reason in `note`.
    """
    from vlmprune.adapters import get_adapter

    if not images:
        raise CalibrationError("no calibration images")
    if not -1.0 <= threshold <= 1.0:
        raise CalibrationError(f"the threshold is a cosine similarity in [-1, 1], got {threshold}")
    if not 0.0 < active_share <= 1.0:
        raise CalibrationError(f"the active share must be in (0, 1], got {active_share}")
    adapter = get_adapter(model)
    prompt = _prompt(processor)

    def batches():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            if inputs.get("pixel_values") is not None and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            yield inputs

    tokens, shares, per_image = count_changed_tokens(model, batches(), threshold, progress)
    n = len(per_image)
    changed_share = [s / n for s in shares]
    try:
        layers, note = propose_layers(changed_share, stages, active_share), ""
    except CalibrationError as error:
        layers, note = None, str(error)
    return Calibration(
        model=model_name,
        family=adapter.family,
        depth=adapter.num_layers,
        image_tokens=per_image[0] if len(set(per_image)) == 1 else None,
        threshold=threshold,
        images=image_dir,
        image_files=list(image_files),
        changed_tokens=[t / n for t in tokens],
        changed_share=changed_share,
        stages=stages,
        active_share=active_share,
        layers=layers,
        note=note,
    )


def _prompt(processor: Any) -> str:
    """One image and `PROMPT` in the processor's chat template (or after the image token, without one)."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return f"{image_token}\n{PROMPT}"
