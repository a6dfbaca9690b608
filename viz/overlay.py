"""Paint what a method kept, evicted or merged back onto the pixels each token came from.

Every visual token has a cell ``(row, col)`` in its image's (or video frame's, or tile's) token grid
(:class:`mmkv.ModalityMap`). For a chosen layer and KV head a cell is kept, evicted, or merged into a
kept token; for "all layers" / "all heads" the cell shows the *fraction* of selected (layer, head)
pairs that kept it. The cell colour is the mix ``k·KEPT + m·MERGED + (1-k-m)·EVICTED`` (k = kept
fraction, m = merged fraction), blended over the pixels with ``alpha`` — so a single layer and head
paints pure colours and aggregates paint in between.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .colors import EVICTED, KEPT, MERGED

__all__ = ["TokenFractions", "Panel", "token_fractions", "cell_grid", "paint_cells", "overlay_panels", "video_frame_groups"]

IMAGE, VIDEO = 1, 2
_TILE = re.compile(r"^r(\d+)c(\d+)$")


@dataclass
class TokenFractions:
    """Per prompt position: share of selected (layer, KV head) pairs that kept / merged it."""

    kept: np.ndarray  # float [L]
    merged: np.ndarray  # float [L]
    span: int  # positions >= span were not compressed (the question in query-agnostic mode)
    pairs: int  # number of (layer, head) pairs aggregated


def _select(n: int, which: int | None, what: str) -> list[int]:
    if which is None:
        return list(range(n))
    if not 0 <= int(which) < n:
        raise ValueError(f"{what} {which} is out of range: the trace has {n}")
    return [int(which)]


def token_fractions(trace: Any, layer: int | None = None, head: int | None = None) -> TokenFractions:
    """Kept and merged fractions per position over the chosen layer(s) and KV head(s) (None = all)."""
    length = max(int(trace.prompt_length), int(trace.span_length))
    layers = [lt for lt in trace.layers if layer is None or lt.layer == int(layer)]
    if layer is not None and not layers:
        raise ValueError(f"layer {layer} is out of range: the trace has {trace.num_layers} layers")
    kept = np.zeros(length, dtype=np.float64)
    merged = np.zeros(length, dtype=np.float64)
    pairs = 0
    for lt in layers:
        for h in _select(len(lt.kept), head, "KV head"):
            pairs += 1
            k = np.asarray(lt.kept[h], dtype=np.int64)
            kept[k[(k >= 0) & (k < length)]] += 1
            if lt.merges and h < len(lt.merges) and lt.merges[h]:
                src = np.asarray(lt.merges[h].get("source", []), dtype=np.int64)
                src = src[(src >= 0) & (src < length)]
                hit = np.zeros(length, dtype=bool)
                hit[src] = True
                if k.size:
                    hit[k[(k >= 0) & (k < length)]] = False  # a kept token is never "merged away"
                merged[hit] += 1
    span = int(trace.span_length)
    if pairs:
        kept /= pairs
        merged /= pairs
    kept[span:] = 1.0  # not compressed: stays
    merged[span:] = 0.0
    return TokenFractions(kept=kept, merged=merged, span=span, pairs=pairs)


def cell_grid(modality: Any, item_index: int, values: np.ndarray) -> np.ndarray:
    """``[rows, cols]`` grid of ``values`` (per prompt position) for one visual item; NaN where no token."""
    item = modality.items[item_index]
    grid = np.full((item.rows, item.cols), np.nan, dtype=np.float64)
    items = np.asarray(modality.item)
    rows = np.asarray(modality.row)
    cols = np.asarray(modality.col)
    pos = np.nonzero((items == item_index) & (rows >= 0) & (cols >= 0))[0]
    pos = pos[pos < len(values)]
    grid[rows[pos], cols[pos]] = values[pos]
    return grid


def _mix(k: float, m: float) -> np.ndarray:
    k = min(max(k, 0.0), 1.0)
    m = min(max(m, 0.0), 1.0 - k)
    return k * np.asarray(KEPT, float) + m * np.asarray(MERGED, float) + (1.0 - k - m) * np.asarray(EVICTED, float)


def cell_box(rows: int, cols: int, r: int, c: int, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) of cell ``(r, c)`` of a grid laid over ``box``."""
    bx0, by0, bx1, by1 = box
    w, h = bx1 - bx0, by1 - by0
    return (
        bx0 + round(c * w / cols),
        by0 + round(r * h / rows),
        bx0 + round((c + 1) * w / cols),
        by0 + round((r + 1) * h / rows),
    )


