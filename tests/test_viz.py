"""viz/: figure shapes and colour scales, and that planted kept sets paint exactly their patch cells."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import viz
from mmkv.modality import IMAGE, VIDEO, ModalityMap, grid_item
from mmkv.models.base import VideoFrames
from mmkv.trace import LayerTrace, Trace
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
        layers.append(LayerTrace(
            layer=layer,
            kept=[sorted(kept.get((layer, h), [])) for h in range(2)],
            bytes_before=LENGTH * 2 * 64, bytes_after=sum(len(kept.get((layer, h), [])) for h in range(2)) * 64,
            merges=(merges or {}).get(layer),
            info=(info or {}).get(layer, {}),
            modality_mass=[[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]] if mass else None,
            entropy=[1.0 + layer, 1.5, 2.0, 2.5] if mass else None,
        ))
    return Trace(method="planted", params={}, budget=0.3, capacity=10, query_aware=span == LENGTH, prompt_length=LENGTH,
                 span_length=span, num_layers=2, num_kv_heads=2, num_q_heads=4, head_dim=16, bytes_per_token_head=64,
                 modality=_modality() if span == LENGTH else _modality().prefix(span), layers=layers)


GREY = (128, 128, 128)


def _media():
    image = Image.new("RGB", (64, 48), GREY)
    frames = [Image.new("RGB", (60, 40), GREY) for _ in range(4)]  # 4 sampled frames, 2 per token group
    return [image], [VideoFrames(frames=frames, timestamps=[0.0, 0.5, 1.0, 1.5], fps=2.0)]


def _cell_colours(img: Image.Image, rows: int, cols: int) -> dict[tuple[int, int], set[tuple[int, int, int]]]:
    """All distinct colours inside each cell of a rows x cols grid laid over the whole image."""
    px = np.asarray(img)
    out = {}
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = cell_box(rows, cols, r, c, (0, 0, img.width, img.height))
            out[(r, c)] = {tuple(int(v) for v in p) for p in px[y0:y1, x0:x1].reshape(-1, 3)}
    return out


PAINT = dict(alpha=1.0, grid_lines=False, min_side=1, max_side=10_000, draw_merges=False)


def test_planted_kept_set_paints_exactly_those_cells_on_the_image_and_the_right_frames():
    image_cells = {(0, 0), (1, 2), (3, 3)}
    video_cells = {(1, 1)}  # group 1 only -> sampled frames 3 and 4
    kept = [img_pos(r, c) for r, c in image_cells] + [vid_pos(1, r, c) for r, c in video_cells] + [0, 1, 37]
    trace = _trace({(0, 0): kept})
    images, videos = _media()
    panels = viz.overlay_panels(trace, images, videos, layer=0, head=0, **PAINT)
    assert [(p.modality, p.source, p.frame) for p in panels] == [(IMAGE, 0, 0), (VIDEO, 0, 0), (VIDEO, 0, 1), (VIDEO, 0, 2), (VIDEO, 0, 3)]
    assert panels[0].image.size == (64, 48) and panels[1].image.size == (60, 40)
    for (r, c), colours in _cell_colours(panels[0].image, IMG_ROWS, IMG_COLS).items():
        assert colours == {viz.KEPT if (r, c) in image_cells else viz.EVICTED}, (r, c)
    for panel in panels[1:]:
        group = 0 if panel.frame < 2 else 1
        for (r, c), colours in _cell_colours(panel.image, VID_ROWS, VID_COLS).items():
            want = viz.KEPT if group == 1 and (r, c) in video_cells else viz.EVICTED
            assert colours == {want}, (panel.frame, r, c)
    assert panels[0].kept_fraction == pytest.approx(3 / 16)
    assert "frame 3" in panels[3].caption and "token group 2" in panels[3].caption


def test_other_head_and_layer_selection_paint_nothing_kept():
    trace = _trace({(0, 0): [img_pos(0, 0)]})
    images, videos = _media()
    panels = viz.overlay_panels(trace, images, videos, layer=1, head=1, **PAINT)
    assert all(cs == {viz.EVICTED} for cs in _cell_colours(panels[0].image, IMG_ROWS, IMG_COLS).values())


def test_all_layers_aggregate_is_the_fraction_of_heads_and_layers_keeping_a_cell():
    a, b = img_pos(2, 1), img_pos(0, 3)
    trace = _trace({(0, 0): [a, b], (1, 0): [a], (1, 1): [a]})  # a kept by 3 of 4 pairs, b by 1 of 4
    images, videos = _media()
    fr = viz.token_fractions(trace)
    assert fr.pairs == 4 and fr.kept[a] == pytest.approx(0.75) and fr.kept[b] == pytest.approx(0.25)
    assert viz.token_fractions(trace, layer=1).kept[a] == pytest.approx(1.0)
    assert viz.token_fractions(trace, head=1).kept[a] == pytest.approx(0.5)
    panel = viz.overlay_panels(trace, images, videos, **PAINT)[0]
    colours = _cell_colours(panel.image, IMG_ROWS, IMG_COLS)
    mix = lambda k: tuple(int(v) for v in np.clip(k * np.array(viz.KEPT) + (1 - k) * np.array(viz.EVICTED), 0, 255))  # noqa: E731
    assert colours[(2, 1)] == {mix(0.75)}
    assert colours[(0, 3)] == {mix(0.25)}
    assert colours[(1, 1)] == {viz.EVICTED}


def test_merged_cells_are_painted_blue_and_listed():
    src, dst = img_pos(3, 0), img_pos(0, 0)
    merges = {0: [None, {"source": [src], "target": [dst], "similarity": [0.91]}]}
    trace = _trace({(0, 1): [dst, 37]}, merges=merges)
    images, videos = _media()
    colours = _cell_colours(viz.overlay_panels(trace, images, videos, layer=0, head=1, **PAINT)[0].image, IMG_ROWS, IMG_COLS)
    assert colours[(3, 0)] == {viz.MERGED} and colours[(0, 0)] == {viz.KEPT} and colours[(2, 2)] == {viz.EVICTED}
    rows = viz.merge_rows(trace, ["t"] * LENGTH)
    assert rows == [{"layer": 0, "kv_head": 1, "absorbed (evicted)": f"#{src} image 1 cell (r3, c0)",
                     "into (kept)": f"#{dst} image 1 cell (r0, c0)", "similarity": 0.91}]
    # merge lines are drawn only for one layer and head, and only change pixels (never the kept set)
    drawn = viz.overlay_panels(trace, images, videos, layer=0, head=1, alpha=1.0, grid_lines=False, min_side=1)[0]
    assert np.asarray(drawn.image).shape == (48, 64, 3)


def test_display_scaling_keeps_the_grid_aligned():
    trace = _trace({(0, 0): [img_pos(1, 1)]})
    images, videos = _media()
    panel = viz.overlay_panels(trace, images, videos, layer=0, head=0, alpha=1.0, grid_lines=False, min_side=192)[0]
    assert panel.image.size == (256, 192)
    colours = _cell_colours(panel.image, IMG_ROWS, IMG_COLS)
    assert colours[(1, 1)] == {viz.KEPT} and colours[(0, 0)] == {viz.EVICTED}


def test_query_agnostic_question_counts_as_kept_and_is_labelled():
    trace = _trace({(0, 0): [img_pos(0, 0)]}, span=33)
    fr = viz.token_fractions(trace, layer=0, head=0)
    assert fr.span == 33 and fr.kept[33:].tolist() == [1.0] * 5 and fr.kept[img_pos(0, 0)] == 1.0
    strip = viz.token_strip(trace, [f"w{i}" for i in range(LENGTH)], layer=0, head=0)
    assert strip[-1] == ("w37", "question (not compressed)")
    assert strip[0] == ("w0", "evicted")
    assert strip[3] == ("[image 1 · 16 tokens · 6% kept]", "kept by few heads")
    assert len(strip) == 3 + 1 + 2 + 2 + 5  # text tokens, one chip per image / frame group


def test_video_frame_groups():
    assert viz.video_frame_groups(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert viz.video_frame_groups(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert viz.video_frame_groups(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_strip_labels():
    assert viz.strip_label(1.0, 0.0) == "kept"
    assert viz.strip_label(0.0, 0.0) == "evicted"
    assert viz.strip_label(0.0, 0.5) == "merged"
    assert viz.strip_label(0.75, 0.0) == "kept by most heads"
    assert viz.strip_label(0.25, 0.0) == "kept by few heads"
    assert set(viz.STRIP_COLORS) >= {"kept", "evicted", "merged", "kept by most heads", "kept by few heads",
                                     "question (not compressed)"}


# ---- figures -----------------------------------------------------------------------------------
def test_budget_figure_stacks_kept_tokens_by_modality_and_draws_entropy():
    kept = {(0, 0): [0, 1, img_pos(0, 0), vid_pos(0, 0, 0)], (0, 1): [0, 1], (1, 0): [0], (1, 1): [0, img_pos(1, 1)]}
    fig = viz.budget_figure(_trace(kept))
    bars = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    assert bars["kept text"] == [2.0, 1.0]
    assert bars["kept image"] == [0.5, 0.5]
    assert bars["kept video"] == [0.5, 0.0]
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(lines) == 1 and list(lines[0].y) == pytest.approx([1.75, 2.0])  # mean entropy per layer
    assert fig.layout.barmode == "stack"


def test_budget_figure_uses_method_layer_entropy_and_budget_when_recorded():
    info = {0: {"entropy": 0.3, "layer_budget": 12}, 1: {"entropy": 0.7, "layer_budget": 8}}
    fig = viz.budget_figure(_trace({(0, 0): [0]}, info=info))
    scatters = {t.name: list(t.y) for t in fig.data if t.type == "scatter"}
    assert scatters["planned (layer_budget)"] == [12.0, 8.0]
    assert any("info['entropy']" in name for name in scatters) and [0.3, 0.7] in scatters.values()


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
    info = {l: {"head_types": ["static", "dynamic"], "sparsity": [0.9, 0.2], "head_budgets": [5, 7]} for l in range(2)}
    fig = viz.head_budget_figure(_trace(kept, info=info))
    assert np.asarray(fig.data[0].z).tolist() == [[5, 7], [5, 7]]
    assert [list(r) for r in fig.data[0].text] == [["S", "D"], ["S", "D"]]
    assert "head types" in fig.layout.title.text


def test_compare_figures():
    rows = [
        {"label": "full", "kv_bytes_full": 2048, "kv_bytes_compressed": 2048, "kv_bytes_end": 3072, "prefill_ms": 5.0,
         "compress_ms": 0.0, "decode_ms_per_token": 1.0, "overlap": 1.0, "kl": 0.0},
        {"label": "snapkv @ 0.2", "kv_bytes_full": 2048, "kv_bytes_compressed": 512, "kv_bytes_end": 1024,
         "prefill_ms": 6.0, "compress_ms": 0.5, "decode_ms_per_token": 0.8, "overlap": 0.5, "kl": 0.12},
    ]
    mem = viz.memory_figure(rows)
    assert [t.name for t in mem.data] == ["prompt, uncompressed", "after compression", "end of answer"]
    assert list(mem.data[1].y) == [2.0, 0.5] and list(mem.data[1].x) == ["full", "snapkv @ 0.2"]
    speed = viz.speed_figure(rows)
    assert len(speed.data) == 3 and list(speed.data[2].y) == [1.0, 0.8]
    agr = viz.agreement_figure(rows)
    assert list(agr.data[0].y) == [1.0, 0.5] and list(agr.data[1].y) == [0.0, 0.12]
    sweep = viz.sweep_figure([{"method": "snapkv", "budget": b, "overlap": o, "kl": k}
                              for b, o, k in ((0.5, 0.9, 0.01), (0.1, 0.3, 0.5))])
    assert list(sweep.data[0].x) == [0.1, 0.5] and list(sweep.data[1].y) == [0.5, 0.01]
    assert "no sweep" in viz.sweep_figure([]).layout.annotations[0].text
    keep = viz.keep_map_figure([("a", _trace({(0, 0): [0]})), ("b", _trace({}))])
    band, heat = keep.data
    assert np.asarray(band.z).shape == (1, LENGTH) and np.asarray(heat.z).shape == (2, LENGTH)
    assert np.asarray(heat.z)[0, 0] == pytest.approx(0.25) and [list(s) for s in heat.colorscale] == [list(s) for s in viz.KEEP_SCALE]


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
    trace = Trace(method="t", params={}, budget=0.5, capacity=1, query_aware=True, prompt_length=6, span_length=6,
                  num_layers=1, num_kv_heads=1, num_q_heads=1, head_dim=4, bytes_per_token_head=16, modality=m, layers=[lt])
    panels = viz.overlay_panels(trace, [Image.new("RGB", (40, 10), GREY)], [], **PAINT)
    assert [p.caption.split(" — ")[0] for p in panels] == ["image 1 · tiles", "image 1 · global view"]
    px = np.asarray(panels[0].image)
    # 4 cells across the 40-pixel-wide image: only the 4th (tile r0c1, cell c1) is kept
    assert [tuple(px[5, x]) for x in (5, 15, 25, 35)] == [viz.EVICTED, viz.EVICTED, viz.EVICTED, viz.KEPT]
    assert {tuple(p) for p in np.asarray(panels[1].image).reshape(-1, 3)} == {viz.EVICTED}


def test_torch_tensors_in_modality_are_fine():
    trace = _trace({(0, 0): [img_pos(0, 0)]})
    assert isinstance(trace.modality.modality, torch.Tensor)
    assert viz.overlay_panels(trace, *_media(), layer=0, head=0)
