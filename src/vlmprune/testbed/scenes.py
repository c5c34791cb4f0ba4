"""Seeded procedural scenes for the grounding testbed: shapes on a grey canvas, referring expressions, questions.

A scene is fully determined by its seed: `make_scene(seed)` places 3-5 non-overlapping objects (circle, square or
triangle; six colours; small or large) uniformly over the whole 224x224 image, the top rows included. Every
object's box is read from the pixels it was drawn with (`Image.getbbox` of its own mask), so a box always
matches what is drawn; boxes are normalized `[x1, y1, x2, y2]` with `x2 = (last column + 1) / width`, as
in the FEATHER evaluation.

Questions come in two families:
- localization: "where is the small red triangle ?" about an object that the expression identifies
  uniquely; the answer is its box as four coordinate bins (`box_to_bins`);
- other (no localization needed): colour, shape and size of a uniquely described object, counts (all
  objects, one colour, one shape), and existence of a colour-shape pair (yes / no balanced).

Splits are seed ranges: `scene_seed("train", i) = i`, `scene_seed("test", i) = TEST_SEED_OFFSET + i`, so the
held-out scenes never occur in training (which draws indices below `TEST_SEED_OFFSET`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "NUM_BINS",
    "OTHER_KINDS",
    "QUESTION_KINDS",
    "SHAPES",
    "SIZES",
    "TEST_SEED_OFFSET",
    "Question",
    "Scene",
    "SceneObject",
    "bins_to_box",
    "box_iou",
    "box_to_bins",
    "eval_questions",
    "make_scene",
    "object_cover",
    "patch_targets",
    "sample_questions",
    "scene_seed",
]

IMAGE_SIZE = 224
NUM_BINS = 32
TEST_SEED_OFFSET = 1_000_000_000
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SIZES: dict[str, tuple[int, int]] = {"small": (28, 36), "large": (56, 76)}  # side in pixels, inclusive range
OTHER_KINDS: tuple[str, ...] = ("colour", "shape", "size", "count", "exist")
QUESTION_KINDS: tuple[str, ...] = ("where", *OTHER_KINDS)
_GAP = 4  # minimum free pixels between two objects' square footprints

Split = Literal["train", "test"]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: attributes, the square footprint it was drawn in, and its pixel box.

    `footprint` is `(x0, y0, side)` in pixels; `box` is the normalized `[x1, y1, x2, y2]` of its drawn pixels.
    """

    shape: str
    colour: str
    size: str
    footprint: tuple[int, int, int]
    box: tuple[float, float, float, float]

    def attribute(self, name: str) -> str:
        return {"shape": self.shape, "colour": self.colour, "size": self.size}[name]


@dataclass(frozen=True)
class Question:
    """A question about a scene. `kind` is one of `QUESTION_KINDS`; `answer` is the target text.

    For "where" questions `box` is the referent's normalized box and `answer` its four bin tokens. `referent` is
    the index (in the scene's `objects`) of the one object a where, colour, shape or size question is about.
    """

    kind: str
    text: str
    answer: str
    box: tuple[float, float, float, float] | None = None
    referent: int | None = None

    @property
    def is_localization(self) -> bool:
        return self.kind == "where"


@dataclass
class Scene:
    """A generated scene: its seed, background grey level and objects; `image()` draws it."""

    seed: int
    background: int
    objects: list[SceneObject]
    size: int = IMAGE_SIZE
    _masks: list[np.ndarray] | None = field(default=None, repr=False)

    def masks(self) -> list[np.ndarray]:
        """Boolean masks `(size, size)` of each object's drawn pixels, in `objects` order."""
        if self._masks is None:
            self._masks = [_draw_mask(obj.shape, obj.footprint, self.size) for obj in self.objects]
        return self._masks

    def image(self) -> Image.Image:
        """The RGB image `(size, size)`: each object in its flat colour on a flat grey background."""
        pixels = np.full((self.size, self.size, 3), self.background, dtype=np.uint8)
        for obj, mask in zip(self.objects, self.masks(), strict=True):
            pixels[mask] = COLOURS[obj.colour]
        return Image.fromarray(pixels, mode="RGB")


