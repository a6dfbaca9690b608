"""viz/: figure shapes and colour scales, and that planted kept sets paint exactly their patch cells."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import viz
from mmkv.inputs.modality import IMAGE, VIDEO, ModalityMap, grid_item
from mmkv.models.base import VideoFrames
from mmkv.trace.core import LayerTrace, Trace
from viz.overlay import cell_box

# A toy prompt: 3 text | image 0 as a 4x4 grid | 2 text | video 0: 2 token groups of 2x3 | 5 text
IMG_START, IMG_ROWS, IMG_COLS = 3, 4, 4
VID_STARTS, VID_ROWS, VID_COLS = (21, 27), 2, 3
LENGTH = 38


def _modality() -> ModalityMap:
    parts = [grid_item(IMAGE, 0, 0, IMG_ROWS, IMG_COLS, IMG_START)]
    parts += [grid_item(VIDEO, 0, g, VID_ROWS, VID_COLS, s) for g, s in enumerate(VID_STARTS)]
    return ModalityMap.from_items(LENGTH, [p[0] for p in parts], [p[1] for p in parts])


def img_pos(r: int, c: int) -> int:
    return IMG_START + r * IMG_COLS + c


def vid_pos(group: int, r: int, c: int) -> int:
    return VID_STARTS[group] + r * VID_COLS + c


def _trace(kept: dict[tuple[int, int], list[int]], merges=None, info=None, span: int = LENGTH, mass=True) -> Trace:
    layers = []
    for layer in range(2):
        layers.append(
            LayerTrace(
                layer=layer,
                kept=[sorted(kept.get((layer, h), [])) for h in range(2)],
                bytes_before=LENGTH * 2 * 64,
                bytes_after=sum(len(kept.get((layer, h), [])) for h in range(2)) * 64,
                merges=(merges or {}).get(layer),
                info=(info or {}).get(layer, {}),
                modality_mass=[[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]] if mass else None,
                entropy=[1.0 + layer, 1.5, 2.0, 2.5] if mass else None,
            )
        )
    return Trace(
        method="planted",
        params={},
        budget=0.3,
        capacity=10,
        query_aware=span == LENGTH,
        prompt_length=LENGTH,
        span_length=span,
        num_layers=2,
        num_kv_heads=2,
        num_q_heads=4,
        head_dim=16,
        bytes_per_token_head=64,
        modality=_modality() if span == LENGTH else _modality().prefix(span),
        layers=layers,
    )


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _media():
    image = _noise(64, 48, 0)
    frames = [_noise(60, 40, 1 + i) for i in range(4)]  # 4 sampled frames, 2 per token group
    return [image], [VideoFrames(frames=frames, timestamps=[0.0, 0.5, 1.0, 1.5], fps=2.0)]


def _cells(img: Image.Image, rows: int, cols: int, size: tuple[int, int] | None = None):
    """(r, c) -> pixel block of each cell of a rows x cols grid laid over the image (or its top-left ``size``)."""
    px = np.asarray(img)
    box = (0, 0, *(size or img.size))
    out = {}
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = cell_box(rows, cols, r, c, box)
            out[(r, c)] = px[y0:y1, x0:x1]
    return out


def _states(painted: Image.Image, source: Image.Image, rows: int, cols: int, margin: int = 2) -> dict:
    """Read each cell back: 'kept' (pixels inside a contour margin equal the source's), 'evicted'
    (vermillion hatch, no yellow), 'merged' (yellow dots, no hatch), '?' otherwise."""
    src = _cells(source.resize(painted.size, Image.NEAREST) if source.size != painted.size else source, rows, cols)
    out = {}
    for key, block in _cells(painted, rows, cols).items():
        colours = {tuple(int(v) for v in p) for p in block.reshape(-1, 3)}
        inner, want = block[margin:-margin, margin:-margin], src[key][margin:-margin, margin:-margin]
        if np.array_equal(inner, want):
            out[key] = "kept"
        elif viz.EVICTED in colours and viz.MERGED not in colours:
            out[key] = "evicted"
        elif viz.MERGED in colours and viz.EVICTED not in colours:
            out[key] = "merged"
        else:
            out[key] = "?"
    return out


PAINT = dict(alpha=1.0, grid_lines=False, min_side=1, max_side=10_000, draw_merges=False)


def test_planted_kept_set_keeps_exactly_those_cells_in_their_own_colours_on_the_image_and_the_right_frames():
    image_cells = {(0, 0), (1, 2), (3, 3)}
    video_cells = {(1, 1)}  # group 1 only -> sampled frames 3 and 4
    kept = [img_pos(r, c) for r, c in image_cells] + [vid_pos(1, r, c) for r, c in video_cells] + [0, 1, 37]
    trace = _trace({(0, 0): kept})
    images, videos = _media()
    panels = viz.overlay_panels(trace, images, videos, layer=0, head=0, **PAINT)
    assert [(p.modality, p.source, p.frame) for p in panels] == [
        (IMAGE, 0, 0),
        (VIDEO, 0, 0),
        (VIDEO, 0, 1),
        (VIDEO, 0, 2),
        (VIDEO, 0, 3),
    ]
    assert panels[0].image.size == (64, 48) and panels[1].image.size == (60, 40)  # one (layer, head): no side map
    states = _states(panels[0].image, images[0], IMG_ROWS, IMG_COLS)
    assert states == {
        (r, c): "kept" if (r, c) in image_cells else "evicted" for r in range(IMG_ROWS) for c in range(IMG_COLS)
    }
    for panel in panels[1:]:
        group = 0 if panel.frame < 2 else 1
        states = _states(panel.image, videos[0].frames[panel.frame], VID_ROWS, VID_COLS)
        for (r, c), state in states.items():
            assert state == ("kept" if group == 1 and (r, c) in video_cells else "evicted"), (panel.frame, r, c)
    # kept regions get a kept-colour contour where they border evicted cells (cell (0, 0): right and bottom edges)
    block = _cells(panels[0].image, IMG_ROWS, IMG_COLS)[(0, 0)]
    assert {tuple(p) for p in block[:, -1]} == {viz.KEPT} and {tuple(p) for p in block[-1, :]} == {viz.KEPT}
    assert panels[0].kept_fraction == pytest.approx(3 / 16)
    assert "frame 3" in panels[3].caption and "token group 2" in panels[3].caption


def test_other_head_and_layer_selection_keep_nothing():
    trace = _trace({(0, 0): [img_pos(0, 0)]})
    images, videos = _media()
    panels = viz.overlay_panels(trace, images, videos, layer=1, head=1, **PAINT)
    assert set(_states(panels[0].image, images[0], IMG_ROWS, IMG_COLS).values()) == {"evicted"}


def test_strength_fades_evicted_cells_more_and_never_touches_kept_ones():
    trace = _trace({(0, 0): [img_pos(0, 0)]})
    images, videos = _media()
    src = _cells(images[0], IMG_ROWS, IMG_COLS)
    dist = []
    for strength in (0.2, 0.5, 0.9):
        panel = viz.overlay_panels(trace, images, videos, layer=0, head=0, **{**PAINT, "alpha": strength})[0]
        cells = _cells(panel.image, IMG_ROWS, IMG_COLS)
        assert np.array_equal(cells[(0, 0)][:-2, :-2], src[(0, 0)][:-2, :-2])
        dist.append(np.abs(cells[(2, 2)].astype(float) - src[(2, 2)]).mean())
    assert dist[0] < dist[1] < dist[2]


def _luma(rgb) -> float:
    return float(np.dot(rgb, [0.299, 0.587, 0.114]))


def test_all_layers_aggregate_shows_the_share_of_pairs_without_tinting_and_a_side_map():
    a, b = img_pos(2, 1), img_pos(0, 3)
    trace = _trace({(0, 0): [a, b], (1, 0): [a], (1, 1): [a]})  # a kept by 3 of 4 pairs, b by 1 of 4
    images, videos = _media()
    fr = viz.token_fractions(trace)
    assert fr.pairs == 4 and fr.kept[a] == pytest.approx(0.75) and fr.kept[b] == pytest.approx(0.25)
    assert viz.token_fractions(trace, layer=1).kept[a] == pytest.approx(1.0)
    assert viz.token_fractions(trace, head=1).kept[a] == pytest.approx(0.5)
    panel = viz.overlay_panels(trace, images, videos, **PAINT)[0]
    w, h = images[0].size
    assert panel.image.width > w and panel.image.height >= h  # the side map of kept shares
    cells = _cells(panel.image, IMG_ROWS, IMG_COLS, size=(w, h))
    src = _cells(images[0], IMG_ROWS, IMG_COLS)
    # off the hatch, a cell kept by a share k is k parts its own pixels and 1 - k parts the grey ghost
    for (r, c), k in (((2, 1), 0.75), ((0, 3), 0.25)):
        x0, y0, _, _ = cell_box(IMG_ROWS, IMG_COLS, r, c, (0, 0, w, h))
        y, x = 3, (3 - (x0 + y0 + 3)) % 6 + 6  # (x0 + x) + (y0 + y) = 3 (mod 6): between hatch lines
        s = src[(r, c)][y, x].astype(float)
        want = k * s + (1 - k) * (170 + 0.35 * (_luma(s) - 128))
        assert np.abs(cells[(r, c)][y, x] - want).max() <= 1.0, (r, c)
    diff = {key: np.abs(cells[key].astype(float) - src[key]).mean() for key in ((2, 1), (0, 3), (1, 1))}
    assert diff[(2, 1)] < diff[(0, 3)] < diff[(1, 1)]
    # side map: half size, right of the image; darker = kept by more pairs
    side = np.asarray(panel.image)
    ox = w + 6
    centre = lambda r, c: cell_box(IMG_ROWS, IMG_COLS, r, c, (ox, 0, ox + w // 2, h // 2))  # noqa: E731
    lum = {
        key: _luma(side[(centre(*key)[1] + centre(*key)[3]) // 2, (centre(*key)[0] + centre(*key)[2]) // 2])
        for key in ((2, 1), (0, 3), (1, 1))
    }
    assert lum[(2, 1)] < lum[(0, 3)] < lum[(1, 1)]
    assert viz.overlay_panels(trace, images, videos, **PAINT, state_map=False)[0].image.size == (w, h)


def test_merged_cells_are_dotted_and_listed():
    src, dst = img_pos(3, 0), img_pos(0, 0)
    merges = {0: [None, {"source": [src], "target": [dst], "similarity": [0.91]}]}
    trace = _trace({(0, 1): [dst, 37]}, merges=merges)
    images, videos = _media()
    states = _states(
        viz.overlay_panels(trace, images, videos, layer=0, head=1, **PAINT)[0].image, images[0], IMG_ROWS, IMG_COLS
    )
    assert states[(3, 0)] == "merged" and states[(0, 0)] == "kept" and states[(2, 2)] == "evicted"
    rows = viz.merge_rows(trace, ["t"] * LENGTH)
    assert rows == [
        {
            "layer": 0,
            "kv_head": 1,
            "absorbed (evicted)": f"#{src} image 1 cell (r3, c0)",
            "into (kept)": f"#{dst} image 1 cell (r0, c0)",
            "similarity": 0.91,
        }
    ]
    # merge lines are drawn only for one layer and head, and only change pixels (never the kept set)
    drawn = viz.overlay_panels(trace, images, videos, layer=0, head=1, alpha=1.0, grid_lines=False, min_side=1)[0]
    assert np.asarray(drawn.image).shape == (48, 64, 3)


def test_display_scaling_keeps_the_grid_aligned():
    trace = _trace({(0, 0): [img_pos(1, 1)]})
    images, videos = _media()
    panel = viz.overlay_panels(trace, images, videos, layer=0, head=0, alpha=1.0, grid_lines=False, min_side=192)[0]
    assert panel.image.size == (256, 192)
    states = _states(panel.image, images[0], IMG_ROWS, IMG_COLS)
    assert states[(1, 1)] == "kept" and states[(0, 0)] == "evicted"


def test_presentation_mode_overlays_are_bigger_with_thicker_contours():
    trace = _trace({(0, 0): [img_pos(1, 1)]})
    images, videos = _media()
    normal = viz.overlay_panels(trace, images, videos, layer=0, head=0, grid_lines=False)[0]
    big = viz.overlay_panels(trace, images, videos, layer=0, head=0, grid_lines=False, present=True)[0]
    assert min(normal.image.size) == 224 and min(big.image.size) >= 384

    def contour(img: Image.Image) -> int:  # kept-colour pixels along the top edge of kept cell (1, 1)
        block = _cells(img, IMG_ROWS, IMG_COLS)[(1, 1)]
        col = block[:, block.shape[1] // 2]
        return int(np.all(col == viz.KEPT, axis=1)[: block.shape[0] // 2].sum())

    assert contour(big.image) > contour(normal.image) >= 2
    assert big.caption == normal.caption


def test_query_agnostic_question_counts_as_kept_and_is_labelled():
    trace = _trace({(0, 0): [img_pos(0, 0)]}, span=33)
    fr = viz.token_fractions(trace, layer=0, head=0)
    assert fr.span == 33 and fr.kept[33:].tolist() == [1.0] * 5 and fr.kept[img_pos(0, 0)] == 1.0
    strip = viz.token_strip(trace, [f"w{i}" for i in range(LENGTH)], layer=0, head=0)
    assert strip[-1] == ("w37", "question (not compressed)")
    assert strip[0] == ("w0", "evicted")
    assert strip[3] == ("[image 1 · 16 tokens · 6% kept]", "kept by few layers/heads")
    assert len(strip) == 3 + 1 + 2 + 2 + 5  # text tokens, one chip per image / frame group
    short = viz.token_strip(trace, [f"w{i}" for i in range(LENGTH)], layer=0, head=0, present=True)
    assert short[3] == ("[image 1 · 6% kept]", "kept by few layers/heads")
    assert {label for _, label in strip if label} <= set(viz.STRIP_COLORS)


def test_video_frame_groups():
    assert viz.video_frame_groups(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert viz.video_frame_groups(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert viz.video_frame_groups(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_strip_labels():
    assert viz.strip_label(1.0, 0.0) == "kept"
    assert viz.strip_label(0.0, 0.0) == "evicted"
    assert viz.strip_label(0.0, 0.5) == "merged into a kept token"
    assert viz.strip_label(0.75, 0.0) == "kept by most layers/heads"
    assert viz.strip_label(0.25, 0.0) == "kept by few layers/heads"
    assert set(viz.STRIP_COLORS) == {
        "kept",
        "evicted",
        "merged into a kept token",
        "kept by most layers/heads",
        "kept by few layers/heads",
        "question (not compressed)",
    }
    hexes = {k: v.lower() for k, v in viz.STRIP_COLORS.items()}
    assert (hexes["kept"], hexes["evicted"], hexes["merged into a kept token"]) == tuple(
        _hex(c) for c in (viz.KEPT, viz.EVICTED, viz.MERGED)
    )


# ---- palettes: colour-blind safe, and state never looks like a modality ---------------------------
# Machado et al. (2009) dichromat simulation matrices (linear RGB, severity 1) and CIE L*a*b* (D65).
_CVD = {
    "normal": np.eye(3),
    "protanopia": np.array(
        [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]]
    ),
    "deuteranopia": np.array(
        [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]]
    ),
    "tritanopia": np.array(
        [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]]
    ),
}


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _rgb(colour) -> np.ndarray:
    if isinstance(colour, str):
        colour = [int(colour.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)]
    return np.asarray(colour, float) / 255


def _lab(colour, vision: str = "normal") -> np.ndarray:
    c = _rgb(colour)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    linear = np.clip(_CVD[vision] @ linear, 0, 1)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in xyz / [0.95047, 1.0, 1.08883]]
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _worst_difference(a, b) -> float:
    return min(float(np.linalg.norm(_lab(a, v) - _lab(b, v))) for v in _CVD)


def test_state_and_modality_palettes_share_no_colour_and_stay_apart_for_colour_blind_viewers():
    state = [viz.KEPT, viz.EVICTED, viz.MERGED]
    modality = list(viz.MODALITY_COLORS.values())
    assert not {_hex(c) for c in state} & {m.lower() for m in modality}
    for i, a in enumerate(state):
        for b in state[i + 1 :]:
            assert abs(_lab(a)[0] - _lab(b)[0]) >= 15, (a, b)  # lightness alone (greyscale, washed-out projector)
            assert _worst_difference(a, b) >= 30, (a, b)  # every dichromacy
        for m in modality:
            assert _worst_difference(a, m) >= 20, (a, m)
    for i, a in enumerate(modality):
        for b in modality[i + 1 :]:
            assert _worst_difference(a, b) >= 20, (a, b)
    # the old palettes failed: kept green vs video green, merged blue vs text blue
    assert _worst_difference((46, 160, 67), "#54A24B") < 20 and _worst_difference((49, 110, 200), "#4C78A8") < 20


# ---- figures -----------------------------------------------------------------------------------
def test_budget_figure_stacks_kept_tokens_by_modality_and_draws_entropy():
    kept = {(0, 0): [0, 1, img_pos(0, 0), vid_pos(0, 0, 0)], (0, 1): [0, 1], (1, 0): [0], (1, 1): [0, img_pos(1, 1)]}
    fig = viz.budget_figure(_trace(kept))
    bars = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    assert bars["text tokens kept"] == [2.0, 1.0]
    assert bars["image tokens kept"] == [0.5, 0.5]
    assert bars["video tokens kept"] == [0.5, 0.0]
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(lines) == 1 and list(lines[0].y) == pytest.approx([1.75, 2.0])  # mean entropy per layer
    assert fig.layout.barmode == "stack"


def test_budget_figure_uses_method_layer_entropy_and_budget_when_recorded():
    info = {0: {"entropy": 0.3, "layer_budget": 12}, 1: {"entropy": 0.7, "layer_budget": 8}}
    fig = viz.budget_figure(_trace({(0, 0): [0]}, info=info))
    scatters = {t.name: list(t.y) for t in fig.data if t.type == "scatter"}
    assert scatters["planned budget per KV head"] == [12.0, 8.0]
    assert [0.3, 0.7] in scatters.values() and not fig.layout.title.subtitle.text  # kept (0.5) is under the plan


def test_budget_figure_explains_kept_above_the_plan():
    # LOOK-M / MEDA: the text prior keeps every text token on top of the layer budget (docs/methods.md)
    kept = {(0, h): list(range(3)) + [img_pos(0, 0)] for h in range(2)}
    info = {0: {"layer_budget": 2, "over_budget": "text prior: ..."}, 1: {"layer_budget": 2}}
    trace = _trace(kept, info=info)
    trace.method = "meda"
    fig = viz.budget_figure(trace)
    planned = next(t for t in fig.data if t.name.startswith("planned"))
    assert planned.customdata[0][0] == pytest.approx(4.0) and "text prior" in planned.customdata[0][1]
    assert planned.customdata[1][1] == ""  # layer 1 keeps nothing: under its plan
    subtitle = fig.layout.title.subtitle.text.replace("<br>", " ")
    assert "1 of 2 layers" in subtitle and "text prior" in subtitle
    assert fig.layout.title.text.startswith("MEDA:") and all(
        len(line) <= 60 for line in fig.layout.title.text.split("<br>")
    )
    # MadaKV: heads keep what they need, the last layer what is left
    info = {0: {"phi": 1.0}, 1: {"phi": 1.0}}
    fig = viz.budget_figure(_trace(kept, info=info))
    assert "φ" in next(
        t.name for t in fig.data if t.name.startswith("planned")
    ) and "last layer" in fig.layout.title.subtitle.text.replace("<br>", " ")


def test_modality_heatmap_from_measured_mass_and_from_madakv_preference():
    fig = viz.modality_heatmap(_trace({}))
    heat = fig.data[0]
    assert heat.type == "heatmap" and np.asarray(heat.z).shape == (2, 4)
    assert heat.zmin == 0 and heat.zmax == 1
    assert [list(s) for s in heat.colorscale] == [list(s) for s in viz.PREFERENCE_SCALE]
    assert np.asarray(heat.z)[0].tolist() == pytest.approx([0.5, 0.8, 0.1, 0.9])
    pref = {0: {"preference": [0.2, 0.9]}, 1: {"preference": [0.6, 0.4]}}
    z, axis, source = viz.preference_matrix(_trace({}, info=pref))
    assert z.tolist() == [[0.2, 0.9], [0.6, 0.4]] and axis == "KV head" and "preference" in source
    assert "not recorded" in viz.modality_heatmap(_trace({}, mass=False)).layout.annotations[0].text


def test_head_budget_figure_with_hybridkv_types():
    kept = {(0, 0): [0, 1, 2], (0, 1): [0], (1, 0): [0, 1], (1, 1): []}
    fig = viz.head_budget_figure(_trace(kept))
    assert np.asarray(fig.data[0].z).tolist() == [[3, 1], [2, 0]]
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 3 and not fig.layout.title.subtitle.text
    info = {l: {"head_types": ["static", "dynamic"], "sparsity": [0.9, 0.2], "head_budgets": [5, 7]} for l in range(2)}
    fig = viz.head_budget_figure(_trace(kept, info=info))
    assert np.asarray(fig.data[0].z).tolist() == [[5, 7], [5, 7]]
    assert [list(r) for r in fig.data[0].text] == [["S", "D"], ["S", "D"]]
    assert "head types" in fig.layout.title.text and fig.data[0].colorbar.title.text == "tokens planned"
    assert np.asarray(fig.data[0].customdata)[..., 0].tolist() == [[3, 1], [2, 0]]  # kept, in the hover


def test_constant_head_budgets_get_a_scale_from_zero_and_say_so():
    fig = viz.head_budget_figure(_trace({(l, h): list(range(31)) for l in range(2) for h in range(2)}))
    heat = fig.data[0]
    assert heat.zmin == 0 and heat.zmax == 31  # not the degenerate 30.5-31.5 autoscale
    assert "31 tokens kept each" in fig.layout.title.subtitle.text.replace("<br>", " ")
    empty = viz.head_budget_figure(_trace({}))
    assert empty.data[0].zmin == 0 and empty.data[0].zmax >= 1


def test_compare_figures():
    rows = [
        {
            "label": "full",
            "kv_bytes_full": 2048,
            "kv_bytes_compressed": 2048,
            "kv_bytes_end": 3072,
            "prefill_ms": 5.0,
            "compress_ms": 0.0,
            "decode_ms_per_token": 1.0,
            "overlap": 1.0,
            "kl": 0.0,
        },
        {
            "label": "snapkv @ 0.2",
            "kv_bytes_full": 2048,
            "kv_bytes_compressed": 512,
            "kv_bytes_end": 1024,
            "prefill_ms": 6.0,
            "compress_ms": 0.5,
            "decode_ms_per_token": 0.8,
            "overlap": 0.5,
            "kl": 0.12,
        },
    ]
    mem = viz.memory_figure(rows)
    assert [t.name for t in mem.data] == ["prompt, uncompressed", "after compression", "end of the answer"]
    # the budget goes on its own tick line; the hover keeps the whole label
    assert list(mem.data[1].y) == [2.0, 0.5] and list(mem.data[1].x) == ["full", "snapkv<br>@ 0.2"]
    assert list(mem.data[1].customdata) == ["full", "snapkv @ 0.2"]
    speed = viz.speed_figure(rows)
    assert len(speed.data) == 3 and list(speed.data[2].y) == [1.0, 0.8]
    agr = viz.agreement_figure(rows)
    assert list(agr.data[0].y) == [1.0, 0.5] and list(agr.data[1].y) == [0.0, 0.12]
    sweep = viz.sweep_figure(
        [{"method": "snapkv", "budget": b, "overlap": o, "kl": k} for b, o, k in ((0.5, 0.9, 0.01), (0.1, 0.3, 0.5))]
    )
    assert list(sweep.data[0].x) == [0.1, 0.5] and list(sweep.data[1].y) == [0.5, 0.01]
    assert "no sweep" in viz.sweep_figure([]).layout.annotations[0].text
    keep = viz.keep_map_figure([("a", _trace({(0, 0): [0]})), ("b", _trace({}))])
    band, heat, *legend = keep.data
    assert np.asarray(band.z).shape == (1, LENGTH) and np.asarray(heat.z).shape == (2, LENGTH)
    assert np.asarray(heat.z)[0, 0] == pytest.approx(0.25) and [list(s) for s in heat.colorscale] == [
        list(s) for s in viz.KEEP_SCALE
    ]
    # the token-type row has a legend in words, in the modality greys
    assert [(t.name, t.marker.color) for t in legend] == [
        (f"{m} token", viz.MODALITY_COLORS[m]) for m in ("text", "image", "video")
    ]


def test_long_method_labels_wrap_and_get_display_names():
    rows = [
        {
            "label": "streaming_llm @ 0.25 (query-agnostic)",
            "method": "streaming_llm",
            "kv_bytes_full": 1,
            "prefill_ms": 1.0,
            "overlap": 0.5,
        }
    ]
    for fig in (viz.memory_figure(rows), viz.speed_figure(rows), viz.agreement_figure(rows)):
        tick = fig.data[0].x[0]
        assert (
            tick.startswith("StreamingLLM")
            and "<br>" in tick
            and fig.data[0].customdata[0] == tick.replace("<br>", " ")
        )
        assert (
            fig.layout.legend.orientation == "h"
            and fig.layout.xaxis.automargin
            and fig.layout.modebar.orientation == "v"
        )


def _figures(present: bool = False) -> list:
    info = {
        l: {
            "entropy": 0.3 + l,
            "layer_budget": 2,
            "phi": 3.0,
            "over_budget": "x",
            "preference": [0.2, 0.9],
            "head_types": ["static", "dynamic"],
            "head_budgets": [5, 7],
            "sparsity": [0.9, 0.2],
        }
        for l in range(2)
    }
    trace = _trace({(0, 0): [0, 1, img_pos(0, 0)], (1, 1): [0]}, info=info)
    rows = [
        {
            "label": "full",
            "kv_bytes_full": 2048,
            "kv_bytes_compressed": 2048,
            "kv_bytes_end": 3072,
            "prefill_ms": 5.0,
            "compress_ms": 0.0,
            "decode_ms_per_token": 1.0,
            "overlap": 1.0,
            "kl": 0.0,
            "method": "full",
        }
    ]
    sweep = [{"method": "madakv", "budget": 0.2, "overlap": 0.5, "kl": 0.1}]
    return [
        viz.budget_figure(trace, present=present),
        viz.budget_figure(_trace({(0, 0): [0]}), present=present),
        viz.modality_heatmap(trace, present=present),
        viz.modality_heatmap(_trace({}), present=present),
        viz.head_budget_figure(trace, present=present),
        viz.memory_figure(rows, present=present),
        viz.speed_figure(rows, present=present),
        viz.agreement_figure(rows, present=present),
        viz.sweep_figure(sweep, present=present),
        viz.keep_map_figure([("full", trace)], present=present),
        viz.empty_figure("nothing", "Title", present=present),
    ]


def _words(fig) -> list[str]:
    """Every text a viewer reads: titles, subtitles, legend names and titles, axis and colour-bar titles and ticks."""
    out = [fig.layout.title.text or "", fig.layout.title.subtitle.text or "", fig.layout.legend.title.text or ""]
    for axis in [k for k in fig.layout.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]:
        out.append(fig.layout[axis].title.text or "")
    for t in fig.data:
        out.append(t.name or "")
        bar = getattr(t, "colorbar", None)
        if bar is not None and getattr(t, "showscale", True) is not False:
            out += [bar.title.text or ""] + [str(x) for x in (bar.ticktext or ())]
    return out


def test_no_code_names_in_what_the_audience_reads():
    bad = ("info[", "['", "_budget", "(phi)", "layer_budget", "head_budgets", "head_types", "modality_mass", "==", "()")
    words = [w for fig in _figures() for w in _words(fig)]
    assert words and not [w for w in words if any(b in w for b in bad)]
    assert not [w for w in words if "_" in w]  # no identifiers (method ids are shown by their display names)


def test_presentation_mode_uses_large_type_and_thick_lines():
    for normal, big in zip(_figures(False), _figures(True)):
        assert normal.layout.font.size < 20 <= big.layout.font.size
        assert big.layout.title.font.size >= 24 and big.layout.legend.font.size >= 20
        assert big.layout.height > normal.layout.height
    sweep = _figures(True)[8]
    assert sweep.data[0].line.width >= 4 and sweep.data[0].marker.size >= 14
    assert (
        viz.Style.of(True) is viz.PRESENT and viz.Style.of(viz.PRESENT) is viz.PRESENT and viz.Style.of() is viz.NORMAL
    )


def test_report_html_is_self_contained_and_traces_round_trip():
    trace = _trace({(0, 0): [img_pos(0, 0)]})
    images, videos = _media()
    panels = viz.overlay_panels(trace, images, videos, layer=0, head=0)
    html = viz.figures_html([("budget", viz.budget_figure(trace))], [(p.image, p.caption) for p in panels], title="t")
    assert "plotly" in html.lower() and html.count("<figcaption>") == len(panels)
    again = Trace.from_json(trace.to_json())
    p2 = viz.overlay_panels(again, images, videos, layer=0, head=0)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(panels, p2))
    json.loads(again.to_json())


def test_viz_does_not_import_gradio():
    import subprocess
    import sys

    code = "import sys, viz; sys.exit(1 if 'gradio' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_tiled_items_are_painted_into_their_tile_regions():
    # two tiles side by side (r0c0, r0c1) of 1x2 cells each, plus a global 1x1 view
    items, cells = [], []
    for start, tile, rows, cols in ((0, "r0c0", 1, 2), (2, "r0c1", 1, 2), (4, "global", 1, 1)):
        it, cl = grid_item(IMAGE, 0, 0, rows, cols, start, tile=tile)
        items.append(it)
        cells.append(cl)
    m = ModalityMap.from_items(6, items, cells)
    lt = LayerTrace(layer=0, kept=[[3]], bytes_before=0, bytes_after=0)
    trace = Trace(
        method="t",
        params={},
        budget=0.5,
        capacity=1,
        query_aware=True,
        prompt_length=6,
        span_length=6,
        num_layers=1,
        num_kv_heads=1,
        num_q_heads=1,
        head_dim=4,
        bytes_per_token_head=16,
        modality=m,
        layers=[lt],
    )
    image = _noise(40, 10, 7)
    panels = viz.overlay_panels(trace, [image], [], **PAINT)
    assert [p.caption.split(" — ")[0] for p in panels] == ["image 1 · tiles", "image 1 · global view"]
    # 4 cells across the 40-pixel-wide image: only the 4th (tile r0c1, cell c1) is kept
    states = _states(panels[0].image, image, 1, 4)
    assert [states[(0, c)] for c in range(4)] == ["evicted", "evicted", "evicted", "kept"]
    assert _states(panels[1].image, image, 1, 1) == {(0, 0): "evicted"}


def test_torch_tensors_in_modality_are_fine():
    trace = _trace({(0, 0): [img_pos(0, 0)]})
    assert isinstance(trace.modality.modality, torch.Tensor)
    assert viz.overlay_panels(trace, *_media(), layer=0, head=0)
