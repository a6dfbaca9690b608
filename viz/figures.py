"""Plotly figure builders: one function per chart, a Trace (or Compare rows) in, a ``go.Figure`` out.

Method-specific numbers come from ``LayerTrace.info`` when the method records them (MEDA's layer
entropy and budget, MadaKV's modality preference, HybridKV's head types); every chart also has a
method-independent fallback measured for any method (kept tokens, attention share per modality,
attention entropy), so every run can be inspected.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .colors import BUDGET_SCALE, KEEP_SCALE, MODALITY_COLORS, PREFERENCE_SCALE
from .overlay import token_fractions

__all__ = [
    "empty_figure", "budget_figure", "preference_matrix", "modality_heatmap", "head_budget_figure",
    "memory_figure", "speed_figure", "agreement_figure", "sweep_figure", "keep_map_figure",
]

_MODALITIES = ("text", "image", "video")
_LAYOUT = dict(template="plotly_white", height=340, margin=dict(l=60, r=30, t=60, b=50), font=dict(size=12))


def _style(fig: go.Figure, title: str, **kw: Any) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=15)), **{**_LAYOUT, **kw})
    return fig


def empty_figure(message: str, title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=13))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title)


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


# ---- Inspect: per layer ---------------------------------------------------------------------
def budget_figure(trace: Any) -> go.Figure:
    """Per layer: tokens kept per KV head (mean over heads), stacked by modality, and an entropy curve.

    The curve is the method's own layer entropy when it records one (MEDA: ``info["entropy"]``),
    else the measured attention entropy of the observation-window queries (mean over query heads).
    A method's planned layer budget (``info["layer_budget"]``, or MadaKV's ``phi``) is drawn as markers.
    """
    if not trace.layers:
        return empty_figure("no layers recorded", "Budget per layer")
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
        spread.append(f"min {min(budgets) if budgets else 0}, max {max(budgets) if budgets else 0}")
    for m, name in enumerate(_MODALITIES):
        if per_mod[:, m].sum() == 0 and m > 0:
            continue
        fig.add_bar(x=layers, y=per_mod[:, m], name=f"kept {name}", marker_color=MODALITY_COLORS[name],
                    customdata=spread, hovertemplate="layer %{x}: %{y:.1f} " + name + " tokens/head (%{customdata})<extra></extra>")
    planned = _info_values(trace, ("layer_budget", "phi", "layer_capacity"))
    if planned is not None:
        key, values = planned
        fig.add_scatter(x=layers, y=[_scalar(v) for v in values], mode="markers", name=f"planned ({key})",
                        marker=dict(symbol="line-ew-open", size=22, line=dict(width=3, color="#222")))
    entropy = _info_values(trace, ("entropy", "layer_entropy"))
    if entropy is not None:
        ys, label = [_scalar(v) for v in entropy[1]], f"{trace.method} layer entropy (info['{entropy[0]}'])"
    elif all(lt.entropy for lt in trace.layers):
        ys, label = [_scalar(lt.entropy) for lt in trace.layers], "attention entropy of window queries (nats)"
    else:
        ys, label = None, ""
    if ys is not None:
        fig.add_scatter(x=layers, y=ys, mode="lines+markers", name=label, line=dict(color="#7b3294", width=2),
                        secondary_y=True)
        fig.update_yaxes(title_text="entropy (nats)", secondary_y=True, showgrid=False, rangemode="tozero")
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title_text="layer", dtick=1 if len(layers) <= 40 else None)
    fig.update_yaxes(title_text="tokens kept per KV head", secondary_y=False)
    return _style(fig, f"{trace.method}: budget per layer (capacity {trace.capacity} of {trace.span_length} tokens)", height=380)


def _pref_value(v: Any) -> Any:
    """MadaKV-style preference per head: a number (visual weight) or a pair ``[w_v, w_t]``."""
    if isinstance(v, dict):
        wv, wt = float(v.get("visual", v.get("w_v", 0.0))), float(v.get("text", v.get("w_t", 0.0)))
        return wv / (wv + wt) if wv + wt > 0 else 0.5
    if isinstance(v, (list, tuple)) and len(v) == 2 and not isinstance(v[0], (list, tuple)):
        wv, wt = float(v[0]), float(v[1])
        return wv / (wv + wt) if wv + wt > 0 else 0.5
    return float(v)


def preference_matrix(trace: Any) -> tuple[np.ndarray, str, str] | None:
    """``(z[layer, head], head axis name, source)``: visual share per head, or None if nothing recorded.

    Uses MadaKV's recorded ``info["preference"]`` (per KV head) when present, else the measured
    share of attention on image+video tokens per query head (``modality_mass``), for any method.
    """
    pref = _info_values(trace, ("preference",))
    if pref is not None:
        try:
            z = np.asarray([[_pref_value(v) for v in (row if isinstance(row, (list, tuple)) else [row])] for row in pref[1]],
                           dtype=np.float64)
            return z, "KV head", f"{trace.method} modality preference (visual weight)"
        except (TypeError, ValueError):
            pass
    if trace.layers and all(lt.modality_mass for lt in trace.layers):
        z = np.asarray([[float(sum(m[1:])) for m in lt.modality_mass] for lt in trace.layers], dtype=np.float64)
        return z, "query head", "measured visual share of attention (image + video)"
    return None


def modality_heatmap(trace: Any) -> go.Figure:
    """Layer × head heatmap of modality preference: 0 = attends to text, 1 = attends to images/video."""
    got = preference_matrix(trace)
    if got is None:
        return empty_figure("attention statistics were not recorded for this run", "Modality preference")
    z, head_axis, source = got
    layers = [lt.layer for lt in trace.layers]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(z.shape[1])), y=layers, zmin=0.0, zmax=1.0, colorscale=PREFERENCE_SCALE,
        colorbar=dict(title="visual<br>share", tickvals=[0, 0.5, 1], ticktext=["text", "½", "visual"]),
        hovertemplate="layer %{y}, " + head_axis + " %{x}: %{z:.2f}<extra></extra>",
    ))
    fig.update_xaxes(title_text=head_axis, dtick=1 if z.shape[1] <= 40 else None)
    fig.update_yaxes(title_text="layer", dtick=1 if len(layers) <= 40 else None, autorange="reversed")
    return _style(fig, f"Layer × head: {source}")


def head_budget_figure(trace: Any) -> go.Figure:
    """Layer × KV-head heatmap of tokens kept; head types (HybridKV ``info["head_types"]``) as labels."""
    if not trace.layers:
        return empty_figure("no layers recorded", "Per-head budgets")
    layers = [lt.layer for lt in trace.layers]
    z = np.asarray([lt.budgets for lt in trace.layers], dtype=np.float64)
    planned = _info_values(trace, ("head_budgets", "head_capacities"))
    if planned is not None:
        try:
            alt = np.asarray([[float(b) for b in row] for row in planned[1]], dtype=np.float64)
            z = alt if alt.shape == z.shape else z
        except (TypeError, ValueError):
            pass
    types = _info_values(trace, ("head_types", "head_type", "types"))
    sparsity = _info_values(trace, ("sparsity",))
    text = None
    if types is not None:
        text = [[str(t)[:1].upper() for t in (row if isinstance(row, (list, tuple)) else [row])] for row in types[1]]
    hover = "layer %{y}, KV head %{x}: %{z:.0f} tokens"
    custom = None
    if sparsity is not None:
        try:
            custom = np.asarray([[float(s) for s in row] for row in sparsity[1]])
            if custom.shape == z.shape:
                hover += ", sparsity %{customdata:.2f}"
            else:
                custom = None
        except (TypeError, ValueError):
            custom = None
    heat = go.Heatmap(z=z, x=list(range(z.shape[1])), y=layers, colorscale=BUDGET_SCALE, zmin=0,
                      colorbar=dict(title="tokens"), hovertemplate=hover + "<extra></extra>", customdata=custom)
    if text is not None and np.asarray(text).shape == z.shape:
        heat.update(text=text, texttemplate="%{text}", textfont=dict(color="white", size=13))
    fig = go.Figure(heat)
    fig.update_xaxes(title_text="KV head", dtick=1 if z.shape[1] <= 40 else None)
    fig.update_yaxes(title_text="layer", dtick=1 if len(layers) <= 40 else None, autorange="reversed")
    title = "head types (S = static, D = dynamic) and budgets" if types is not None else "tokens kept per layer and KV head"
    return _style(fig, f"{trace.method}: {title}")


# ---- Compare --------------------------------------------------------------------------------
def _labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [str(r["label"]) for r in rows]


def memory_figure(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Physical KV-cache bytes per method: full prompt, after compression, at the end of decoding."""
    if not rows:
        return empty_figure("no runs", "KV-cache memory")
    labels = _labels(rows)
    fig = go.Figure()
    for key, name, colour in (("kv_bytes_full", "prompt, uncompressed", "#bbbbbb"),
                              ("kv_bytes_compressed", "after compression", "#2ea043"),
                              ("kv_bytes_end", "end of answer", "#316ec8")):
        ys = [r.get(key, 0) / 1024 for r in rows]
        fig.add_bar(x=labels, y=ys, name=name, marker_color=colour, hovertemplate="%{x}: %{y:.1f} KiB<extra></extra>")
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(title_text="KV cache (KiB)")
    return _style(fig, "Physical KV-cache memory")