def scene_seed(split: Split, index: int) -> int:
    """The seed of scene `index` of `split`: train scenes are `[0, TEST_SEED_OFFSET)`, test scenes above."""
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    if split == "train":
        if index >= TEST_SEED_OFFSET:
            raise ValueError(f"train scene index must be < {TEST_SEED_OFFSET}, got {index}")
        return index
    if split == "test":
        return TEST_SEED_OFFSET + index
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _draw_mask(shape: str, footprint: tuple[int, int, int], size: int) -> np.ndarray:
    x0, y0, side = footprint
    x1, y1 = x0 + side - 1, y0 + side - 1
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":  # apex up, base along the bottom edge
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=255)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return np.asarray(mask) > 0


def _stream(seed: int, purpose: int, redraw: int = 0) -> np.random.Generator:
    """The random stream of `seed` for one `purpose` (7: the scene, 11: its evaluation questions); a redraw
    gets a stream of its own, and redraw 0 keeps the streams every existing scene was drawn from."""
    return np.random.default_rng([seed, purpose] if redraw == 0 else [seed, purpose, redraw])


def make_scene(
    seed: int, *, min_objects: int = 3, max_objects: int = 5, size: int = IMAGE_SIZE, redraw: int = 0
) -> Scene:
    """The scene of `seed`: `min_objects..max_objects` objects, non-overlapping, placed uniformly.

    Deterministic: the same arguments give the same scene on every platform (numpy's PCG64 stream).
    `redraw` > 0 draws another scene from a stream of its own under the same seed (see `eval_questions`).
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = _stream(seed, 7, redraw)
    background = int(rng.integers(96, 160))
    count = int(rng.integers(min_objects, max_objects + 1))
    placed: list[tuple[int, int, int]] = []
    attributes: list[tuple[str, str, str]] = []
    attempts = 0
    while len(placed) < count:
        attempts += 1
        if attempts > 2000:  # too crowded for this many large objects: start the placement over
            placed, attributes, attempts = [], [], 0
            continue
        size_name = "small" if rng.random() < 0.5 else "large"
        low, high = SIZES[size_name]
        side = int(rng.integers(low, high + 1))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if any(
            x0 < px + ps + _GAP and px < x0 + side + _GAP and y0 < py + ps + _GAP and py < y0 + side + _GAP
            for px, py, ps in placed
        ):
            continue
        placed.append((x0, y0, side))
        attributes.append(
            (SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))], size_name)
        )
    objects = []
    for footprint, (shape, colour, size_name) in zip(placed, attributes, strict=True):
        mask = _draw_mask(shape, footprint, size)
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box = (cols[0] / size, rows[0] / size, (cols[-1] + 1) / size, (rows[-1] + 1) / size)
        objects.append(SceneObject(shape, colour, size_name, footprint, tuple(float(v) for v in box)))
    return Scene(seed=seed, background=background, objects=objects, size=size)


# ---------------------------------------------------------------------------------------------- answers


def box_to_bins(box: tuple[float, float, float, float] | list[float], num_bins: int = NUM_BINS) -> list[int]:
    """Normalized `[x1, y1, x2, y2]` -> four bin indices in `[0, num_bins)` (`floor(v * num_bins)`, clamped)."""
    return [min(num_bins - 1, max(0, int(v * num_bins))) for v in box]


def bins_to_box(bins: list[int], num_bins: int = NUM_BINS) -> list[float]:
    """Four bin indices -> a normalized box, each coordinate at its bin's centre `(k + 0.5) / num_bins`.

    `box_to_bins` floors, so the true value lies in `[k / n, (k + 1) / n)`: the centre is within half a bin
    (3.5 px at 224 px and 32 bins) of it, which keeps even the smallest objects above IoU 0.5.
    """
    return [(k + 0.5) / num_bins for k in bins]


def box_iou(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    """Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 when either is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _bin_tokens(box: tuple[float, float, float, float]) -> str:
    return " ".join(f"<b{k:02d}>" for k in box_to_bins(box))


def _phrase(obj: SceneObject, attributes: tuple[str, ...]) -> str:
    words = [obj.size] if "size" in attributes else []
    if "colour" in attributes:
        words.append(obj.colour)
    words.append(obj.shape if "shape" in attributes else "object")
    return "the " + " ".join(words)


