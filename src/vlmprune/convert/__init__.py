"""Checkpoints of other VLM code bases, converted to transformers classes vlmprune already adapts."""

from __future__ import annotations

from vlmprune.convert.prismatic import PROMPT_FAMILY, convert_prismatic

__all__ = ["PROMPT_FAMILY", "convert_prismatic"]