def paint_cells(
    pixels: np.ndarray,
    kept: np.ndarray,
    merged: np.ndarray,
    box: tuple[int, int, int, int] | None = None,
    alpha: float = 0.5,
    grid_lines: bool = True,
) -> np.ndarray:
    """Blend the cell colours of ``kept``/``merged`` grids (``[rows, cols]``, NaN = no token) over ``box``.

    ``pixels`` is an ``[H, W, 3]`` float array, painted in place and returned. Grid lines darken the
    first pixel row/column of each cell (never the cell centre).
    """
    h, w = pixels.shape[:2]
    box = box or (0, 0, w, h)
    rows, cols = kept.shape
    for r in range(rows):
        for c in range(cols):
            if math.isnan(kept[r, c]):
                continue
            x0, y0, x1, y1 = cell_box(rows, cols, r, c, box)
            if x1 <= x0 or y1 <= y0:
                continue
            colour = _mix(float(kept[r, c]), float(0.0 if math.isnan(merged[r, c]) else merged[r, c]))
            region = pixels[y0:y1, x0:x1]
            region[:] = (1.0 - alpha) * region + alpha * colour
            if grid_lines and (x1 - x0) >= 6 and (y1 - y0) >= 6:
                region[0, :] *= 0.6
                region[:, 0] *= 0.6
    return pixels


@dataclass
class Panel:
    """One painted picture: an image, a video frame, or a tile layout, with a caption."""

    image: Image.Image
    caption: str
    modality: int  # IMAGE or VIDEO
    source: int  # image index, or video index
    frame: int  # sampled frame index within the video (0 for images)
    kept_fraction: float  # mean kept fraction over the panel's cells


def video_frame_groups(num_frames: int, num_groups: int) -> list[range]:
    """Which sampled frames each temporal token group covers (e.g. Qwen's 2 frames per group)."""
    if num_groups <= 0:
        return []
    per = max(1, math.ceil(num_frames / num_groups))
    return [range(min(g * per, num_frames), min((g + 1) * per, num_frames)) for g in range(num_groups)]


def _display(img: Image.Image, min_side: int, max_side: int) -> Image.Image:
    img = img.convert("RGB")
    w, h = img.size
    scale = 1.0
    if min(w, h) < min_side:
        scale = min_side / min(w, h)
    if max(w, h) * scale > max_side:
        scale = max_side / max(w, h)
    if abs(scale - 1.0) < 1e-6:
        return img.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)


def _panel_items(modality: Any) -> dict[tuple[int, int, int, str], list[int]]:
    """Group visual items into panels: (modality, source, frame, kind) -> item indices."""
    groups: dict[tuple[int, int, int, str], list[int]] = {}
    for index, item in enumerate(modality.items):
        kind = "tiles" if _TILE.match(item.tile or "") else (item.tile or "full")
        groups.setdefault((int(item.modality), int(item.source), int(item.frame), kind), []).append(index)
    return groups