def _unique_descriptions(scene: Scene, index: int, allowed: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Non-empty subsets of `allowed` attributes that pick out object `index` alone in the scene."""
    target = scene.objects[index]
    found = []
    for r in range(1, len(allowed) + 1):
        for subset in itertools.combinations(allowed, r):
            matches = [o for o in scene.objects if all(o.attribute(a) == target.attribute(a) for a in subset)]
            if len(matches) == 1:
                found.append(subset)
    return found


def _where(scene: Scene, index: int, rng: np.random.Generator) -> Question | None:
    options = _unique_descriptions(scene, index, ("size", "colour", "shape"))
    if not options:
        return None
    phrase = _phrase(scene.objects[index], options[int(rng.integers(len(options)))])
    box = scene.objects[index].box
    return Question("where", f"where is {phrase} ?", _bin_tokens(box), box, index)


def _attribute_question(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """ "what colour / shape / size is the ...?" about an object described by the other two attributes."""
    others = tuple(a for a in ("size", "colour", "shape") if a != kind)
    candidates = []
    for index in range(len(scene.objects)):
        candidates += [(index, subset) for subset in _unique_descriptions(scene, index, others)]
    if not candidates:
        return None
    index, subset = candidates[int(rng.integers(len(candidates)))]
    obj = scene.objects[index]
    return Question(kind, f"what {kind} is {_phrase(obj, subset)} ?", obj.attribute(kind), referent=index)


def _count(scene: Scene, rng: np.random.Generator) -> Question:
    mode = int(rng.integers(3))
    if mode == 0:
        return Question("count", "how many objects are there ?", str(len(scene.objects)))
    if mode == 1:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        n = sum(o.colour == colour for o in scene.objects)
        return Question("count", f"how many {colour} objects are there ?", str(n))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    n = sum(o.shape == shape for o in scene.objects)
    return Question("count", f"how many {shape}s are there ?", str(n))


def _exist(scene: Scene, rng: np.random.Generator) -> Question:
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if rng.random() < 0.5 or not absent:
        colour, shape = present[int(rng.integers(len(present)))]
    else:
        colour, shape = absent[int(rng.integers(len(absent)))]
    answer = "yes" if (colour, shape) in present else "no"
    article = "an" if colour in ("orange",) else "a"
    return Question("exist", f"is there {article} {colour} {shape} ?", answer)


def _other(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    if kind in ("colour", "shape", "size"):
        return _attribute_question(scene, kind, rng)
    if kind == "count":
        return _count(scene, rng)
    if kind == "exist":
        return _exist(scene, rng)
    raise ValueError(f"question kind must be one of {QUESTION_KINDS}, got {kind!r}")


def sample_questions(scene: Scene, n_where: int, n_other: int, rng: np.random.Generator) -> list[Question]:
    """Up to `n_where` localization questions about distinct objects, then `n_other` other questions.

    Other questions draw their kind uniformly from `OTHER_KINDS`; a kind that the scene cannot ask (no
    uniquely describable object) is redrawn. Fewer localization questions come back when fewer objects can
    be referred to uniquely.
    """
    questions: list[Question] = []
    for index in rng.permutation(len(scene.objects)):
        if len(questions) >= n_where:
            break
        question = _where(scene, int(index), rng)
        if question is not None:
            questions.append(question)
    others = 0
    while others < n_other:
        question = _other(scene, OTHER_KINDS[int(rng.integers(len(OTHER_KINDS)))], rng)
        if question is not None:
            questions.append(question)
            others += 1
    return questions


def eval_questions(split: Split, index: int) -> tuple[Scene, Question, Question]:
    """The fixed evaluation pair of scene `index` of `split`: one localization and one other question.

    The other question's kind cycles through `OTHER_KINDS` with `index` (a kind the scene cannot ask falls
    through to the next), so any `limit` covers the kinds evenly. Localization falls to another object when
    the first drawn one cannot be referred to uniquely, and to a redrawn scene when none can.
    """
    seed = scene_seed(split, index)
    where = None
    redraw = 0
    while where is None:  # every object has a twin (about 1 scene in 1,500): redraw the scene under this seed
        scene = make_scene(seed, redraw=redraw)
        rng = _stream(seed, 11, redraw)
        for obj_index in rng.permutation(len(scene.objects)):
            where = _where(scene, int(obj_index), rng)
            if where is not None:
                break
        redraw += 1
    other = None
    for shift in range(len(OTHER_KINDS)):
        other = _other(scene, OTHER_KINDS[(index + shift) % len(OTHER_KINDS)], rng)
        if other is not None:
            break
    assert other is not None  # count and exist questions always exist
    return scene, where, other


# ---------------------------------------------------------------------------------------------- dense labels


def object_cover(scene: Scene, patch: int = 14) -> np.ndarray:
    """`(objects, patches)` float32: the fraction of each patch's pixels (raster order) that each object covers."""
    side = scene.size // patch
    cover = np.zeros((len(scene.objects), side * side), dtype=np.float32)
    for k, mask in enumerate(scene.masks()):
        cover[k] = mask.reshape(side, patch, side, patch).mean(axis=(1, 3)).reshape(-1)
    return cover


