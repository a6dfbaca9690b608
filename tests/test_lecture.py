"""The app's lecture features, through the Gradio-free handlers (``mmkv.ui.handlers``).

Saved runs (open, compare, save and reopen, without a model), the decode replay (checked against counts
made from the trace's own records, and pixel by pixel), unique run labels, presentation mode, the prompt
preview and the capacity refusal. Uses the shipped example runs and the bundled model (runs take well
under a second).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image, ImageDraw

import mmkv.ui.handlers as H
from mmkv.bundled import BUNDLED_MODEL, EXAMPLES_DIR
from mmkv.models import adapter_for
from mmkv.trace.runfile import FRAME_SIDE, IMAGE_SIDE, RUNS_DIR, load_run, peek_run
from mmkv.ui import capacity
from mmkv.ui.config import Limits
from mmkv.ui.errors import UserError
from mmkv.ui.models import ModelStore
from viz.colors import EVICTED

ROOT = Path(__file__).resolve().parent.parent
INDEX = json.loads((RUNS_DIR / "index.json").read_text(encoding="utf-8"))
NAMES = [e["file"] for e in INDEX]
H2O, HYBRID = "05-h2o.mmkvrun", "04-hybridkv.mmkvrun"
NEEDLES = [str(EXAMPLES_DIR / f"needle_{i}.png") for i in (1, 2)]
QWEN_MODELING = "transformers.models.qwen2_vl.modeling_qwen2_vl"


@pytest.fixture(scope="module")
def store():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield ModelStore(str(BUNDLED_MODEL))
    torch.set_num_threads(threads)


def _opened(*names: str) -> H.AppState:
    state = H.AppState()
    H.open_runs(state, H.example_run_files(list(names)))
    return state


def _label(name: str) -> str:
    return "saved · " + next(e["label"] for e in INDEX if e["file"] == name)


def _chat(store, state, message, method="snapkv", ratio=0.3, **kw) -> H.ChatUpdate:
    kw = {"max_new_tokens": 4, "num_frames": 4, **kw}
    return list(H.chat_turn(store, state, message, method, ratio, **kw))[-1]


def _snapshot(state: H.AppState):
    return (
        list(state.runs),
        [id(r) for r in state.runs.values()],
        json.dumps(state.chat, default=str),
        json.dumps(state.display, default=str),
        state.last,
    )


def _jsonable(d):
    return json.loads(json.dumps(d))


# ---- 1. saved runs open without a model ---------------------------------------------------------
def test_example_runs_open_and_inspect_without_loading_a_model():
    assert [n for _, n in H.example_run_choices()] == NAMES
    state, status = H.open_runs(H.AppState(), H.example_run_files(NAMES))
    assert list(state.runs) == [_label(n) for n in NAMES] and state.last == _label(NAMES[-1])
    assert status.startswith(f"Opened {len(NAMES)} saved runs")
    for entry in INDEX:
        run = state.runs[_label(entry["file"])]
        assert (run.trace.method, run.trace.budget, run.answer) == (entry["method"], entry["budget"], entry["answer"])
        view = H.inspect(state, run.label)
        n_pictures = len(run.images) + sum(len(v.frames) for v in run.videos)
        assert n_pictures > 0 and len(view.gallery) == n_pictures
        assert entry["answer"] in view.summary and all(isinstance(f, go.Figure) for f in view.figures.values())
    with pytest.raises(UserError, match="no example run named 'nope.mmkvrun'"):
        H.example_run_files(["nope.mmkvrun"])

    # in a fresh interpreter: opening, inspecting, replaying and comparing every example never imports the
    # model's code; loading the model afterwards does (so the check can fail)
    script = textwrap.dedent(f"""
        import json, sys
        import mmkv.ui.handlers as H
        files = H.example_run_files([n for _, n in H.example_run_choices()])
        state, _ = H.open_runs(H.AppState(), files)
        for label in list(state.runs):
            H.inspect(state, label)
            H.replay(state, label, 1)
        H.compare_runs(H.AppState(), files)
        before = {QWEN_MODELING!r} in sys.modules
        from mmkv.bundled import BUNDLED_MODEL
        from mmkv.ui.models import ModelStore
        ModelStore(str(BUNDLED_MODEL)).get()
        print(json.dumps({{"before": before, "after": {QWEN_MODELING!r} in sys.modules}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"before": False, "after": True}


# ---- 2. Compare saved runs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run_file(store, tmp_path_factory) -> Path:
    """A Full run of two needle images, saved through the app and copied out of the session folder."""
    state = H.AppState()
    _chat(store, state, {"text": "Which image has the orange circle?", "files": NEEDLES}, method="full", ratio=1.0)
    target = tmp_path_factory.mktemp("full") / "full.mmkvrun"
    shutil.copy(H.save_run(state, None), target)
    state.cleanup()
    return target


def test_compare_saved_runs_rows_follow_the_recorded_numbers(full_run_file):
    files = [*H.example_run_files(["01-snapkv.mmkvrun", HYBRID]), str(full_run_file)]
    state = H.AppState()
    res = H.compare_runs(state, files)
    order = [str(full_run_file), *files[:2]]  # Full first, then as given
    summaries = [peek_run(f)["summary"] for f in order]  # recorded at save time, read without the trace
    assert [r["method"] for r in res.rows] == [s["method"] for s in summaries] == ["full", "snapkv", "hybridkv"]
    table = res.table()
    assert len(table) == 3
    for row, cells, s, f in zip(res.rows, table, summaries, order):
        assert (row["kv_bytes_full"], row["kv_bytes_compressed"], row["kv_bytes_end"]) == (
            s["kv_bytes_full"],
            s["kv_bytes_compressed"],
            s["kv_bytes_end"],
        )
        assert cells[0] == s["method"] and cells[2] == peek_run(f)["answer"]
        assert cells[3] == round(100 * s["kept_ratio"], 1)
        assert cells[4] == f"{round(s['kv_bytes_compressed'] / 1024, 1):g} / {round(s['kv_bytes_full'] / 1024, 1):g}"
        assert cells[5] == pytest.approx(s["prefill_ms"], abs=0.05)  # shown rounded
        assert cells[6] == pytest.approx(s["decode_ms_per_token"], abs=0.005)
    assert table[0][3] == 100.0 and table[1][3] < 100.0
    assert set(res.figures) == {"memory", "speed", "agreement", "kept"}
    assert all(isinstance(f, go.Figure) for f in res.figures.values())
    after = next(t for t in res.figures["memory"].data if t.name == "after compression")
    assert list(after.y) == pytest.approx([s["kv_bytes_compressed"] / 1024 for s in summaries])
    # gallery: Full has none; SnapKV its first 3 images, HybridKV its first frame; the kept share in each
    # caption is the mean over the picture's cells of the share of (layer, KV head) pairs keeping the cell
    captions = [c for _, c in res.gallery]
    assert [c.split(" @ ")[0] for c in captions] == ["SnapKV"] * 3 + ["HybridKV"]
    fully_evicted = 0  # SnapKV pictures with a cell no (layer, KV head) pair keeps
    traces = {"SnapKV": load_run(files[0]).trace, "HybridKV": load_run(files[1]).trace}
    for img, caption in res.gallery:
        assert isinstance(img, Image.Image)
        trace = traces[caption.split(" @ ")[0]]
        m = trace.modality
        image = re.search(r"· image (\d+)", caption)
        want = (
            (1, int(image.group(1)) - 1, 0)
            if image
            else (2, 0, int(re.search(r"token group (\d+)", caption).group(1)) - 1)
        )
        index = next(i for i, it in enumerate(m.items) if (int(it.modality), int(it.source), int(it.frame)) == want)
        cells = [p for p in range(trace.prompt_length) if int(m.item[p]) == index and int(m.row[p]) >= 0]
        kept = [set(k) for lt in trace.layers for k in lt.kept]
        share = np.mean([sum(p in k for k in kept) / len(kept) for p in cells])
        assert f"— {100 * share:.0f}% kept" in caption, (caption, share)
        if caption.startswith("SnapKV") and any(all(p not in k for k in kept) for p in cells):
            # a cell every (layer, KV head) pair evicted: the vermillion hatch at full strength
            assert (np.asarray(img).reshape(-1, 3) == EVICTED).all(1).any(), caption
            fully_evicted += 1
    assert fully_evicted >= 1
    assert list(state.runs) == ["saved · chat · full @ 1 · turn 1", _label("01-snapkv.mmkvrun"), _label(HYBRID)]
    assert Path(res.report_path).is_file() and Path(res.traces_path).is_file()


def test_compare_saved_runs_refuses_bad_files_without_showing_paths(tmp_path):
    good = H.example_run_files(["01-snapkv.mmkvrun"])[0]
    truncated = tmp_path / "cut.mmkvrun"
    data = Path(good).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_zip = tmp_path / "notes.mmkvrun"
    not_zip.write_text("hello")
    cases = [
        ([str(EXAMPLES_DIR / "needle_1.png")], "needle_1.png is not a saved run"),
        ([str(truncated)], "cut.mmkvrun: the run file is truncated or corrupt"),
        ([str(not_zip)], "notes.mmkvrun: not an mmkv run file"),
        ([str(tmp_path / "gone.mmkvrun")], "gone.mmkvrun: no such file"),
        ([], "choose one or more saved runs"),
        (None, "choose one or more saved runs"),
    ]
    state = _opened(H2O)
    before = _snapshot(state)
    for files, needle in cases:
        for fn in (H.compare_runs, H.open_runs):
            with pytest.raises(UserError) as err:
                fn(state, [good, *files] if files else files)
            msg = str(err.value)
            assert needle in msg, msg
            assert str(tmp_path) not in msg and str(EXAMPLES_DIR) not in msg and str(RUNS_DIR) not in msg, msg
            assert _snapshot(state) == before  # nothing half-added


# ---- 3. save and reopen ---------------------------------------------------------------------------
def test_saved_run_reopens_identically(store, tmp_path):
    wide = tmp_path / "wide.png"
    img = Image.new("RGB", (600, 300), (250, 250, 250))
    ImageDraw.Draw(img).ellipse([40, 60, 200, 220], fill=(230, 120, 20))
    img.save(wide)
    state = H.AppState()
    _chat(store, state, {"text": "What colour is the circle?", "files": [str(wide)]}, method="h2o", ratio=0.5)
    H.open_runs(state, H.example_run_files([H2O]))  # a video run, its frames already thumbnails
    for label in list(state.runs):
        run = state.runs[label]
        path = Path(H.save_run(state, label))
        assert path.suffix == ".mmkvrun" and path.parent == Path(state.workdir)
        other = H.AppState()
        H.open_runs(other, [str(path)])
        back = other.runs[other.last]
        assert back.label == "saved · " + label.removeprefix("saved · ")  # never "saved · saved · ..."
        assert _jsonable(back.trace.to_dict()) == _jsonable(run.trace.to_dict())
        assert (back.answer, back.tokens, back.model, back.agreement) == (
            run.answer,
            run.tokens,
            run.model,
            run.agreement,
        )
        pictures = [(a, b, IMAGE_SIDE) for a, b in zip(run.images, back.images)] + [
            (a, b, FRAME_SIDE) for v, w in zip(run.videos, back.videos) for a, b in zip(v.frames, w.frames)
        ]
        assert len(pictures) == len(run.images) + sum(len(v.frames) for v in run.videos) > 0
        assert len(back.images) == len(run.images) and [len(v.frames) for v in back.videos] == [
            len(v.frames) for v in run.videos
        ]
        for a, b, side in pictures:
            w, h = a.size
            scale = min(1.0, side / max(w, h))
            assert b.size == (round(w * scale), round(h * scale))
        # the replay works the same from the reopened run
        assert H.replay(other, None, 1).summary == H.replay(state, label, 1).summary
    assert state.runs[next(iter(state.runs))].images[0].size[0] > IMAGE_SIDE  # the wide picture was shrunk


# ---- 4. decode replay ----------------------------------------------------------------------------
def _steps(lt, kind: str, t: int) -> list[int]:
    steps = getattr(lt, f"decode_{kind}_steps") or []
    return [i for i, s in enumerate(steps) if s == t]


def _h2o_oracle(trace, t: int, layer: int | None = None, head: int | None = None) -> tuple[int, int]:
    """(evicted at step t, held after step t) (token, KV head) pairs, counted from the trace's lists."""
    evicted = held = 0
    grown = trace.step_lengths[t] - trace.span_length  # tokens fed back so far (never evicted by compression)
    for lt in trace.layers:
        if layer is not None and lt.layer != layer:
            continue
        rows = lt.decode_evictions or []
        steps = lt.decode_eviction_steps or []
        for h, kept in enumerate(lt.kept):
            if head is not None and h != head:
                continue
            evicted += sum(rows[i][h] >= 0 for i in _steps(lt, "eviction", t))
            gone = sum(rows[i][h] >= 0 for i, s in enumerate(steps) if s <= t)
            held += len(kept) + grown - gone
    return evicted, held


def _num(pattern: str, text: str) -> int | None:
    m = re.search(pattern, text)
    return None if m is None else int(m.group(1).replace(",", ""))


def test_replay_of_h2o_matches_the_recorded_evictions():
    label = _label(H2O)
    state = _opened(H2O)
    run = state.runs[label]
    trace = run.trace
    steps = H.replay_steps(trace)
    assert steps == len(trace.generated_tokens) == len(trace.step_bytes) > 1
    inspected = [c.split(" — ")[0] for _, c in H.inspect(state, label).gallery]
    total = 0
    for t in range(steps):
        view = H.replay(state, label, t)
        evicted, held = _h2o_oracle(trace, t)
        total += evicted
        shown = _num(r"\*\*(\d+)\*\* \(token, KV head\) pairs evicted at this step", view.summary)
        assert (shown or 0) == evicted, (t, view.summary)
        if evicted == 0:
            assert "Nothing changes in the prompt's cache" in view.summary
        assert _num(r"the cache holds ([\d,]+) \(token, KV head\) pairs", view.summary) == held
        assert f"{round(trace.step_bytes[t] / 1024, 1)} KiB on the device" in view.summary
        assert f"**Step {t} of {steps - 1}**" in view.summary
        # one panel per video frame, the same pictures as Inspect
        assert [c.split(" — ")[0] for _, c in view.gallery] == inspected
        assert all(c.endswith("% held") for _, c in view.gallery)
        series = {d.name: d for d in view.figure.data}
        assert list(series["held by this method"].y) == pytest.approx([b / 1024 for b in trace.step_bytes])
        assert list(series["this step"].x) == [t]
        # the answer so far: one piece per generated token, the current one marked
        pieces = trace.generated_tokens[: t + 1]
        assert [p for p, _ in view.answer] == [p if p.strip() else repr(p) for p in pieces]
        assert [k for _, k in view.answer] == [None] * t + ["this step"]
        text = "".join(pieces)
        assert run.answer.startswith(text) if t < steps - 1 else text.startswith(run.answer)
    assert total > 0  # the example really evicts during decoding
    # out-of-range steps are clamped; a bad step is refused
    assert H.replay(state, label, 999).summary == H.replay(state, label, steps - 1).summary
    with pytest.raises(UserError, match="whole number"):
        H.replay(state, label, "soon")


def test_replay_of_hybridkv_matches_the_recorded_retrievals():
    label = _label(HYBRID)
    state = _opened(HYBRID)
    trace = state.runs[label].trace
    dynamic = [lt for lt in trace.layers if lt.info.get("dynamic_heads")]
    assert dynamic
    seen = 0
    for t in range(H.replay_steps(trace)):
        view = H.replay(state, label, t)
        retrieved = fetched = 0
        for lt in dynamic:
            spans = lt.info["chunk_spans"]
            rows, steps = lt.decode_retrievals, lt.decode_retrieval_steps
            for j, _ in enumerate(lt.info["dynamic_heads"]):
                now = [set(rows[i][j]) for i in _steps(lt, "retrieval", t)]
                if not now:
                    continue
                earlier = [i for i, s in enumerate(steps) if s < t]
                before = set(rows[earlier[-1]][j]) if earlier else set(lt.info["initial_chunks"][j])
                retrieved += sum(spans[c][1] - spans[c][0] for c in now[-1])
                fetched += sum(spans[c][1] - spans[c][0] for c in now[-1] - before)
        m = re.search(
            r"\*\*(\d+)\*\* tokens' worth of chunks retrieved for this step's query by (\d+) dynamic "
            r"head\(s\) \(HybridKV\), (\d+) newly copied",
            view.summary,
        )
        assert m is not None, view.summary
        assert [int(g) for g in m.groups()] == [
            retrieved,
            sum(len(lt.info["dynamic_heads"]) for lt in dynamic),
            fetched,
        ], t
        seen += retrieved > 0
    assert seen > 0  # retrieval happens at some step


def _panel_of(view: H.ReplayView, group: int) -> tuple[Image.Image, int]:
    """The first replay panel of a video token group, without its caption band, and its frame index."""
    for img, caption in view.gallery:
        if f"(token group {group + 1})" in caption:
            frame = int(re.search(r"frame (\d+)", caption).group(1)) - 1
            w = img.width  # one (layer, head) pair: no side map, the picture is the panel's full width
            return img.crop((0, img.height - w, w, img.height)), frame
    raise AssertionError(f"no panel for token group {group + 1}")


def test_replay_panel_boxes_the_cell_evicted_at_this_step_and_leaves_held_cells_alone():
    label = _label(H2O)
    state = _opened(H2O)
    run = state.runs[label]
    trace, m = run.trace, run.trace.modality
    rows_, cols_, items_ = (np.asarray(x) for x in (m.row, m.col, m.item))
    # a video cell that H2O evicted during decoding (layer, KV head, step, position), not at the last step
    layer, head, t, pos = next(
        (lt.layer, h, s, row[h])
        for lt in trace.layers
        for row, s in zip(lt.decode_evictions or [], lt.decode_eviction_steps or [])
        for h in range(trace.num_kv_heads)
        if row[h] >= 0 and rows_[row[h]] >= 0 and s < len(trace.step_lengths) - 1
    )
    item = m.items[int(items_[pos])]
    lt = next(x for x in trace.layers if x.layer == layer)
    gone = {r[head] for r, s in zip(lt.decode_evictions, lt.decode_eviction_steps) if s <= t + 1}
    held_pos = next(p for p in lt.kept[head] if items_[p] == items_[pos] and rows_[p] >= 0 and p not in gone)

    def box(p: int, size: int) -> tuple[int, int, int, int]:
        r, c = int(rows_[p]), int(cols_[p])
        return (
            round(c * size / item.cols),
            round(r * size / item.rows),
            round((c + 1) * size / item.cols),
            round((r + 1) * size / item.rows),
        )

    def inside(pixels: np.ndarray, b: tuple[int, int, int, int], margin: int = 4) -> np.ndarray:
        return pixels[b[1] + margin : b[3] - margin, b[0] + margin : b[2] - margin]

    looks = {}
    for step in (t - 1, t, t + 1):
        view = H.replay(state, label, step, f"layer {layer}", f"KV head {head}")
        evicted = _num(r"\*\*(\d+)\*\* \(token, KV head\) pairs evicted", view.summary) or 0
        assert evicted == _h2o_oracle(trace, step, layer, head)[0] and (evicted == 1 or step != t)
        panel, frame = _panel_of(view, int(item.frame))
        original = np.asarray(run.videos[item.source].frames[frame].convert("RGB").resize(panel.size, Image.NEAREST))
        pixels = np.asarray(panel)
        e, k = box(pos, panel.width), box(held_pos, panel.width)
        mid_x, mid_y = (e[0] + e[2]) // 2, (e[1] + e[3]) // 2
        edges = [pixels[mid_y, e[0] + 1], pixels[mid_y, e[2] - 2], pixels[e[1] + 1, mid_x], pixels[e[3] - 2, mid_x]]
        looks[step] = [tuple(int(v) for v in px) == EVICTED for px in edges]
        # a held cell keeps the picture's own pixels (inside its rim) at every step
        assert np.array_equal(inside(pixels, k), inside(original, k)), step
        if step == t - 1:  # still held: untouched
            assert np.array_equal(inside(pixels, e), inside(original, e))
        else:  # evicted: faded
            assert not np.array_equal(inside(pixels, e), inside(original, e))
    assert looks == {t - 1: [False] * 4, t: [True] * 4, t + 1: [False] * 4}  # the vermillion box only at step t


# ---- 5. unique labels --------------------------------------------------------------------------
def test_colliding_chat_labels_keep_both_runs(store):
    state = H.AppState()
    message = {"text": "Which image has the orange circle?", "files": NEEDLES[:1]}
    first = _chat(store, state, message)
    state.clear_chat()
    second = _chat(store, state, message)
    base = "chat · snapkv @ 0.3 · turn 1"
    assert list(state.runs) == [base, f"{base} (2)"] and state.last == f"{base} (2)"
    a, b = state.runs.values()
    assert a.trace is not b.trace and a.label != b.label
    assert first.summary.startswith(f"**{base}**") and second.summary.startswith(f"**{base} (2)**")


def test_compare_sweep_keeps_every_method_and_budget(store):
    state = H.AppState()
    res = H.compare(
        store,
        state,
        {"text": "Which image has the orange circle?", "files": NEEDLES},
        ["snapkv", "h2o"],
        0.3,
        sweep="0.1, 0.5",
        max_new_tokens=3,
        num_frames=4,
        with_kl=False,
    )
    expected = ["compare · full"] + [f"compare · {m} @ {b}" for m in ("snapkv", "h2o") for b in ("0.3", "0.1", "0.5")]
    assert list(state.runs) == expected
    for label, run in state.runs.items():
        method, _, budget = label.removeprefix("compare · ").partition(" @ ")
        assert run.trace.method == method and (not budget or run.trace.budget == float(budget))
    assert [(r["method"], r["budget"]) for r in res.rows] == [("full", 1.0), ("snapkv", 0.3), ("h2o", 0.3)]
    assert sorted((p["method"], p["budget"]) for p in res.sweep) == sorted(
        (m, b) for m in ("snapkv", "h2o") for b in (0.1, 0.3, 0.5)
    )
    assert H.run_choices(state) == expected[::-1]


# ---- 6. presentation mode ------------------------------------------------------------------------
@pytest.mark.parametrize("present", [False, True])
def test_presentation_mode_enlarges_figures_and_pictures(present):
    state = _opened("01-snapkv.mmkvrun", H2O)
    state.present = present
    view = H.inspect(state, _label("01-snapkv.mmkvrun"))
    replayed = H.replay(state, _label(H2O), 2, "layer 0", "KV head 0")
    fonts = [f.layout.font.size for f in [*view.figures.values(), replayed.figure]]
    panels = [img for img, _ in [*view.gallery, *replayed.gallery]]
    assert fonts and panels
    if present:
        assert all(s >= 20 for s in fonts), fonts
        assert all(min(img.size) >= 384 for img in panels)
    else:
        assert all(s < 20 for s in fonts), fonts
        assert all(min(img.size) < 384 for img in panels)


# ---- 7. prompt preview ----------------------------------------------------------------------------
def test_preview_never_loads_a_model_and_counts_the_prompt():
    store = ModelStore(str(BUNDLED_MODEL))
    state = H.AppState()
    message = {"text": "Which image has the orange circle?", "files": NEEDLES}
    assert H.preview(store, state, message) == "" and not store.is_loaded()
    assert H.preview(store, state, {"text": "  ", "files": []}) == ""
    loaded = store.get()
    assert H.preview(store, state, {"text": "", "files": []}) == ""
    line = H.preview(store, state, message, num_frames=4, max_new_tokens=16)
    content = [*({"type": "image", "image": p} for p in NEEDLES), {"type": "text", "text": message["text"]}]
    prepared = adapter_for(loaded.model).prepare(
        loaded.model, loaded.processor, [{"role": "user", "content": content}], num_frames=4
    )
    counts = prepared.modality.counts()
    assert line.startswith(
        f"Prompt: {prepared.length:,} tokens (text {counts['text']:,} · 2 images {counts['image']:,})"
    )
    assert "fits" in line and "too big" not in line
    # after a turn the preview counts the conversation too
    _chat(store, state, message)
    longer = H.preview(store, state, {"text": "And the blue square?", "files": []})
    assert _num(r"Prompt: ([\d,]+) tokens", longer) > prepared.length


# ---- 8. no attachments ----------------------------------------------------------------------------
def test_chat_without_attachments_says_so(store):
    state = H.AppState()
    done = _chat(store, state, "What is a key-value cache?")
    assert done.done and "No image or video was attached" in done.status
    with_image = _chat(store, H.AppState(), {"text": "Which image has the orange circle?", "files": NEEDLES[:1]})
    assert with_image.done and "No image or video was attached" not in with_image.status


# ---- 9. too big for the device -------------------------------------------------------------------
def test_prompt_the_device_cannot_hold_is_refused(store, monkeypatch):
    state = H.AppState()
    message = {"text": "Which image has the orange circle?", "files": NEEDLES}
    _chat(store, state, message)
    before = _snapshot(state)
    monkeypatch.setattr(capacity, "device_free_bytes", lambda device: 1024)
    with pytest.raises(UserError) as err:
        _chat(store, state, message)
    msg = str(err.value)
    assert (
        "needs about" in msg and "to spare" in msg and "Shrink it to at most 0 tokens" in msg and "fewer images" in msg
    )
    assert _snapshot(state) == before
    with pytest.raises(UserError, match="Shrink it"):
        H.compare(
            store, state, message, ["snapkv"], 0.3, max_new_tokens=2, num_frames=4, with_kl=False, limits=Limits()
        )
    assert _snapshot(state) == before
    assert "too big" in H.preview(store, state, message)
    monkeypatch.undo()
    assert _chat(store, state, message).done and len(state.runs) == 2