def _boxes(modality: Any, indices: list[int], kind: str, w: int, h: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    if kind != "tiles":
        return [(i, (0, 0, w, h)) for i in indices]
    spots = {i: tuple(int(x) for x in _TILE.match(modality.items[i].tile).groups()) for i in indices}
    n_rows = max(r for r, _ in spots.values()) + 1
    n_cols = max(c for _, c in spots.values()) + 1
    out = []
    for i, (r, c) in spots.items():
        out.append((i, (round(c * w / n_cols), round(r * h / n_rows), round((c + 1) * w / n_cols), round((r + 1) * h / n_rows))))
    return out


def overlay_panels(
    trace: Any,
    images: Sequence[Image.Image] = (),
    videos: Sequence[Any] = (),
    layer: int | None = None,
    head: int | None = None,
    *,
    alpha: float = 0.5,
    min_side: int = 224,
    max_side: int = 640,
    grid_lines: bool = True,
    draw_merges: bool = True,
    max_frames: int | None = None,
) -> list[Panel]:
    """One painted panel per image (and tile layout) and per sampled video frame, in prompt order.

    ``images`` are the chat's images (``PreparedInputs.images``); ``videos`` its sampled videos
    (``PreparedInputs.videos``, objects with ``.frames`` and ``.timestamps``). A video's temporal token
    group ``g`` covers several sampled frames (Qwen: 2); each of those frames is painted with group
    ``g``'s cells. Merges (single layer and head) are drawn as lines from the absorbed cell to the
    kept cell that absorbed it, when both lie in the same panel.
    """
    modality = trace.modality
    if modality is None or not modality.items:
        return []
    fr = token_fractions(trace, layer, head)
    groups = _panel_items(modality)
    n_groups: dict[int, int] = {}
    for item in modality.items:
        if int(item.modality) == VIDEO:
            n_groups[int(item.source)] = max(n_groups.get(int(item.source), 0), int(item.frame) + 1)
    merge_pairs = _merge_pairs(trace, layer, head) if draw_merges else []
    panels: list[Panel] = []
    for (mod, source, frame, kind), indices in sorted(groups.items(), key=lambda kv: modality.items[kv[1][0]].start):
        if mod == IMAGE:
            if source >= len(images):
                continue
            bases = [(images[source], 0, f"image {source + 1}")]
        else:
            if source >= len(videos):
                continue
            video = videos[source]
            frames = list(getattr(video, "frames", video))
            stamps = list(getattr(video, "timestamps", [])) or [float(i) for i in range(len(frames))]
            span = video_frame_groups(len(frames), n_groups.get(source, 1))
            chosen = span[frame] if frame < len(span) else range(0)
            bases = [(frames[f], f, f"video {source + 1} · frame {f + 1} · {stamps[f]:.2f}s (token group {frame + 1})")
                     for f in chosen]
        if kind != "full":
            suffix = " · tiles" if kind == "tiles" else f" · {kind} view"
        else:
            suffix = ""
        for base, f, caption in bases:
            img = _display(base, min_side, max_side)
            w, h = img.size
            pixels = np.asarray(img, dtype=np.float64).copy()
            kept_vals: list[float] = []
            centres: dict[int, tuple[float, float]] = {}
            for index, box in _boxes(modality, indices, kind, w, h):
                kg = cell_grid(modality, index, fr.kept)
                mg = cell_grid(modality, index, fr.merged)
                paint_cells(pixels, kg, mg, box, alpha=alpha, grid_lines=grid_lines)
                kept_vals.extend(kg[~np.isnan(kg)].tolist())
                if merge_pairs:
                    centres.update(_centres(modality, index, box))
            out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            if merge_pairs and centres:
                _draw_merges(out, merge_pairs, centres)
            frac = float(np.mean(kept_vals)) if kept_vals else 1.0
            panels.append(Panel(out, f"{caption}{suffix} — {100 * frac:.0f}% kept", mod, source, f, frac))
            if max_frames is not None and mod == VIDEO and sum(p.modality == VIDEO for p in panels) >= max_frames:
                break
    return panels


def _merge_pairs(trace: Any, layer: int | None, head: int | None) -> list[tuple[int, int]]:
    if layer is None or head is None:
        return []
    for lt in trace.layers:
        if lt.layer == int(layer) and lt.merges and int(head) < len(lt.merges) and lt.merges[int(head)]:
            m = lt.merges[int(head)]
            return list(zip(m.get("source", []), m.get("target", [])))
    return []


def _centres(modality: Any, index: int, box: tuple[int, int, int, int]) -> dict[int, tuple[float, float]]:
    item = modality.items[index]
    items = np.asarray(modality.item)
    rows = np.asarray(modality.row)
    cols = np.asarray(modality.col)
    out = {}
    for p in np.nonzero((items == index) & (rows >= 0))[0].tolist():
        x0, y0, x1, y1 = cell_box(item.rows, item.cols, int(rows[p]), int(cols[p]), box)
        out[p] = ((x0 + x1) / 2, (y0 + y1) / 2)
    return out


def _draw_merges(img: Image.Image, pairs: list[tuple[int, int]], centres: dict[int, tuple[float, float]]) -> None:
    draw = ImageDraw.Draw(img)
    for s, t in pairs:
        if s in centres and t in centres:
            (x0, y0), (x1, y1) = centres[s], centres[t]
            draw.line([(x0, y0), (x1, y1)], fill=(255, 255, 255), width=2)
            draw.ellipse([x1 - 3, y1 - 3, x1 + 3, y1 + 3], fill=MERGED, outline=(255, 255, 255))