def patch_targets(scene: Scene, patch: int = 14, min_cover: float = 0.3) -> dict[str, np.ndarray]:
    """Per-patch labels for dense supervision of the vision tower, raster order (row-major), `n = (size/patch)**2`.

    - `fg` `(n,)` float: fraction of the patch's pixels covered by any object;
    - `colour`, `shape`, `size` `(n,)` int: 0 for background (no object pixel), `1 + attribute index` of the
      object covering most of the patch when it covers at least `min_cover`, and -100 (ignored) in between;
    - `box` `(n, 4)` float: that object's normalized box (zeros where the labels are not an object);
    - `extent` `(n, 4)` float: where the object covering most of the patch lies *within* the patch, `[x1, y1, x2,
      y2]` of its pixels there in the patch's own coordinates (`[0, 0, 1, 1]` inside an object; zeros where no
      object pixel lies). Local content, as a real encoder's edge features are: it carries no box, but the patches
      on an object's border place its edges to the pixel, which coordinate bins finer than a patch need;
    - `row`, `col` `(n,)` int: the patch's grid coordinates.
    """
    side = scene.size // patch
    n = side * side
    cover = object_cover(scene, patch)
    fg = cover.sum(axis=0) if len(scene.objects) else np.zeros(n, np.float32)
    labels = {name: np.zeros(n, dtype=np.int64) for name in ("colour", "shape", "size")}
    box = np.zeros((n, 4), dtype=np.float32)
    extent = np.zeros((n, 4), dtype=np.float32)
    if len(scene.objects):
        best = cover.argmax(axis=0)
        best_cover = cover.max(axis=0)
        touched = best_cover > 0
        extent[touched] = _patch_extents(scene, patch)[best[touched], np.nonzero(touched)[0]]
        colour_ids = {c: i for i, c in enumerate(COLOURS)}
        size_ids = {s: i for i, s in enumerate(SIZES)}
        for p in range(n):
            if best_cover[p] >= min_cover:
                obj = scene.objects[best[p]]
                labels["colour"][p] = 1 + colour_ids[obj.colour]
                labels["shape"][p] = 1 + SHAPES.index(obj.shape)
                labels["size"][p] = 1 + size_ids[obj.size]
                box[p] = obj.box
            elif best_cover[p] > 0:
                for name in labels:
                    labels[name][p] = -100
    rows, cols = np.divmod(np.arange(n), side)
    return {"fg": fg.astype(np.float32), **labels, "box": box, "extent": extent, "row": rows, "col": cols}


def _patch_extents(scene: Scene, patch: int) -> np.ndarray:
    """`(objects, patches, 4)` float32: each object's pixels within each patch as `[x1, y1, x2, y2]` in the patch's
    coordinates (`x2 = (last column + 1) / patch`, as boxes are); zeros where the object has no pixel."""
    side = scene.size // patch
    out = np.zeros((len(scene.objects), side * side, 4), dtype=np.float32)
    for k, mask in enumerate(scene.masks()):
        blocks = mask.reshape(side, patch, side, patch)
        columns = blocks.any(axis=1).reshape(side * side, patch)  # (patches, pixel column within the patch)
        rows = blocks.any(axis=3).transpose(0, 2, 1).reshape(side * side, patch)
        present = columns.any(axis=1)
        for axis, occupied in ((0, columns), (1, rows)):
            first = occupied.argmax(axis=1)
            last = patch - occupied[:, ::-1].argmax(axis=1)
            out[k, present, axis] = first[present] / patch
            out[k, present, axis + 2] = last[present] / patch
    return out
