"""Plotly figure builders: one function per chart, a Trace (or Compare rows) in, a ``go.Figure`` out.

Method-specific numbers come from ``LayerTrace.info`` when the method records them (MEDA's layer
entropy and budget, MadaKV's modality preference and target φ, HybridKV's head types; see
docs/methods.md); every chart also has a method-independent fallback measured for any method (kept
tokens, attention share per modality, attention entropy), so every run can be inspected.

Every builder takes ``present`` (``True`` or a :class:`viz.colors.Style`): presentation mode, with
fonts of 20 px and more, thick lines and big markers. Layout for any width: the title sits on top
(subtitle for explanations), the legend is horizontal between title and plot, axes use automargins,
long category labels wrap, and the mode bar is vertical on the right so it never covers the title.
Legends and axes use plain words; colours follow :mod:`viz.colors` (colour = what happened to a
token, grey = what kind of token).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .colors import (
    BUDGET_SCALE,
    KEEP_SCALE,
    KEPT,
    MODALITY_COLORS,
    MODALITY_PATTERNS,
    NOT_COMPRESSED,
    PREFERENCE_SCALE,
    SERIES,
    Style,
    hex_color,
)
from .overlay import token_fractions

__all__ = [
    "empty_figure",
    "budget_figure",
    "preference_matrix",
    "modality_heatmap",
    "head_budget_figure",
    "memory_figure",
    "speed_figure",
    "agreement_figure",
    "sweep_figure",
    "keep_map_figure",
    "method_name",
]

_MODALITIES = ("text", "image", "video")
_NAMES = {
    "full": "Full",
    "streaming_llm": "StreamingLLM",
    "h2o": "H2O",
    "snapkv": "SnapKV",
    "pyramidkv": "PyramidKV",
    "adakv": "AdaKV",
    "lookm": "LOOK-M",
    "meda": "MEDA",
    "madakv": "MadaKV",
    "hybridkv": "HybridKV",
}


def method_name(method: Any) -> str:
    """Display name of a method id (``"lookm"`` -> ``"LOOK-M"``); unknown ids come back unchanged."""
    return _NAMES.get(str(method).lower(), str(method))


def _wrap(label: str, width: int) -> str:
    return "<br>".join(textwrap.wrap(str(label), width, break_long_words=False, break_on_hyphens=False)) or str(label)


def _finish(fig: go.Figure, title: str, st: Style, height: int = 340, subtitle: str = "") -> go.Figure:
    """Shared layout: title (+ subtitle) on top, then a horizontal legend, then the plot (automargins).

    The legend hangs from the container just under the title, so it can wrap onto more rows (narrow
    screens, large type) without covering the title: plotly pushes the plot down to make room.
    """
    height = round(height * st.height)
    title = _wrap(title, 44 if st.present else 60)  # plotly never wraps titles: narrow screens would clip them
    subtitle = _wrap(subtitle, 60 if st.present else 90) if subtitle else ""
    lines, sub_lines = title.count("<br>") + 1, (subtitle.count("<br>") + 1 if subtitle else 0)
    head = 8 + round(1.4 * st.title * lines) + round(1.5 * st.font * sub_lines) + 4
    height += head - (8 + round(1.4 * st.title) + 4)  # extra title lines do not eat the plot
    fig.update_layout(
        template="plotly_white",
        height=height,
        font=dict(size=st.font),
        title=dict(
            text=title,
            x=0.01,
            xanchor="left",
            y=1.0,
            yref="container",
            yanchor="top",
            pad=dict(t=8),
            font=dict(size=st.title),
            subtitle=dict(text=subtitle, font=dict(size=st.font)),
        ),
        margin=dict(l=10, r=50, t=head + 10, b=10, autoexpand=True),
        legend=dict(
            orientation="h",
            yref="container",
            y=1.0 - head / height,
            yanchor="top",
            xanchor="left",
            x=0.01,
            font=dict(size=st.font),
        ),
        modebar=dict(orientation="v"),
        hoverlabel=dict(font=dict(size=st.font)),
    )
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def empty_figure(message: str, title: str = "", present: bool | Style = False) -> go.Figure:
    st = Style.of(present)
    fig = go.Figure()
    fig.add_annotation(
        text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=st.font + 1)
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _finish(fig, title, st)


def _info_values(trace: Any, keys: Sequence[str]) -> tuple[str, list[Any]] | None:
    """The first info key present in every layer, with its value per layer."""
    for key in keys:
        values = [lt.info.get(key) for lt in trace.layers]
        if values and all(v is not None for v in values):
            return key, values
    return None


def _scalar(value: Any) -> float:
    arr = np.asarray(value, dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


def _modality_codes(trace: Any, length: int) -> np.ndarray:
    codes = np.zeros(length, dtype=np.int64)
    if trace.modality is not None:
        n = min(len(trace.modality), length)
        codes[:n] = np.asarray(trace.modality.modality)[:n]
    return codes


def _over_plan_reason(trace: Any, key: str) -> str:
    """Why a layer keeps more than planned, in words (see docs/methods.md for each method)."""
    if any(lt.info.get("over_budget") for lt in trace.layers):
        return "every text token stays on top of the budget (text prior)"
    if key == "phi":
        return "heads keep what their attention needs (up to max_ratio × φ); the last layer takes what is left"
    if key == "layer_budget":
        return "every text token stays on top of the budget (text prior)"
    return "the recent window and rounding come on top of the plan"


# ---- Inspect: per layer ---------------------------------------------------------------------
def budget_figure(trace: Any, present: bool | Style = False) -> go.Figure:
    """Per layer: tokens kept per KV head (mean over heads), stacked by modality, and an entropy curve.

    The curve is the method's own layer entropy when it records one (MEDA's cross-modal entropy),
    else the measured attention entropy of the observation-window queries (mean over query heads).
    A method's planned per-head budget (MEDA's layer budget, MadaKV's φ, PyramidKV's layer capacity,
    AdaKV/HybridKV's mean head budget) is drawn as a black bar mark; when bars rise above it, the
    subtitle and the hover text say why.
    """
    st = Style.of(present)
    name = method_name(trace.method)
    if not trace.layers:
        return empty_figure("no layers recorded", "Budget per layer", st)
    layers = [lt.layer for lt in trace.layers]
    length = max(int(trace.prompt_length), int(trace.span_length))
    codes = _modality_codes(trace, length)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    per_mod = np.zeros((len(layers), 3))
    spread = []
    for i, lt in enumerate(trace.layers):
        heads = max(1, len(lt.kept))
        for kept in lt.kept:
            k = np.asarray(kept, dtype=np.int64)
            k = k[(k >= 0) & (k < length)]
            per_mod[i] += np.bincount(codes[k], minlength=3)[:3] / heads
        budgets = lt.budgets
        spread.append(f"heads keep {min(budgets) if budgets else 0} to {max(budgets) if budgets else 0}")
    for m, mod in enumerate(_MODALITIES):
        if per_mod[:, m].sum() == 0 and m > 0:
            continue
        fig.add_bar(
            x=layers,
            y=per_mod[:, m],
            name=f"{mod} tokens kept",
            marker=dict(
                color=MODALITY_COLORS[mod],
                line=dict(color="#222222", width=0.5),
                pattern=dict(shape=MODALITY_PATTERNS[mod], fgcolor="white", solidity=0.3),
            ),
            customdata=spread,
            hovertemplate="layer %{x}: %{y:.1f} " + mod + " tokens per KV head (%{customdata})<extra></extra>",
        )
    subtitle = ""
    planned = _info_values(trace, ("layer_budget", "phi", "layer_capacity", "head_capacities", "head_budgets"))
    if planned is not None:
        key, values = planned
        plan = np.asarray([_scalar(v) for v in values])
        total = per_mod.sum(axis=1)
        reason = _over_plan_reason(trace, key)
        over = total > plan + 0.5
        notes = [reason if o else "" for o in over]
        label = "planned budget per KV head" + (", φ" if key == "phi" else "")
        fig.add_scatter(
            x=layers,
            y=plan,
            mode="markers",
            name=label,
            customdata=np.stack([total, np.asarray(notes, dtype=object)], axis=1),
            hovertemplate="layer %{x}: planned %{y:.1f}, kept %{customdata[0]:.1f}<br>%{customdata[1]}<extra></extra>",
            marker=dict(
                symbol="line-ew-open",
                size=2 * st.marker + 4,
                color="#000000",
                line=dict(width=st.line + 1, color="#000000"),
            ),
        )
        if over.any():
            subtitle = f"Kept is above the plan in {int(over.sum())} of {len(layers)} layers: {reason}."
    entropy = _info_values(trace, ("entropy", "layer_entropy"))
    if entropy is not None:
        ys = [_scalar(v) for v in entropy[1]]
        if str(trace.method).lower() == "meda" and (trace.params or {}).get("entropy", "cross_modal") == "cross_modal":
            label = "cross-modal attention entropy (MEDA, Eq. 5–6)"
        else:
            label = f"attention entropy that sets {name}'s budgets"
    elif all(lt.entropy for lt in trace.layers):
        ys, label = [_scalar(lt.entropy) for lt in trace.layers], "attention entropy of the last queries"
    else:
        ys, label = None, ""
    if ys is not None:
        fig.add_scatter(
            x=layers,
            y=ys,
            mode="lines+markers",
            name=label,
            secondary_y=True,
            line=dict(color=SERIES[3], width=st.line),
            marker=dict(size=st.marker, color=SERIES[3]),
            hovertemplate="layer %{x}: %{y:.2f} nats<extra></extra>",
        )
        fig.update_yaxes(title_text="entropy (nats)", secondary_y=True, showgrid=False, rangemode="tozero")
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="layer", dtick=1 if len(layers) <= 40 else None)
    fig.update_yaxes(title_text="tokens kept per KV head", secondary_y=False, rangemode="tozero")
    title = f"{name}: tokens kept per layer (budget {trace.capacity} of {trace.span_length} tokens)"
    return _finish(fig, title, st, height=400, subtitle=subtitle)


def _pref_value(v: Any) -> Any:
    """MadaKV-style preference per head: a number (visual weight) or a pair ``[w_v, w_t]``."""
    if isinstance(v, dict):
        weights: dict[str, float] = v
        wv, wt = (
            float(weights.get("visual", weights.get("w_v", 0.0))),
            float(weights.get("text", weights.get("w_t", 0.0))),
        )
        return wv / (wv + wt) if wv + wt > 0 else 0.5
    if isinstance(v, (list, tuple)) and len(v) == 2 and not isinstance(v[0], (list, tuple)):
        wv, wt = float(v[0]), float(v[1])
        return wv / (wv + wt) if wv + wt > 0 else 0.5
    return float(v)


def preference_matrix(trace: Any) -> tuple[np.ndarray, str, str] | None:
    """``(z[layer, head], head axis name, source)``: visual share per head, or None if nothing recorded.

    Uses MadaKV's recorded preference ``p`` (per KV head) when present, else the measured share of
    attention on image+video tokens per query head (``modality_mass``), for any method.
    """
    pref = _info_values(trace, ("preference",))
    if pref is not None:
        try:
            z = np.asarray(
                [[_pref_value(v) for v in (row if isinstance(row, (list, tuple)) else [row])] for row in pref[1]],
                dtype=np.float64,
            )
            return z, "KV head", f"{method_name(trace.method)} modality preference p (visual share)"
        except (TypeError, ValueError):
            pass
    if trace.layers and all(lt.modality_mass for lt in trace.layers):
        z = np.asarray([[float(sum(m[1:])) for m in lt.modality_mass] for lt in trace.layers], dtype=np.float64)
        return z, "query head", "measured share of attention on images and video"
    return None


def modality_heatmap(trace: Any, present: bool | Style = False) -> go.Figure:
    """Layer × head heatmap of modality preference: light = attends to text, dark = to images/video."""
    st = Style.of(present)
    got = preference_matrix(trace)
    if got is None:
        return empty_figure("attention statistics were not recorded for this run", "Modality preference", st)
    z, head_axis, source = got
    layers = [lt.layer for lt in trace.layers]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(z.shape[1])),
            y=layers,
            zmin=0.0,
            zmax=1.0,
            colorscale=PREFERENCE_SCALE,
            xgap=1,
            ygap=1,
            colorbar=dict(
                title=dict(text="looks at", side="top"),
                tickvals=[0, 0.5, 1],
                ticktext=["text", "both", "images, video"],
            ),
            hovertemplate="layer %{y}, "
            + head_axis
            + " %{x}: %{z:.2f} of its attention on images and video<extra></extra>",
        )
    )
    fig.update_xaxes(title_text=head_axis, dtick=1 if z.shape[1] <= 40 else None)
    fig.update_yaxes(title_text="layer", dtick=1 if len(layers) <= 40 else None, autorange="reversed")
    return _finish(fig, f"Layer × head: {source}", st, height=360)


def head_budget_figure(trace: Any, present: bool | Style = False) -> go.Figure:
    """Layer × KV-head heatmap of tokens kept (or planned, for HybridKV); head types as S / D labels.

    The colour scale always starts at 0 (so equal budgets do not get a scale of ±0.5 around one value);
    when every head keeps the same number, the subtitle says so.
    """
    st = Style.of(present)
    name = method_name(trace.method)
    if not trace.layers:
        return empty_figure("no layers recorded", "Per-head budgets", st)
    layers = [lt.layer for lt in trace.layers]
    z = np.asarray([lt.budgets for lt in trace.layers], dtype=np.float64)
    kept = z.copy()
    what = "tokens kept"
    planned = _info_values(trace, ("head_budgets", "head_capacities"))
    if planned is not None:
        try:
            alt = np.asarray([[float(b) for b in row] for row in planned[1]], dtype=np.float64)
            if alt.shape == z.shape:
                z, what = alt, "tokens planned"
        except (TypeError, ValueError):
            pass
    types = _info_values(trace, ("head_types", "head_type", "types"))
    sparsity = _info_values(trace, ("sparsity",))
    text = None
    if types is not None:
        text = [[str(t)[:1].upper() for t in (row if isinstance(row, (list, tuple)) else [row])] for row in types[1]]
    custom = [kept]
    hover = "layer %{y}, KV head %{x}: " + what + " %{z:.0f}, kept %{customdata[0]:.0f}"
    if sparsity is not None:
        try:
            sp = np.asarray([[float(s) for s in row] for row in sparsity[1]])
            if sp.shape == z.shape:
                custom.append(sp)
                hover += ", attention sparsity %{customdata[1]:.2f}"
        except (TypeError, ValueError):
            pass
    top = float(np.nanmax(z)) if z.size else 0.0
    heat = go.Heatmap(
        z=z,
        x=list(range(z.shape[1])),
        y=layers,
        colorscale=BUDGET_SCALE,
        zmin=0,
        zmax=max(top, 1.0),
        xgap=1,
        ygap=1,
        colorbar=dict(title=dict(text=what, side="top")),
        customdata=np.stack(custom, axis=-1),
        hovertemplate=hover + "<extra></extra>",
    )
    if text is not None and np.asarray(text).shape == z.shape:
        heat.update(text=text, texttemplate="%{text}", textfont=dict(size=st.font + 1))
    fig = go.Figure(heat)
    fig.update_xaxes(title_text="KV head", dtick=1 if z.shape[1] <= 40 else None)
    fig.update_yaxes(title_text="layer", dtick=1 if len(layers) <= 40 else None, autorange="reversed")
    subtitle = ""
    if z.size and float(np.nanmin(z)) == top:
        subtitle = f"All heads of all layers: {top:.0f} {what} each."
    title = (
        "head types (S = static, D = dynamic) and budgets" if types is not None else "tokens kept per layer and KV head"
    )
    return _finish(fig, f"{name}: {title}", st, height=360, subtitle=subtitle)


# ---- Compare --------------------------------------------------------------------------------
def _labels(rows: Sequence[dict[str, Any]], st: Style) -> tuple[list[str], list[str]]:
    """(wrapped tick labels, full labels) of Compare rows; method ids shown by their display name."""
    full = []
    for r in rows:
        label = str(r["label"])
        method = r.get("method")
        if method is not None and label.startswith(str(method)):
            label = method_name(method) + label[len(str(method)) :]
        full.append(label)
    width = 10 if st.present else 14
    # the budget goes on its own line: four to eight bars share a half-width chart
    return [_wrap(label, width).replace(" @ ", "<br>@ ") for label in full], full


def _bars(
    fig: go.Figure,
    rows: Sequence[dict[str, Any]],
    series: Sequence[tuple[str, str, str, float]],
    unit: str,
    st: Style,
    **kw: Any,
) -> None:
    ticks, full = _labels(rows, st)
    for key, name, colour, scale in series:
        fig.add_bar(
            x=ticks,
            y=[(r.get(key) or 0) * scale for r in rows],
            name=name,
            marker_color=colour,
            customdata=full,
            hovertemplate="%{customdata}: %{y:.2f} " + unit + "<extra>" + name + "</extra>",
            **kw,
        )
    fig.update_xaxes(tickangle=0)


def memory_figure(rows: Sequence[dict[str, Any]], present: bool | Style = False) -> go.Figure:
    """Physical KV-cache bytes per method: full prompt, after compression, at the end of decoding."""
    st = Style.of(present)
    if not rows:
        return empty_figure("no runs", "KV-cache memory", st)
    fig = go.Figure()
    _bars(
        fig,
        rows,
        (
            ("kv_bytes_full", "prompt, uncompressed", hex_color(NOT_COMPRESSED), 1 / 1024),
            ("kv_bytes_compressed", "after compression", hex_color(KEPT), 1 / 1024),
            ("kv_bytes_end", "end of the answer", SERIES[1], 1 / 1024),
        ),
        "KiB",
        st,
    )
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="KV cache (KiB)")
    return _finish(fig, "Physical KV-cache memory", st)


def speed_figure(rows: Sequence[dict[str, Any]], present: bool | Style = False) -> go.Figure:
    """Prefill, statistics + compression, and decode time per token (ms) per method."""
    st = Style.of(present)
    if not rows:
        return empty_figure("no runs", "Time", st)
    fig = go.Figure()
    _bars(
        fig,
        rows,
        (
            ("prefill_ms", "prefill", SERIES[0], 1.0),
            ("compress_ms", "compression", SERIES[3], 1.0),
            ("decode_ms_per_token", "decode, per token", SERIES[2], 1.0),
        ),
        "ms",
        st,
    )
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="milliseconds")
    return _finish(fig, "Time: prefill, compression, decode per token", st)


def agreement_figure(rows: Sequence[dict[str, Any]], present: bool | Style = False) -> go.Figure:
    """Agreement with the Full cache: token overlap (bars) and next-token KL (markers)."""
    st = Style.of(present)
    rows = [r for r in rows if r.get("overlap") is not None]
    if not rows:
        return empty_figure("no agreement computed", "Agreement with Full", st)
    ticks, full = _labels(rows, st)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(
        x=ticks,
        y=[r["overlap"] for r in rows],
        name="answer tokens equal to Full's",
        marker_color=hex_color(KEPT),
        customdata=full,
        hovertemplate="%{customdata}: %{y:.2f} of the tokens<extra></extra>",
    )
    kl = [r.get("kl") for r in rows]
    if any(v is not None for v in kl):
        fig.add_scatter(
            x=ticks,
            y=kl,
            mode="markers",
            name="divergence from Full (KL, nats)",
            customdata=full,
            marker=dict(size=st.marker + 4, color=SERIES[0], symbol="diamond", line=dict(width=1, color="#000")),
            hovertemplate="%{customdata}: KL %{y:.3f} nats<extra></extra>",
            secondary_y=True,
        )
        fig.update_yaxes(title_text="KL (nats)", secondary_y=True, rangemode="tozero", showgrid=False)
    fig.update_yaxes(title_text="overlap", range=[0, 1.05], secondary_y=False)
    fig.update_xaxes(tickangle=0)
    return _finish(fig, "Agreement with the Full cache", st)


def sweep_figure(points: Sequence[dict[str, Any]], present: bool | Style = False) -> go.Figure:
    """Budget vs quality: per method, KL to Full and token overlap over the swept budgets."""
    st = Style.of(present)
    if not points:
        return empty_figure("no sweep asked for (enter budgets such as 0.1, 0.3, 0.6)", "Budget vs quality", st)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    methods = list(dict.fromkeys(p["method"] for p in points))
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "star", "hexagon", "cross"]
    for i, m in enumerate(methods):
        ps = sorted((p for p in points if p["method"] == m), key=lambda p: p["budget"])
        colour, symbol, label = SERIES[i % len(SERIES)], symbols[i % len(symbols)], method_name(m)
        marker = dict(color=colour, symbol=symbol, size=st.marker)
        fig.add_scatter(
            x=[p["budget"] for p in ps],
            y=[p.get("overlap") for p in ps],
            mode="lines+markers",
            name=f"{label}: overlap",
            line=dict(color=colour, width=st.line),
            marker=marker,
            legendgroup=label,
            hovertemplate=label + " at budget %{x}: overlap %{y:.2f}<extra></extra>",
        )
        if any(p.get("kl") is not None for p in ps):
            fig.add_scatter(
                x=[p["budget"] for p in ps],
                y=[p.get("kl") for p in ps],
                mode="lines+markers",
                name=f"{label}: KL",
                line=dict(color=colour, dash="dot", width=st.line),
                marker=marker,
                legendgroup=label,
                secondary_y=True,
                hovertemplate=label + " at budget %{x}: KL %{y:.3f} nats<extra></extra>",
            )
    fig.update_xaxes(title_text="budget (share of tokens kept)")
    fig.update_yaxes(title_text="token overlap with Full (solid)", range=[0, 1.05], secondary_y=False)
    fig.update_yaxes(title_text="KL, nats (dotted)", rangemode="tozero", secondary_y=True, showgrid=False)
    return _finish(fig, "Budget vs quality (agreement with Full)", st, height=400)


def keep_map_figure(runs: Iterable[tuple[str, Any]], present: bool | Style = False) -> go.Figure:
    """Methods × prompt positions: share of (layer, KV head) pairs keeping each token, under a token-type row."""
    st = Style.of(present)
    runs = [(label, trace) for label, trace in runs if trace is not None]
    if not runs:
        return empty_figure("no runs", "What each method kept", st)
    length = max(max(int(t.prompt_length), int(t.span_length)) for _, t in runs)
    z = np.full((len(runs), length), np.nan)
    for i, (_, trace) in enumerate(runs):
        kept = token_fractions(trace).kept
        z[i, : len(kept)] = kept
    codes = _modality_codes(runs[0][1], length)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.12, 0.88], vertical_spacing=0.03)
    band = [
        [0.0, MODALITY_COLORS["text"]],
        [0.333, MODALITY_COLORS["text"]],
        [0.334, MODALITY_COLORS["image"]],
        [0.666, MODALITY_COLORS["image"]],
        [0.667, MODALITY_COLORS["video"]],
        [1.0, MODALITY_COLORS["video"]],
    ]
    names = np.asarray(_MODALITIES)[codes][None, :]
    fig.add_trace(
        go.Heatmap(
            z=codes[None, :],
            zmin=0,
            zmax=2,
            colorscale=band,
            showscale=False,
            customdata=names,
            y=["token type"],
            hovertemplate="position %{x}: %{customdata} token<extra></extra>",
        ),
        row=1,
        col=1,
    )
    labels = [label for label, _ in runs]
    width = 10 if st.present else 16
    fig.add_trace(
        go.Heatmap(
            z=z,
            y=[_wrap(method_name(label), width) for label in labels],
            zmin=0,
            zmax=1,
            colorscale=KEEP_SCALE,
            customdata=np.asarray([[label] * length for label in labels], dtype=object),
            colorbar=dict(
                title=dict(text="kept by", side="top"),
                y=0.44,
                len=0.85,
                tickvals=[0, 0.5, 1],
                ticktext=["no layer/head", "half", "all"],
            ),
            hovertemplate="%{customdata}, position %{x}: kept by %{z:.0%} of layers × heads<extra></extra>",
        ),
        row=2,
        col=1,
    )
    present_codes = set(codes.tolist())
    for m, mod in enumerate(_MODALITIES):  # legend for the token-type row (heatmaps have no legend entries)
        if m in present_codes:
            fig.add_scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"{mod} token",
                legendgroup="type",
                marker=dict(
                    symbol="square", size=st.marker + 5, color=MODALITY_COLORS[mod], line=dict(color="#222222", width=1)
                ),
                hoverinfo="skip",
                row=1,
                col=1,
            )
    fig.update_layout(showlegend=True, legend=dict(title=dict(text="top row:")))
    fig.update_xaxes(title_text="prompt position", row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    return _finish(fig, "Kept per token (share of layers × heads)", st, height=200 + 42 * len(runs))
