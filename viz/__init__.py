"""Figure builders and image/frame overlays that take a Trace (no Gradio imports; unit-testable).

- :mod:`viz.figures`: plotly charts (budget per layer + entropy, layer × head modality preference,
  per-head budgets / HybridKV head types, Compare's memory / speed / agreement / sweep charts, and a
  methods × tokens kept map);
- :mod:`viz.overlay`: kept cells keep the image's colours, evicted cells are faded and hatched, merged
  cells faded and dotted, over each image and video frame;
- :mod:`viz.colors`: the state palette (kept / evicted / merged), the modality greys, and
  :class:`Style` (``present=True`` on every builder: presentation mode);
- :mod:`viz.replay`: the cache at one decode step (held cells, evicted now, retrieved now) and the bytes
  it holds step by step;
- :mod:`viz.tokens`: the text-token strip and the merge list;
- :mod:`viz.report`: export of figures and overlays as one self-contained HTML file.
"""

from .colors import (
    EVICTED,
    KEEP_SCALE,
    KEPT,
    MERGED,
    MODALITY_COLORS,
    NORMAL,
    PREFERENCE_SCALE,
    PRESENT,
    STATE_WORDS,
    STRIP_COLORS,
    Style,
)
from .figures import (
    agreement_figure,
    budget_figure,
    empty_figure,
    head_budget_figure,
    keep_map_figure,
    memory_figure,
    method_name,
    modality_heatmap,
    preference_matrix,
    speed_figure,
    sweep_figure,
)
from .overlay import Panel, cell_grid, overlay_panels, paint_cells, token_fractions, video_frame_groups, with_title
from .replay import REPLAY_WORDS, RETRIEVED, replay_bytes_figure, replay_panels
from .report import figure_png, figures_html, png_available
from .tokens import describe_position, merge_rows, strip_label, token_strip

__all__ = [
    "EVICTED",
    "KEEP_SCALE",
    "KEPT",
    "MERGED",
    "MODALITY_COLORS",
    "NORMAL",
    "PRESENT",
    "PREFERENCE_SCALE",
    "STATE_WORDS",
    "STRIP_COLORS",
    "Style",
    "agreement_figure",
    "budget_figure",
    "empty_figure",
    "head_budget_figure",
    "keep_map_figure",
    "memory_figure",
    "method_name",
    "modality_heatmap",
    "preference_matrix",
    "speed_figure",
    "sweep_figure",
    "Panel",
    "cell_grid",
    "overlay_panels",
    "paint_cells",
    "token_fractions",
    "video_frame_groups",
    "with_title",
    "REPLAY_WORDS",
    "RETRIEVED",
    "replay_bytes_figure",
    "replay_panels",
    "figure_png",
    "figures_html",
    "png_available",
    "describe_position",
    "merge_rows",
    "strip_label",
    "token_strip",
]
