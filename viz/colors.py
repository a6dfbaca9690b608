"""Colours shared by figures, overlays and the token strip (one meaning, one colour, everywhere)."""

from __future__ import annotations

KEPT = (46, 160, 67)  # green: the token stayed in the cache
EVICTED = (215, 48, 39)  # red: dropped
MERGED = (49, 110, 200)  # blue: dropped, but its key/value was folded into a kept token
NOT_COMPRESSED = (150, 150, 150)  # grey: outside the compressed span (the question, query-agnostic mode)

MODALITY_COLORS = {"text": "#4C78A8", "image": "#F58518", "video": "#54A24B"}

#: Continuous scale for "fraction of (layer, head) pairs that kept the token": evicted -> kept.
KEEP_SCALE = [[0.0, "rgb(215,48,39)"], [0.5, "rgb(254,224,139)"], [1.0, "rgb(46,160,67)"]]
#: Visual share of attention: 0 = all on text, 1 = all on images/video.
PREFERENCE_SCALE = [[0.0, "#2166ac"], [0.5, "#f7f7f7"], [1.0, "#e66101"]]
#: Budgets (tokens per head): light -> dark.
BUDGET_SCALE = "Viridis"

STRIP_COLORS = {
    "kept": "#2ea043",
    "kept by most heads": "#a6d96a",
    "kept by few heads": "#fdae61",
    "evicted": "#d73027",
    "merged": "#316ec8",
    "question (not compressed)": "#bbbbbb",
}


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)
