"""Cost accounting: FLOPs and KV-cache size of a token schedule, from a method, a trace or by hand."""

from vlmprune.cost.flops import FORMULAS, CostReport, decode_step_flops, estimate, kv_cache_bytes, prefill_flops
from vlmprune.cost.match import KNOBS, match_flops
from vlmprune.cost.schedule import TokenSchedule
from vlmprune.cost.shapes import SHAPES, ModelShape, VisionShape, get_shape, shape_from_config

__all__ = [
    "FORMULAS",
    "KNOBS",
    "SHAPES",
    "CostReport",
    "ModelShape",
    "TokenSchedule",
    "VisionShape",
    "decode_step_flops",
    "estimate",
    "get_shape",
    "kv_cache_bytes",
    "match_flops",
    "prefill_flops",
    "shape_from_config",
]
