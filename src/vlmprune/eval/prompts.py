"""Grounding prompts and answer formats per model family, each with its source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlmprune.eval.boxes import Box, Frame, parse_normalized_box, parse_pixel_box

__all__ = ["GROUNDING_FORMATS", "GroundingFormat", "grounding_format_for"]


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
        source="FEATHER's evaluation (vlm_eval/models/prismatic.py::get_bbox_refer_chat_prompt_fn)",
    ),
    "qwen2_vl": GroundingFormat(
        family="qwen2_vl",
        prompt="Locate {expression} in the image and output its bbox coordinates in JSON format.",
        frame="stretch",
        parse=parse_pixel_box,
        source="Qwen2.5-VL grounding: absolute pixels of the smart-resized input (divide by its width and height)",
        pixels=True,
    ),
}


def grounding_format_for(model_type: str) -> GroundingFormat:
    """The format of a transformers `model_type` (llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl); LLaVA's
    when unknown."""
    if model_type.startswith("qwen2"):
        return GROUNDING_FORMATS["qwen2_vl"]
    return GROUNDING_FORMATS.get(model_type, GROUNDING_FORMATS["llava"])