def speed_figure(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Prefill, statistics + compression, and decode time per token (ms) per method."""
    if not rows:
        return empty_figure("no runs", "Time")
    labels = _labels(rows)
    fig = go.Figure()
    for key, name, colour in (("prefill_ms", "prefill (ms)", "#4C78A8"),
                              ("compress_ms", "compression (ms)", "#F58518"),
                              ("decode_ms_per_token", "decode (ms / token)", "#54A24B")):
        fig.add_bar(x=labels, y=[r.get(key, 0.0) for r in rows], name=name, marker_color=colour,
                    hovertemplate="%{x}: %{y:.2f}<extra>" + name + "</extra>")
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(title_text="milliseconds")
    return _style(fig, "Time: prefill, compression, decode per token")


def agreement_figure(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Agreement with the Full cache: token overlap (bars) and next-token KL (markers)."""
    rows = [r for r in rows if r.get("overlap") is not None]
    if not rows:
        return empty_figure("no agreement computed", "Agreement with Full")
    labels = _labels(rows)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=labels, y=[r["overlap"] for r in rows], name="token overlap with Full", marker_color="#2ea043")
    kl = [r.get("kl") for r in rows]
    if any(v is not None for v in kl):
        fig.add_scatter(x=labels, y=kl, mode="markers", name="mean next-token KL(Full‖method), nats",
                        marker=dict(size=13, color="#d73027", symbol="diamond"), secondary_y=True)
        fig.update_yaxes(title_text="KL (nats)", secondary_y=True, rangemode="tozero", showgrid=False)
    fig.update_yaxes(title_text="overlap", range=[0, 1.05], secondary_y=False)
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return _style(fig, "Agreement with the Full cache")


