"""Analysis and pictures of what a pruning method kept, read from traces and per-sample eval records.

Analysis (numpy): `keep_frequency`, `mean_vertical_position`, `box_token_share`, `summarize`.
Pictures (matplotlib, optional: ``pip install 'vlmprune[viz]'``): `plot_keep_frequency`, `plot_sample`,
`save_png`; matplotlib is imported only when a picture is drawn.
"""

from vlmprune.viz.analysis import box_token_share, keep_frequency, keep_mask, mean_vertical_position, summarize
from vlmprune.viz.frame import FRAMES, box_cells, box_in_frame, frame_image, frame_rect
from vlmprune.viz.plot import plot_keep_frequency, plot_sample, save_png
from vlmprune.viz.records import RECORD_FILE, has_stages, read_records, record_from_trace, stage_of

__all__ = [
    "FRAMES",
    "RECORD_FILE",
    "box_cells",
    "box_in_frame",
    "box_token_share",
    "frame_image",
    "frame_rect",
    "has_stages",
    "keep_frequency",
    "keep_mask",
    "mean_vertical_position",
    "plot_keep_frequency",
    "plot_sample",
    "read_records",
    "record_from_trace",
    "save_png",
    "stage_of",
    "summarize",
]
