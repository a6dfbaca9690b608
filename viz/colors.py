"""Two palettes that never share a colour, plus the normal / presentation :class:`Style`.

- **State** (what happened to a token, Okabe–Ito hues): kept = dark blue, evicted = vermillion,
  merged = yellow. Blue vs orange/yellow survives every colour-vision deficiency, and the three differ
  in lightness (L* ≈ 37 / 54 / 89) so they also separate in greyscale. Overlays add patterns: evicted
  cells are hatched, merged cells dotted, kept cells keep their pixels.
- **Modality** (what kind of token): shades of grey (text light, image mid, video dark), plus bar
  patterns in charts. Rule for the audience: *colour = what happened, grey = what kind of token*.
- **Series** (Compare charts, one colour per quantity or method): the remaining Okabe–Ito hues.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

KEPT = (0, 91, 148)  # dark blue: the token stayed in the cache
EVICTED = (213, 94, 0)  # vermillion: dropped from the cache
MERGED = (240, 228, 66)  # yellow: dropped, but its key/value was folded into a kept token
NOT_COMPRESSED = (187, 187, 187)  # light grey: outside the compressed span (the question, query-agnostic mode)

#: What each state colour means, in the words legends use.
STATE_WORDS = {"kept": "kept in the cache", "evicted": "evicted (dropped)", "merged": "merged into a kept token"}

MODALITY_COLORS = {"text": "#BBBBBB", "image": "#777777", "video": "#333333"}
#: Plotly bar patterns for the modalities (a second cue besides the grey level).
MODALITY_PATTERNS = {"text": "", "image": "/", "video": "."}

#: Okabe–Ito hues not used by the state palette: for series without a state or modality meaning.
SERIES = ["#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#000000", "#0072B2", "#D55E00", "#999933"]


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


#: Share of (layer, head) pairs that kept a token: 0 (evicted everywhere, near white) -> 1 (kept everywhere, kept blue).
KEEP_SCALE: list[list[Any]] = [[0.0, "#f7f7f7"], [0.5, "#8fb3d0"], [1.0, hex_color(KEPT)]]
#: Visual share of attention (a modality quantity, so greys): 0 = all on text (light), 1 = all on images/video (dark).
PREFERENCE_SCALE = [[0.0, "#f7f7f7"], [0.5, "#969696"], [1.0, "#1a1a1a"]]
#: Tokens kept per head: none (light) -> many (the kept colour).
BUDGET_SCALE = [[0.0, "#f2f2f2"], [1.0, hex_color(KEPT)]]

#: Token strip (``gr.HighlightedText``) categories -> colour; the keys are what its legend shows.
STRIP_COLORS = {
    "kept": hex_color(KEPT),
    "kept by most layers/heads": "#7FA8C9",
    "kept by few layers/heads": "#EAAE80",
    "evicted": hex_color(EVICTED),
    "merged into a kept token": hex_color(MERGED),
    "question (not compressed)": hex_color(NOT_COMPRESSED),
}


@dataclass(frozen=True)
class Style:
    """Sizes for one look. ``Style.of(True)`` is presentation mode (projector, back of a hall)."""

    present: bool = False
    font: int = 12  # plotly base font (px)
    title: int = 15  # plotly title font (px)
    line: float = 2.0  # plotly line width
    marker: int = 9  # plotly marker size
    height: float = 1.0  # figure height factor
    outline: int = 2  # overlay: kept-region contour / merge line width (px)
    hatch: int = 6  # overlay: pattern spacing (px)
    min_side: int = 224  # overlay: smallest panel side (px)
    label: int = 12  # overlay: text size of the side map's labels (px)

    @staticmethod
    def of(present: bool | Style = False) -> Style:
        if isinstance(present, Style):
            return present
        return PRESENT if present else NORMAL


NORMAL = Style()
PRESENT = replace(
    NORMAL,
    present=True,
    font=20,
    title=26,
    line=4.0,
    marker=15,
    height=1.35,
    outline=4,
    hatch=12,
    min_side=384,
    label=20,
)
