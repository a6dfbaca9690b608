"""Decode replay pictures: the KV cache after one decode step, from a trace alone (``mmkv.trace.replay``).

- :func:`replay_panels`: every image and video frame with the cells the cache holds at this step in their
  own colours (not held: faded and hatched, as in :mod:`viz.overlay`), and boxes around the cells that
  changed at this step: evicted now (H2O's decode-time eviction, vermillion) and retrieved for this step's
  query (HybridKV's dynamic heads, reddish purple);
- :func:`replay_bytes_figure`: physical KV bytes held after each step, against what the Full cache would
  hold at the same length, with the current step marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from .colors import EVICTED, KEPT, NOT_COMPRESSED, Style, hex_color
from .figures import _finish, empty_figure
from .overlay import Panel, TokenFractions, overlay_panels

__all__ = ["RETRIEVED", "REPLAY_WORDS", "replay_panels", "replay_bytes_figure"]

#: Reddish purple (Okabe-Ito): chunks a HybridKV dynamic head retrieved for this step's query.
RETRIEVED = (204, 121, 167)
REPLAY_WORDS = {
    "held": "held in the cache at this step: the picture's own colours",
    "gone": "not held (evicted earlier, or offloaded to host memory): faded and hatched",
    "evicted now": "evicted at this step (H2O): vermillion box",
    "retrieved": "retrieved for this step's query (HybridKV dynamic heads): purple box",
}


def replay_panels(
    trace: Any,
    images: Sequence[Image.Image],
    videos: Sequence[Any],
    state: Any,
    *,
    alpha: float = 0.6,
    max_frames: int | None = None,
    present: bool | Style = False,
) -> list[Panel]:
    """The pictures of the cache at one step (``state``: a :class:`mmkv.trace.replay.StepState`)."""
    size = len(state.held)
    length = max(int(trace.prompt_length), int(trace.span_length), size)
    held = np.ones(length)
    held[:size] = state.held
    fractions = TokenFractions(kept=held, merged=np.zeros(length), span=int(trace.span_length), pairs=state.pairs)

    def padded(values: np.ndarray) -> np.ndarray:
        out = np.zeros(length)
        out[: len(values)] = values
        return out

    outlines = [(padded(state.evicted_now), EVICTED), (padded(state.retrieved), RETRIEVED)]
    panels = overlay_panels(
        trace,
        images,
        videos,
        alpha=alpha,
        max_frames=max_frames,
        present=present,
        fractions=fractions,
        outlines=outlines,
        state_map=state.pairs > 1,
        draw_merges=False,
    )
    for p in panels:
        p.caption = p.caption.replace("% kept", "% held")
    return panels


def replay_bytes_figure(trace: Any, step: int, present: bool | Style = False) -> go.Figure:
    """KV bytes on the device after every decode step (``Trace.step_bytes``) and the Full cache at the same length."""
    st = Style.of(present)
    sizes = list(trace.step_bytes or [])
    if not sizes:
        return empty_figure("this run has no decode record", "Bytes held per step", st)
    steps = list(range(len(sizes)))
    per_token = int(trace.bytes_per_token_head) * int(trace.num_kv_heads) * int(trace.num_layers)
    full = [per_token * int(n) / 1024 for n in trace.step_lengths]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=full,
            mode="lines",
            name="Full cache at this length",
            line=dict(color=hex_color(NOT_COMPRESSED), width=st.line, dash="dash"),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[b / 1024 for b in sizes],
            mode="lines+markers",
            name="held by this method",
            line=dict(color=hex_color(KEPT), width=st.line),
            marker=dict(size=st.marker // 2 + 2),
        )
    )
    at = min(max(int(step), 0), len(sizes) - 1)
    fig.add_trace(
        go.Scatter(
            x=[at],
            y=[sizes[at] / 1024],
            mode="markers",
            name="this step",
            marker=dict(size=st.marker + 6, color=hex_color(EVICTED), symbol="diamond"),
        )
    )
    fig.update_xaxes(title_text="decode step (one generated token each)")
    fig.update_yaxes(title_text="KV cache (KiB)", rangemode="tozero")
    return _finish(fig, "Bytes the cache holds while the answer is generated", st)
