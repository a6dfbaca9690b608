"""Show what a method kept, evicted or merged on the pixels each token came from.

Every visual token has a cell ``(row, col)`` in its image's (or video frame's, or tile's) token grid
(:class:`mmkv.ModalityMap`). The picture keeps its own colours where the cache kept the tokens (a red
ball stays red), so the audience reads the image first and the compression second:

- kept cells: untouched pixels, with a dark-blue contour around each kept region;
- evicted cells: faded to a light grey ghost and hatched in vermillion;
- merged cells (evicted, folded into a kept token): faded and dotted in yellow; for one layer and
  head, white lines run from each merged cell to the kept cell that absorbed it.

For "all layers" / "all heads" a cell kept by a share ``k`` of the (layer, head) pairs is ``k`` parts
original and ``1 - k`` parts evicted look (so colour and contrast grow with ``k``), and a half-size
map on the right gives the share per cell on a labelled 0–100 % scale (:data:`viz.colors.KEEP_SCALE`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from .colors import EVICTED, KEEP_SCALE, KEPT, MERGED, Style

__all__ = [
    "TokenFractions",
    "Panel",
    "with_title",
    "token_fractions",
    "cell_grid",
    "cell_box",
    "paint_cells",
    "overlay_panels",
    "video_frame_groups",
]

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


_LUMA = np.array([0.299, 0.587, 0.114])
_DARK = np.array([34.0, 34.0, 34.0])


def _faded(region: np.ndarray, strength: float) -> np.ndarray:
    """Greyscale, low-contrast, light "ghost" of the pixels (L* roughly 55-85), mixed in by ``strength``."""
    ghost = 170.0 + 0.35 * (region @ _LUMA - 128.0)
    amount = math.sqrt(strength)  # 0.5 already fades ~70 %: evicted reads as gone, the shapes stay visible
    return (1.0 - amount) * region + amount * ghost[..., None]


def _patterns(
    x0: int, y0: int, x1: int, y1: int, spacing: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks in image coordinates (so patterns run on across cells): diagonal hatch, dot rims, dot centres."""
    ys, xs = np.mgrid[y0:y1, x0:x1]
    hatch = ((xs + ys) % spacing) < width
    size = 4 if width < 2 else 6
    dx, dy = (xs + spacing // 2) % spacing, (ys + spacing // 2) % spacing
    dot = (dx < size) & (dy < size)
    centre = (dx >= 1) & (dx < size - 1) & (dy >= 1) & (dy < size - 1)
    return hatch, dot & ~centre, centre


def paint_cells(
    pixels: np.ndarray,
    kept: np.ndarray,
    merged: np.ndarray,
    box: tuple[int, int, int, int] | None = None,
    alpha: float = 0.6,
    grid_lines: bool = True,
    *,
    present: bool | Style = False,
) -> np.ndarray:
    """Paint ``kept``/``merged`` fraction grids (``[rows, cols]``, NaN = no token) over ``box`` of ``pixels``.

    ``pixels`` (``[H, W, 3]`` float) is painted in place and returned. A cell kept by every selected
    (layer, head) pair keeps its pixels; otherwise it is ``k·pixels + m·merged look + (1-k-m)·evicted
    look``, where both looks fade the pixels to a light grey by ``alpha`` (the strength) and add a
    pattern: vermillion hatch (evicted) or yellow dots with a dark rim (merged). Fully kept cells get a
    dark-blue contour where they border cells that are not; grid lines only cross cells that are not kept.
    """
    st = Style.of(present)
    strength = min(max(float(alpha), 0.0), 1.0)
    opacity = min(1.0, 2.0 * strength)
    h, w = pixels.shape[:2]
    box = box or (0, 0, w, h)
    rows, cols = kept.shape
    full = np.zeros((rows, cols), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            if math.isnan(kept[r, c]):
                continue
            k = min(max(float(kept[r, c]), 0.0), 1.0)
            m = 0.0 if math.isnan(merged[r, c]) else min(max(float(merged[r, c]), 0.0), 1.0 - k)
            if k >= 1.0 - 1e-9:
                full[r, c] = True
                continue
            x0, y0, x1, y1 = cell_box(rows, cols, r, c, box)
            if x1 <= x0 or y1 <= y0:
                continue
            region = pixels[y0:y1, x0:x1]
            src = region.copy()
            hatch, rim, dot = _patterns(x0, y0, x1, y1, st.hatch, max(1, st.outline // 2))
            ghost = _faded(src, strength)
            out = k * src
            if 1.0 - k - m > 1e-9:
                look = ghost.copy()
                look[hatch] = (1 - opacity) * look[hatch] + opacity * np.asarray(EVICTED, float)
                out = out + (1.0 - k - m) * look
            if m > 1e-9:
                look = ghost.copy()
                look[rim] = (1 - opacity) * look[rim] + opacity * _DARK
                look[dot] = (1 - opacity) * look[dot] + opacity * np.asarray(MERGED, float)
                out = out + m * look
            region[:] = out
            if grid_lines and (x1 - x0) >= 6 and (y1 - y0) >= 6:
                region[0, :] *= 0.8
                region[:, 0] *= 0.8
    _contour(pixels, kept, full, box, st.outline)
    return pixels


def _contour(
    pixels: np.ndarray, kept: np.ndarray, full: np.ndarray, box: tuple[int, int, int, int], width: int
) -> None:
    """Kept-colour bands inside fully kept cells, along the edges they share with cells that are not."""
    rows, cols = kept.shape
    colour = np.asarray(KEPT, float)
    for r, c in zip(*np.nonzero(full)):
        x0, y0, x1, y1 = cell_box(rows, cols, r, c, box)
        t = max(1, min(width, (x1 - x0) // 3, (y1 - y0) // 3))
        for dr, dc, band in (
            (-1, 0, (slice(y0, y0 + t), slice(x0, x1))),
            (1, 0, (slice(y1 - t, y1), slice(x0, x1))),
            (0, -1, (slice(y0, y1), slice(x0, x0 + t))),
            (0, 1, (slice(y0, y1), slice(x1 - t, x1))),
        ):
            rr, cc = r + dr, c + dc
            if 0 <= rr < rows and 0 <= cc < cols and not math.isnan(kept[rr, cc]) and not full[rr, cc]:
                pixels[band] = colour


def _outline_cells(
    pixels: np.ndarray, grid: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int], width: int
) -> None:
    """A box in ``colour`` just inside every cell whose value is > 0."""
    rows, cols = grid.shape
    rgb = np.asarray(colour, float)
    for r, c in zip(*np.nonzero(np.nan_to_num(grid, nan=0.0) > 0)):
        x0, y0, x1, y1 = cell_box(rows, cols, r, c, box)
        t = max(1, min(width, (x1 - x0) // 3, (y1 - y0) // 3))
        for band in (
            (slice(y0, y0 + t), slice(x0, x1)),
            (slice(y1 - t, y1), slice(x0, x1)),
            (slice(y0, y1), slice(x0, x0 + t)),
            (slice(y0, y1), slice(x1 - t, x1)),
        ):
            pixels[band] = rgb


def with_title(img: Image.Image, title: str, present: bool | Style = False) -> Image.Image:
    """``img`` under a white band holding ``title`` (wrapped): a caption that never covers the cells."""
    st = Style.of(present)
    size = max(st.label + 2, img.width // 20)  # the gallery shrinks panels: the text scales with the picture
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(img)
    title = title.replace(" — ", ", ")  # the built-in font has no dashes
    words, lines, line = title.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and probe.textbbox((0, 0), trial, font=font)[2] > img.width - 8:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    band = len(lines) * (size + 4) + 6
    canvas = Image.new("RGB", (img.width, img.height + band), (255, 255, 255))
    canvas.paste(img.convert("RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((4, 3 + i * (size + 4)), text, fill=(0, 0, 0), font=font)
    return canvas


def _scale_rgb(value: float) -> tuple[int, int, int]:
    """Colour of ``value`` in [0, 1] on :data:`KEEP_SCALE` (linear between its stops)."""
    value = min(max(float(value), 0.0), 1.0)
    stops = [(float(p), np.asarray(ImageColor.getrgb(c), float)) for p, c in KEEP_SCALE]
    for (p0, c0), (p1, c1) in zip(stops, stops[1:]):
        if value <= p1:
            t = 0.0 if p1 == p0 else (value - p0) / (p1 - p0)
            r, g, b = (int(round(v)) for v in (1 - t) * c0 + t * c1)
            return r, g, b
    r, g, b = (int(v) for v in stops[-1][1])
    return r, g, b


def _state_map(img: Image.Image, grids: list[tuple[np.ndarray, tuple[int, int, int, int]]], st: Style) -> Image.Image:
    """``img`` with a half-size map of the kept share per cell on its right, over a labelled colour bar."""
    w, h = img.size
    font = ImageFont.load_default(size=st.label)
    gap = max(6, st.label // 2)
    mw, mh = max(8, round(w / 2)), max(8, round(h / 2))
    lines = ["share of layers and heads", "that kept the cell"]
    probe = ImageDraw.Draw(img)
    text_w = int(max(probe.textbbox((0, 0), t, font=font)[2] for t in lines + ["0%   50%   100%"]))
    col_w = max(mw, text_w)
    bar_h = max(8, st.label)
    need = mh + gap + bar_h + 2 + (len(lines) + 1) * (st.label + 4)
    canvas = Image.new("RGB", (w + gap + col_w, max(h, need)), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    ox = w + gap
    for grid, (bx0, by0, bx1, by1) in grids:
        rows, cols = grid.shape
        sub = (ox + round(bx0 / 2), round(by0 / 2), ox + round(bx1 / 2), round(by1 / 2))
        for r in range(rows):
            for c in range(cols):
                if math.isnan(grid[r, c]):
                    continue
                x0, y0, x1, y1 = cell_box(rows, cols, r, c, sub)
                if x1 > x0 and y1 > y0:
                    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=_scale_rgb(grid[r, c]))
    y = mh + gap
    for x in range(mw):
        draw.line([(ox + x, y), (ox + x, y + bar_h - 1)], fill=_scale_rgb(x / max(1, mw - 1)))
    y += bar_h + 2
    for text, anchor, x in (("0%", "la", ox), ("50%", "ma", ox + mw // 2), ("100%", "ra", ox + mw)):
        draw.text((x, y), text, fill=(0, 0, 0), font=font, anchor=anchor)
    for line in lines:
        y += st.label + 4
        draw.text((ox, y), line, fill=(0, 0, 0), font=font)
    return canvas


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
    return img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def _panel_items(modality: Any) -> dict[tuple[int, int, int, str], list[int]]:
    """Group visual items into panels: (modality, source, frame, kind) -> item indices."""
    groups: dict[tuple[int, int, int, str], list[int]] = {}
    for index, item in enumerate(modality.items):
        kind = "tiles" if _TILE.match(item.tile or "") else (item.tile or "full")
        groups.setdefault((int(item.modality), int(item.source), int(item.frame), kind), []).append(index)
    return groups


def _tile_cell(tile: str) -> tuple[int, ...]:
    """``(row, col)`` of a tile name ``"r<row>c<col>"``."""
    match = _TILE.match(tile)
    assert match is not None, f"not a tile name: {tile!r}"
    return tuple(int(x) for x in match.groups())


def _boxes(modality: Any, indices: list[int], kind: str, w: int, h: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    if kind != "tiles":
        return [(i, (0, 0, w, h)) for i in indices]
    spots = {i: _tile_cell(modality.items[i].tile) for i in indices}
    n_rows = max(r for r, _ in spots.values()) + 1
    n_cols = max(c for _, c in spots.values()) + 1
    out = []
    for i, (r, c) in spots.items():
        out.append(
            (
                i,
                (
                    round(c * w / n_cols),
                    round(r * h / n_rows),
                    round((c + 1) * w / n_cols),
                    round((r + 1) * h / n_rows),
                ),
            )
        )
    return out


def overlay_panels(
    trace: Any,
    images: Sequence[Image.Image] = (),
    videos: Sequence[Any] = (),
    layer: int | None = None,
    head: int | None = None,
    *,
    alpha: float = 0.6,
    min_side: int = 224,
    max_side: int = 640,
    grid_lines: bool = True,
    draw_merges: bool = True,
    max_frames: int | None = None,
    state_map: bool | None = None,
    present: bool | Style = False,
    fractions: TokenFractions | None = None,
    outlines: Sequence[tuple[np.ndarray, tuple[int, int, int]]] = (),
) -> list[Panel]:
    """One painted panel per image (and tile layout) and per sampled video frame, in prompt order.

    ``images`` are the chat's images (``PreparedInputs.images``); ``videos`` its sampled videos
    (``PreparedInputs.videos``, objects with ``.frames`` and ``.timestamps``). A video's temporal token
    group ``g`` covers several sampled frames (Qwen: 2); each of those frames is painted with group
    ``g``'s cells. ``alpha`` is the strength of the evicted/merged fade (0 = patterns only barely, 1 =
    full ghost); kept cells never change. ``state_map`` (default: on when more than one (layer, head)
    pair is aggregated) adds the side map of kept shares. ``present`` (or a :class:`Style`): thicker
    contours and patterns, larger labels, panels at least ``Style.min_side`` pixels. ``fractions``
    replaces the trace's kept / merged shares (the decode replay paints a step's cache this way);
    ``outlines``: ``(per-position values, colour)`` pairs: cells with a value > 0 get a box in that colour.
    """
    st = Style.of(present)
    min_side = max(min_side, st.min_side) if st.present else min_side
    max_side = max(max_side, 2 * min_side)
    modality = trace.modality
    if modality is None or not modality.items:
        return []
    fr = fractions if fractions is not None else token_fractions(trace, layer, head)
    side_map = fr.pairs > 1 if state_map is None else bool(state_map)
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
            bases = [
                (frames[f], f, f"video {source + 1} · frame {f + 1} · {stamps[f]:.2f}s (token group {frame + 1})")
                for f in chosen
            ]
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
            grids = []
            for index, box in _boxes(modality, indices, kind, w, h):
                kg = cell_grid(modality, index, fr.kept)
                mg = cell_grid(modality, index, fr.merged)
                paint_cells(pixels, kg, mg, box, alpha=alpha, grid_lines=grid_lines, present=st)
                for values, colour in outlines:
                    _outline_cells(pixels, cell_grid(modality, index, values), box, colour, st.outline + 1)
                kept_vals.extend(kg[~np.isnan(kg)].tolist())
                grids.append((kg, box))
                if merge_pairs:
                    centres.update(_centres(modality, index, box))
            out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            if merge_pairs and centres:
                _draw_merges(out, merge_pairs, centres, st.outline)
            if side_map:
                out = _state_map(out, grids, st)
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


def _draw_merges(
    img: Image.Image, pairs: list[tuple[int, int]], centres: dict[int, tuple[float, float]], width: int = 2
) -> None:
    """White line from each merged cell to the kept cell that absorbed it; a yellow dot on the kept end."""
    draw = ImageDraw.Draw(img)
    r = 1.5 * width
    for s, t in pairs:
        if s in centres and t in centres:
            (x0, y0), (x1, y1) = centres[s], centres[t]
            draw.line([(x0, y0), (x1, y1)], fill=(255, 255, 255), width=width)
            draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=MERGED, outline=(34, 34, 34), width=max(1, width // 2))
