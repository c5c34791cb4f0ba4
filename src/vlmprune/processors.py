"""Loading a model's processor, including Qwen-VL processors on an installation without torchvision.

transformers' Qwen-VL processors own a video processor that needs torchvision, and some releases mark the PIL
image processor as needing it too, so `AutoProcessor.from_pretrained` fails without torchvision even for images.
vlmprune then builds the family's processor from its parts: the tokenizer, the PIL image processor (same resizing
and normalisation) and the chat template; it has no video processor, so such a processor takes images only.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["QWEN_PROCESSORS", "image_only_processor", "load_processor"]

# model_type -> the transformers processor class of the Qwen-VL families
QWEN_PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}


def image_only_processor(processor_class: type, image_processor: Any, tokenizer: Any, chat_template: str | None):
    """A `processor_class` instance with no video processor.

    Without torchvision transformers has no video-processor base class to check the absent one against, so the
    constructor's class check is skipped for this one instance.
    """
    processor = processor_class.__new__(processor_class)
    processor.check_argument_for_proper_class = lambda name, argument: argument
    processor_class.__init__(
        processor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template,
    )
    del processor.check_argument_for_proper_class
    return processor


def load_processor(path: str):
    """`AutoProcessor.from_pretrained(path)`; for a Qwen-VL model that it cannot load (no torchvision), the
    processor built from the parts saved in `path` (see the module docstring)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, ValueError):
        model_type = _model_type(path)
        if model_type not in QWEN_PROCESSORS:
            raise
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    template = os.path.join(path, "chat_template.jinja")
    chat_template = None
    if os.path.isfile(template):
        with open(template) as handle:
            chat_template = handle.read()
    return image_only_processor(
        getattr(transformers, QWEN_PROCESSORS[model_type]),
        Qwen2VLImageProcessorPil.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
        chat_template,
    )


def _model_type(path: str) -> str | None:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as handle:
        return json.load(handle).get("model_type")
