"""The text side of a trace: a strip of prompt tokens coloured kept/evicted, and the list of merges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .overlay import token_fractions

__all__ = ["strip_label", "token_strip", "describe_position", "merge_rows"]

_NAMES = {1: "image", 2: "video"}


def strip_label(kept: float, merged: float) -> str:
    """Category of a token (or a collapsed image/video) from its kept and merged fractions."""
    if kept >= 1.0 - 1e-9:
        return "kept"
    if merged > 0 and merged >= kept:
        return "merged into a kept token"
    if kept <= 1e-9:
        return "evicted"
    return "kept by most layers/heads" if kept >= 0.5 else "kept by few layers/heads"


def _clean(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "⇥") or "∅"


def token_strip(
    trace: Any,
    tokens: Sequence[str],
    layer: int | None = None,
    head: int | None = None,
    max_items: int = 2000,
    present: bool = False,
) -> list[tuple[str, str | None]]:
    """``(text, category)`` pairs for ``gr.HighlightedText``: every text token, and one chip per image /
    video frame ("[image 1 · 64 tokens · 25% kept]") so the strip stays readable. Categories are the
    keys of :data:`viz.colors.STRIP_COLORS`. ``present``: shorter chips ("[image 1 · 25% kept]").
    """
    fr = token_fractions(trace, layer, head)
    modality = trace.modality
    length = len(fr.kept)
    mods = np.zeros(length, dtype=np.int64)
    items = np.full(length, -1, dtype=np.int64)
    if modality is not None:
        n = min(len(modality), length)
        mods[:n] = np.asarray(modality.modality)[:n]
        items[:n] = np.asarray(modality.item)[:n]
    out: list[tuple[str, str | None]] = []
    p = 0
    while p < length and len(out) < max_items:
        if mods[p] != 0 and items[p] >= 0:
            index = int(items[p])
            q = p
            while q < length and items[q] == index:
                q += 1
            k = float(fr.kept[p:q].mean())
            m = float(fr.merged[p:q].mean())
            it = modality.items[index]
            where = f"{_NAMES.get(int(it.modality), 'visual')} {it.source + 1}"
            if int(it.modality) == 2:
                where += f" · frames group {it.frame + 1}"
            if it.tile not in ("full", "", None):
                where += f" · {it.tile}"
            count = "" if present else f" · {q - p} tokens"
            out.append((f"[{where}{count} · {100 * k:.0f}% kept]", strip_label(k, m)))
            p = q
            continue
        text = _clean(tokens[p]) if p < len(tokens) else f"<{p}>"
        label = "question (not compressed)" if p >= fr.span else strip_label(float(fr.kept[p]), float(fr.merged[p]))
        out.append((text, label))
        p += 1
    if p < length:
        out.append((f"… {length - p} more tokens", None))
    return out


def describe_position(trace: Any, position: int, tokens: Sequence[str] = ()) -> str:
    """Human-readable provenance of one prompt position."""
    modality = trace.modality
    if modality is not None and position < len(modality) and int(modality.item[position]) >= 0:
        it = modality.items[int(modality.item[position])]
        r, c = int(modality.row[position]), int(modality.col[position])
        name = f"{_NAMES.get(int(it.modality), 'visual')} {it.source + 1}"
        if int(it.modality) == 2:
            name += f" group {it.frame + 1}"
        cell = f" cell (r{r}, c{c})" if r >= 0 else " separator"
        return f"#{position} {name}{cell}"
    text = _clean(tokens[position]) if position < len(tokens) else "?"
    return f"#{position} text {text!r}"


def merge_rows(
    trace: Any, tokens: Sequence[str] = (), layer: int | None = None, head: int | None = None, limit: int = 500
) -> list[dict[str, Any]]:
    """One row per merge: which evicted token (source) a kept token (target) absorbed, with similarity."""
    rows: list[dict[str, Any]] = []
    for lt in trace.layers:
        if layer is not None and lt.layer != int(layer) or not lt.merges:
            continue
        for h, m in enumerate(lt.merges):
            if head is not None and h != int(head) or not m:
                continue
            sims = m.get("similarity") or [None] * len(m.get("source", []))
            for s, t, sim in zip(m.get("source", []), m.get("target", []), sims):
                rows.append(
                    {
                        "layer": lt.layer,
                        "kv_head": h,
                        "absorbed (evicted)": describe_position(trace, int(s), tokens),
                        "into (kept)": describe_position(trace, int(t), tokens),
                        "similarity": None if sim is None else round(float(sim), 4),
                    }
                )
                if len(rows) >= limit:
                    return rows
    return rows
