"""Grounding prompts and answer formats per model family, each with its source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmprune.eval.boxes import Box, Frame, parse_normalized_box, parse_pixel_box, parse_thousandths_box

__all__ = ["GROUNDING_FORMATS", "GroundingFormat", "grounding_format_for", "prompt_family"]


@dataclass(frozen=True)
class GroundingFormat:
    """How a family is asked for a box and how its answer reads.

    Attributes:
        prompt: the question, with `{expression}` for the referring expression.
        frame: the frame the answer's box lives in ("pad": normalized to the image padded to a square).
        parse: answer text -> box in that frame (None if it does not parse: counted wrong).
        pixels: the parsed box is in pixels of the processor's resized image, not normalized.
        source: where the prompt and the format come from.
    """

    family: str
    prompt: str
    frame: Frame
    parse: Callable[[str], Box | None]
    source: str
    pixels: bool = False


GROUNDING_FORMATS: dict[str, GroundingFormat] = {
    "llava": GroundingFormat(
        family="llava",
        prompt="Please provide the bounding box coordinate of the region this sentence describes: {expression}",
        frame="pad",
        parse=parse_normalized_box,
        source=(
            "LLaVA-1.5's REC training data (llava_v1_5_mix665k): the answer is [x1, y1, x2, y2] normalized to the "
            "image padded to a square with the mean colour (LLaVA's image_aspect_ratio='pad'); vlmprune pads the "
            "image itself, so the processor's centre crop never cuts the object off, and maps the box back"
        ),
    ),
    "llava_next": GroundingFormat(
        family="llava_next",
        prompt="Please provide the bounding box coordinate of the region this sentence describes: {expression}",
        frame="pad",
        parse=parse_normalized_box,
        source=(
            "LLaVA-NeXT's instruction mix keeps LLaVA-1.5's REC data (llava_v1_5_mix665k): [x1, y1, x2, y2] normalized "
            "to the image padded to a square; vlmprune pads the image itself and maps the box back, as for LLaVA-1.5"
        ),
    ),
    "llava_onevision": GroundingFormat(
        family="llava_onevision",
        prompt="Please provide the bounding box coordinate of the region this sentence describes: {expression}",
        frame="stretch",
        parse=parse_normalized_box,
        source=(
            "lmms-eval's refcoco bbox_rec task, with which LLaVA-OneVision reports grounding: the same question, the "
            "answer [x1, y1, x2, y2] normalized to the image's own width and height"
        ),
    ),
    "prismatic": GroundingFormat(
        family="prismatic",
        prompt='Please provide the bounding box coordinate of the region this sentence describes: "{expression}"',
        frame="stretch",
        parse=parse_normalized_box,
        source=(
            "FEATHER's evaluation (vlm_eval/models/prismatic.py::get_bbox_refer_chat_prompt_fn): the question "
            "goes through PurePromptBuilder, 'In: {question}\\nOut:' (the chat template of `vlmprune "
            "convert-prismatic`); the answer is [x1, y1, x2, y2] normalized to the image, which resize-naive "
            "stretches to the square input"
        ),
    ),
    "qwen2_vl": GroundingFormat(
        family="qwen2_vl",
        prompt="Locate {expression} in the image and output its bbox coordinates in JSON format.",
        frame="stretch",
        parse=parse_pixel_box,
        source=(
            "Qwen2-VL and Qwen2.5-VL grounding (Qwen2.5-VL cookbook, spatial understanding): bbox_2d in absolute "
            "pixels of the smart-resized input (divided by its width and height)"
        ),
        pixels=True,
    ),
    "qwen3_vl": GroundingFormat(
        family="qwen3_vl",
        prompt="Locate {expression} in the image and output its bbox coordinates in JSON format.",
        frame="stretch",
        parse=parse_thousandths_box,
        source=(
            "Qwen3-VL grounding (Qwen3-VL cookbook, 2D grounding): bbox_2d in relative coordinates from 0 to 1000 "
            "of the image's width and height"
        ),
    ),
}


def prompt_family(config: Any) -> str:
    """The family whose prompts a model takes: its config's `prompt_family`, else its `model_type`.

    A model converted from another code base runs in a transformers class of another family and keeps its own
    prompts: `vlmprune convert-prismatic` writes a LLaVA config with `prompt_family="prismatic"`.
    """
    return getattr(config, "prompt_family", None) or config.model_type


def grounding_format_for(model: Any) -> GroundingFormat:
    """The format of a model config (see `prompt_family`) or a family name (llava, llava_next, llava_onevision,
    prismatic, qwen2_vl, qwen2_5_vl, qwen3_vl).

    LLaVA's when the family is unknown.
    """
    family = model if isinstance(model, str) else prompt_family(model)
    if family.startswith("qwen3"):
        return GROUNDING_FORMATS["qwen3_vl"]
    if family.startswith("qwen2"):
        return GROUNDING_FORMATS["qwen2_vl"]
    return GROUNDING_FORMATS.get(family, GROUNDING_FORMATS["llava"])