def sweep_figure(points: Sequence[dict[str, Any]]) -> go.Figure:
    """Budget vs quality: per method, KL to Full and token overlap over the swept budgets."""
    if not points:
        return empty_figure("no sweep asked for (enter budgets such as 0.1, 0.3, 0.6)", "Budget vs quality")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    palette = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC", "#EECA3B"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    for i, m in enumerate(methods):
        ps = sorted((p for p in points if p["method"] == m), key=lambda p: p["budget"])
        colour = palette[i % len(palette)]
        fig.add_scatter(x=[p["budget"] for p in ps], y=[p.get("overlap") for p in ps], mode="lines+markers",
                        name=f"{m}: overlap", line=dict(color=colour))
        if any(p.get("kl") is not None for p in ps):
            fig.add_scatter(x=[p["budget"] for p in ps], y=[p.get("kl") for p in ps], mode="lines+markers",
                            name=f"{m}: KL", line=dict(color=colour, dash="dot"), secondary_y=True)
    fig.update_xaxes(title_text="budget")
    fig.update_yaxes(title_text="token overlap with Full", range=[0, 1.05], secondary_y=False)
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", secondary_y=True, showgrid=False)
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _style(fig, "Budget vs quality (agreement with Full)", height=380)


def keep_map_figure(runs: Iterable[tuple[str, Any]]) -> go.Figure:
    """Methods × prompt positions: fraction of (layer, KV head) pairs keeping each token, under a modality band."""
    runs = [(label, trace) for label, trace in runs if trace is not None]
    if not runs:
        return empty_figure("no runs", "What each method kept")
    length = max(max(int(t.prompt_length), int(t.span_length)) for _, t in runs)
    z = np.full((len(runs), length), np.nan)
    for i, (_, trace) in enumerate(runs):
        kept = token_fractions(trace).kept
        z[i, : len(kept)] = kept
    codes = _modality_codes(runs[0][1], length)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.12, 0.88], vertical_spacing=0.03)
    band = [[0.0, MODALITY_COLORS["text"]], [0.333, MODALITY_COLORS["text"]], [0.334, MODALITY_COLORS["image"]],
            [0.666, MODALITY_COLORS["image"]], [0.667, MODALITY_COLORS["video"]], [1.0, MODALITY_COLORS["video"]]]
    names = np.asarray(_MODALITIES)[codes][None, :]
    fig.add_trace(go.Heatmap(z=codes[None, :], zmin=0, zmax=2, colorscale=band, showscale=False, customdata=names,
                             y=["modality"], hovertemplate="position %{x}: %{customdata}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=z, y=[label for label, _ in runs], zmin=0, zmax=1, colorscale=KEEP_SCALE,
                             colorbar=dict(title="kept", y=0.44, len=0.85),
                             hovertemplate="%{y}, position %{x}: %{z:.2f} kept<extra></extra>"), row=2, col=1)
    fig.update_xaxes(title_text="prompt position (text · image · video)", row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    return _style(fig, "Kept per token (share of layers × heads)", height=160 + 38 * len(runs))
