"""The app's event functions, called directly (no browser): every tab, and every bad input.

Bad inputs must come back as a visible message (the status box, starting with ⚠️) while the session
state stays as it was and the next good request still works.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from mmkv.methods import METHODS
from mmkv.testing.tiny import make_video, save_tiny
from mmkv.trace.core import Trace

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "mmkv" / "assets" / "examples"
torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:gradio.helpers")  # gr.Warning outside a request


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("model") / "tiny")
    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.setenv("MMKV_MODEL", str(model))
    sys.modules.pop("mmkv.app", None)
    module = importlib.import_module("mmkv.app")
    yield module
    torch.set_num_threads(threads)  # the store runs tiny models on one thread; leave others as they were
    mp.undo()
    sys.modules.pop("mmkv.app", None)


@pytest.fixture()
def state(app):
    return app._new_state()


def _example(i: int) -> dict:
    items = json.loads((EXAMPLES / "examples.json").read_text())
    return {"text": items[i]["text"], "files": [str(EXAMPLES / f) for f in items[i]["files"]]}


def _mixed() -> dict:
    """An image and a video in one message."""
    return {
        "text": "Which way does the ball move?",
        "files": [str(EXAMPLES / "needle_1.png"), str(EXAMPLES / "ball.webm")],
    }


def chat(app, state, message, method="snapkv", ratio=0.3, tokens=0, query_aware=True, max_new=4, frames=4, params=""):
    """All updates of one chat turn: (chatbot, input, status, summary, state, run dropdown) each."""
    return list(app.on_chat(message, state, method, ratio, tokens, query_aware, max_new, frames, params))


def compare(
    app,
    state,
    message,
    methods=("snapkv", "streamingllm"),
    ratio=0.3,
    tokens=0,
    sweep="",
    query_aware=True,
    max_new=4,
    frames=4,
    with_kl=True,
):
    return app.on_compare(
        message,
        list(methods),
        ratio,
        tokens,
        sweep,
        query_aware,
        max_new,
        frames,
        with_kl,
        state,
        progress=lambda *a, **k: None,
    )


# ---- happy paths (every tab) -------------------------------------------------------------------
def test_app_defaults_and_queue(app):
    assert app.DEFAULT_MODEL.endswith("tiny") and app.MODEL_NOTICE is None
    assert app.queue_kwargs()["default_concurrency_limit"] == 1 and app.queue_kwargs()["max_size"] >= 1
    kw = app.launch_kwargs()
    assert kw["server_name"] == "127.0.0.1" and kw["max_file_size"].endswith("mb") and "theme" in kw and "css" in kw
    model_events = {fn.fn.__name__: fn for fn in app.demo.fns.values() if fn.concurrency_id == "model"}
    assert set(model_events) == {"on_chat", "on_compare"} and all(
        fn.concurrency_limit == 1 for fn in model_events.values()
    )
    # loading a model has its own queue: a slow load never holds up chats on a loaded model
    loads = {fn.fn.__name__ for fn in app.demo.fns.values() if fn.concurrency_id == "load"}
    assert loads == {"on_page_load", "on_load_model"}


def test_default_model_falls_back_to_a_tiny_random_model(tmp_path, monkeypatch):
    from mmkv.ui import default_model

    monkeypatch.delenv("MMKV_MODEL", raising=False)
    bundled = tmp_path / "bundled"
    path, notice = default_model(tmp_path, bundled=bundled)
    assert path == str(tmp_path / ".cache" / "demo-model") and "random" in notice
    assert (tmp_path / ".cache" / "demo-model" / "config.json").is_file()
    bundled.mkdir()
    (bundled / "config.json").write_text("{}")
    assert default_model(tmp_path, bundled=bundled) == (str(bundled), None)
    monkeypatch.setenv("MMKV_MODEL", "org/some-model")
    assert default_model(tmp_path, bundled=bundled) == ("org/some-model", None)


def test_chat_streams_an_answer_and_records_a_run(app, state):
    new, status, _ = app.on_page_load(state)
    assert "parameters" in status
    updates = chat(app, state, _mixed())
    assert len(updates) >= 3  # "running", deltas, done
    display, box, status, summary, new_state, runs = updates[-1]
    assert status.startswith("Done") and "KV bytes" in summary and box is None
    assert display[-1]["role"] == "assistant" and display[-2]["content"] == _mixed()["text"]
    assert [m["content"]["path"] for m in display if isinstance(m["content"], dict)] == _mixed()["files"]
    assert list(new_state.runs) == [runs.value] and runs.value.startswith("chat · snapkv @ 0.3")
    run = new_state.runs[runs.value]
    assert len(run.images) == 1 and len(run.videos) == 1 and len(run.videos[0].frames) == 4
    # a second turn sees the whole conversation; clearing empties it
    updates = chat(app, new_state, {"text": "and now?", "files": []}, method="h2o")
    assert updates[-1][2].startswith("Done") and len(new_state.chat) == 4 and len(new_state.runs) == 2
    st, shown, box, status, _ = app.on_clear(new_state)
    assert shown == [] and box is None and st.chat == [] and len(st.runs) == 2


def test_compare_runs_full_and_methods_with_agreement(app, state):
    out = compare(app, state, _example(0))
    status, table, mem, speed, agree, kept, gallery, report, traces, new_state, runs = out
    assert status.startswith("Ran 3 generations"), status
    rows = table["data"]
    assert [r[0] for r in rows] == ["full", "snapkv", "streamingllm"] and table["headers"][0] == "method"
    full, snap = rows[0], rows[1]
    overlap, kl = table["headers"].index("overlap"), table["headers"].index("KL")
    assert full[overlap] == 1.0 and full[kl] == 0.0  # Full agrees with itself: overlap 1, KL 0
    kib = table["headers"].index("KV KiB kept / full")
    kept_kib = [float(r[kib].split("/")[0]) for r in (full, snap)]
    assert 0.0 <= snap[overlap] <= 1.0 and snap[kl] >= 0.0 and kept_kib[1] < kept_kib[0]  # fewer KV bytes kept
    assert all(isinstance(f, go.Figure) for f in (mem, speed, agree, kept))
    assert len(gallery) >= 2 and all(isinstance(img, Image.Image) for img, _ in gallery)
    assert Path(report).read_text().count("plotly") > 0
    loaded = json.loads(Path(traces).read_text())
    assert set(loaded) == {"full", "snapkv @ 0.3", "streamingllm @ 0.3"}
    assert Trace.from_dict(loaded["snapkv @ 0.3"]).method == "snapkv"
    assert runs.value in new_state.runs and len(new_state.runs) == 3


def test_compare_kl_is_zero_for_an_uncompressed_budget(app, state):
    out = compare(app, state, _example(2), methods=("snapkv",), ratio=1.0)
    rows, headers = out[1]["data"], out[1]["headers"]
    assert rows[1][headers.index("overlap")] == 1.0 and rows[1][headers.index("KL")] == pytest.approx(0.0, abs=1e-6)


def test_compare_budget_sweep_and_query_agnostic(app, state):
    out = compare(app, state, _example(0), methods=("snapkv",), sweep="0.1, 0.6", query_aware=False, with_kl=False)
    assert out[0].startswith("Ran 4 generations"), out[0]  # Full + snapkv at 0.3, 0.1, 0.6
    sweep = out[4]
    assert [t.name for t in sweep.data] == ["SnapKV: overlap"] and list(sweep.data[0].x) == [0.1, 0.3, 0.6]
    assert [r[0] for r in out[1]["data"]] == ["full", "snapkv"]  # the table shows the main budget


def test_inspect_renders_every_view_and_exports(app, state):
    compare(app, state, _mixed(), methods=("lookm",))
    label = next(k for k in state.runs if "lookm" in k)
    (
        layers,
        heads,
        summary,
        budget,
        pref,
        head_fig,
        gallery,
        strip,
        merges,
        trace_path,
        report_path,
        step,
        replay_summary,
        replay_gallery,
        replay_fig,
        replay_answer,
    ) = app.on_run_change(state, label, 0.5)
    assert layers.choices[0][0] == "all layers" and len(layers.choices) == 1 + 2
    assert len(heads.choices) == 1 + 2 and "lookm" in summary
    assert all(isinstance(f, go.Figure) for f in (budget, pref, head_fig))
    captions = [c for _, c in gallery]
    assert captions[0].startswith("image 1") and sum(c.startswith("video 1 · frame") for c in captions) == 4
    assert any(label == "kept" or label == "evicted" for _, label in strip)
    assert Trace.from_json(Path(trace_path)).method == "lookm"
    assert "<figcaption>" in Path(report_path).read_text()
    # one layer and head: merges listed (LOOK-M merges evicted visual tokens)
    out = app.on_inspect(state, label, "layer 1", "KV head 0", 0.4)
    summary, *_, merges, _, _ = out
    assert "layer 1, KV head 0" in summary and merges["data"] and merges["headers"][2] == "absorbed (evicted)"


def test_about_describes_every_method(app):
    from mmkv.ui.about import about_html

    html = about_html()
    for name in METHODS:
        assert f">{name}</h3>" in html


def test_method_change_fills_hyper_parameters(app):
    assert json.loads(app.on_method_change("snapkv")) == {
        "window": 32,
        "kernel": 5,
        "pooling": "avg",
        "gqa_reduce": "mean",
    }


def test_load_model_success_and_failure_keep_serving(app, state, tmp_path):
    st, status, shown, note = app.on_load_model(app.DEFAULT_MODEL, state)
    assert status.startswith("Model:") and "qwen2_5_vl" in status
    st, status, _, _ = app.on_load_model(str(tmp_path), state)  # a directory without config.json
    assert status.startswith("⚠️") and "config.json" in status and st.model == ""
    st, status, _, _ = app.on_load_model("not a valid id !!", state)
    assert status.startswith("⚠️") and "cannot load" in status.lower()
    assert chat(app, st, _example(0))[-1][2].startswith("Done")  # still serving on the previous model


# ---- bad inputs ---------------------------------------------------------------------------------
def _assert_message(updates_or_out, *needles):
    status = updates_or_out[-1][2] if isinstance(updates_or_out, list) else updates_or_out[0]
    assert status.startswith("⚠️"), status
    for needle in needles:
        assert needle in status, status


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    junk = tmp_path / "broken.png"
    junk.write_bytes(b"this is not a png at all" * 10)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    big = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big)
    long_video = make_video(tmp_path / "long.mp4", num_frames=10, fps=0.05)  # 200 s long
    fake_video = tmp_path / "fake.mp4"
    fake_video.write_bytes(b"\x00" * 2048)
    return {"junk": junk, "text": text, "big": big, "long": long_video, "fake": fake_video}


@pytest.mark.parametrize(
    "case, needles",
    [
        ("junk", ("cannot read broken.png as an image",)),
        ("text", ("unsupported file type .txt",)),
        ("big", ("the limit is 0.1 MB",)),
        ("long", ("200 s long", "trim")),
        ("fake", ("fake.mp4",)),
    ],
)
def test_bad_files_give_a_message_in_chat_and_compare(app, state, tmp_path, monkeypatch, case, needles):
    from mmkv.ui import Limits

    monkeypatch.setattr(app, "LIMITS", Limits(max_upload_mb=0.1))
    path = _bad_files(tmp_path)[case]
    message = {"text": "what is this?", "files": [str(path)]}
    updates = chat(app, state, message)
    _assert_message(updates, *needles)
    assert state.chat == [] and state.runs == {}
    _assert_message(compare(app, state, message), *needles)


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"message": {"text": "   ", "files": []}}, ("prompt is empty",)),
        ({"message": {"text": "zq " * 1500, "files": []}}, ("the model reads at most 4,096",)),
        ({"ratio": 1.5}, ("budget ratio must be in (0, 1]",)),
        ({"ratio": 0}, ("budget ratio must be in (0, 1]",)),
        ({"ratio": float("nan")}, ("finite",)),
        ({"tokens": -3}, ("whole number of tokens",)),
        ({"tokens": 2.5}, ("whole number of tokens",)),
        ({"method": "nope"}, ("unknown method",)),
        ({"params": "{not json"}, ("not valid JSON",)),
        ({"params": '{"window": 0}'}, ("bad hyper-parameters",)),
        ({"params": '{"bogus": 1}'}, ("no hyper-parameter bogus",)),
        ({"max_new": 10_000}, ("max new tokens",)),
        ({"max_new": 2.5}, ("max new tokens must be a whole number",)),
        ({"frames": 7.5}, ("frames per video must be a whole number",)),
        ({"frames": 0}, ("frames per video",)),
    ],
)
def test_bad_chat_requests_give_a_message_and_keep_the_session(app, state, kwargs, needles):
    message = kwargs.pop("message", _example(0))
    _assert_message(chat(app, state, message, **kwargs), *needles)
    assert state.chat == [] and state.display == [] and not state.runs


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"methods": ("full",)}, ("at least one method besides Full",)),
        ({"methods": ()}, ("at least one method besides Full",)),
        ({"sweep": "0.1, abc"}, ("must be a number",)),
        ({"sweep": "-2"}, ("swept budget",)),
        ({"methods": tuple(m for m in METHODS if m != "full"), "sweep": "0.1 0.2 0.3 0.4"}, ("the limit is",)),
        ({"ratio": 3}, ("budget ratio",)),
    ],
)
def test_bad_compare_requests_give_a_message(app, state, kwargs, needles):
    _assert_message(compare(app, state, _example(0), **kwargs), *needles)
    assert not state.runs


def test_bad_inspect_requests_give_a_message(app, state):
    out = app.on_inspect(state, None, None, None, 0.5)
    assert out[0].startswith("⚠️") and "nothing to inspect" in out[0]
    chat(app, state, _example(0))
    label = state.last
    assert app.on_inspect(state, label, "layer 99", None, 0.5)[0].startswith("⚠️")
    assert app.on_inspect(state, label, None, "KV head x", 0.5)[0].startswith("⚠️")
    assert app.on_inspect(state, "no such run", None, None, 0.5)[0].startswith("⚠️")
    assert "Nothing to inspect" in app.on_run_change(state, "no such run", 0.5)[2]
    assert not app.on_inspect(state, label, "layer 0", "KV head 1", 0.5)[0].startswith("⚠️")
