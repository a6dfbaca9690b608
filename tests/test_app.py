"""The app's event functions (``mmkv.app.AppUI``), called directly (no browser): every tab, and every bad input.

Each event returns a dict keyed by the components it updates; the tests read it by component, and check that
every key is one of the event's declared outputs. Bad inputs must come back as a visible message (a status box,
starting with ⚠️) while the session state stays as it was and the next good request still works. The logic
under the events is tested without Gradio in test_lecture.py, test_examples.py and test_entry_points.py.
"""

from __future__ import annotations

import json
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
    """The app over a tiny random Qwen2.5-VL (MMKV_MODEL), built the way `mmkv app` builds it."""
    from mmkv import app as app_module

    model = save_tiny("qwen2_5_vl", tmp_path_factory.mktemp("model") / "tiny")
    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.setenv("MMKV_MODEL", str(model))
    mp.setattr(app_module, "_CONTEXT", None)
    ui = app_module.build_app(app_module.AppContext.from_environment())
    yield ui
    torch.set_num_threads(threads)  # the store runs tiny models on one thread; leave others as they were
    mp.undo()


@pytest.fixture()
def state(app):
    from mmkv.ui.handlers import AppState

    return AppState()


def _outputs(ui, method) -> set:
    """The components event ``method`` (a bound AppUI method) is wired to update, over all its triggers."""
    deps = [d for d in ui.demo.fns.values() if d.fn == method]
    assert deps, f"{method.__name__} is not wired to any event"
    return {ui.demo.blocks[i] if isinstance(i, int) else i for d in deps for i in d.outputs}


def _keys_are_outputs(ui, method, out: dict) -> dict:
    assert set(out) <= _outputs(ui, method), set(out) - _outputs(ui, method)
    return out


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
    """All updates of one chat turn, each a dict keyed by component."""
    updates = list(app.on_chat(message, state, method, ratio, tokens, query_aware, max_new, frames, params))
    return [_keys_are_outputs(app, app.on_chat, u) for u in updates]


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
    out = app.on_compare(
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
    return _keys_are_outputs(app, app.on_compare, out)


# ---- happy paths (every tab) -------------------------------------------------------------------
def test_app_defaults_and_queue(app):
    from mmkv import app as app_module

    assert app.context.store.default.endswith("tiny") and app.context.notice is None
    assert app_module.context() is app.context  # the accelerator functions read the app's own context
    assert app_module.queue_kwargs()["default_concurrency_limit"] == 1 and app_module.queue_kwargs()["max_size"] >= 1
    kw = app_module.launch_kwargs(app.context.limits)
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


def test_importing_the_app_does_no_work():
    """`import mmkv.app` loads no model and builds no page (issue: work at import time); `demo` is lazy."""
    import subprocess
    import sys

    code = (
        "import sys, mmkv.app as a; "
        "assert a._CONTEXT is None and 'demo' not in vars(a), 'built at import'; "
        # model classes live in transformers.models.<family>.modeling_*; transformers 5.17 imports every image
        # processor at start-up (no model), so only the modeling modules count
        "assert not [m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m], "
        "'a model class was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_chat_streams_an_answer_and_records_a_run(app, state):
    out = _keys_are_outputs(app, app.on_page_load, app.on_page_load(state))
    assert "parameters" in out[app.model_status]
    updates = chat(app, state, _mixed())
    assert len(updates) >= 3  # "running", deltas, done
    assert all(set(u) == {app.chatbot, app.chat_status} for u in updates[:-1])  # streaming touches only these
    last = updates[-1]
    display, box, status, summary = last[app.chatbot], last[app.chat_in], last[app.chat_status], last[app.chat_summary]
    new_state, runs = last[app.state], last[app.run_dd]
    assert status.startswith("Done") and "KV bytes" in summary and box is None
    assert display[-1]["role"] == "assistant" and display[-2]["content"] == _mixed()["text"]
    assert [m["content"]["path"] for m in display if isinstance(m["content"], dict)] == _mixed()["files"]
    assert list(new_state.runs) == [runs.value] and runs.value.startswith("chat · snapkv @ 0.3")
    run = new_state.runs[runs.value]
    assert len(run.images) == 1 and len(run.videos) == 1 and len(run.videos[0].frames) == 4
    # a second turn sees the whole conversation; clearing empties it
    updates = chat(app, new_state, {"text": "and now?", "files": []}, method="h2o")
    assert updates[-1][app.chat_status].startswith("Done") and len(new_state.chat) == 4 and len(new_state.runs) == 2
    out = _keys_are_outputs(app, app.on_clear, app.on_clear(new_state))
    assert out[app.chatbot] == [] and out[app.chat_in] is None and out[app.state].chat == []
    assert len(out[app.state].runs) == 2


def test_compare_runs_full_and_methods_with_agreement(app, state):
    out = compare(app, state, _example(0))
    status, table, gallery, new_state, runs = (
        out[c] for c in (app.cmp_status, app.cmp_table, app.cmp_gallery, app.state, app.run_dd)
    )
    mem, speed, agree, kept = (out[c] for c in (app.mem_plot, app.speed_plot, app.agree_plot, app.kept_plot))
    report, traces = out[app.cmp_report], out[app.cmp_traces]
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
    rows, headers = out[app.cmp_table]["data"], out[app.cmp_table]["headers"]
    assert rows[1][headers.index("overlap")] == 1.0 and rows[1][headers.index("KL")] == pytest.approx(0.0, abs=1e-6)


def test_compare_budget_sweep_and_query_agnostic(app, state):
    out = compare(app, state, _example(0), methods=("snapkv",), sweep="0.1, 0.6", query_aware=False, with_kl=False)
    status = out[app.cmp_status]
    assert status.startswith("Ran 4 generations"), status  # Full + snapkv at 0.3, 0.1, 0.6
    sweep = out[app.agree_plot]
    assert [t.name for t in sweep.data] == ["SnapKV: overlap"] and list(sweep.data[0].x) == [0.1, 0.3, 0.6]
    assert [r[0] for r in out[app.cmp_table]["data"]] == ["full", "snapkv"]  # the table shows the main budget


def test_inspect_renders_every_view_and_exports(app, state):
    compare(app, state, _mixed(), methods=("lookm",))
    label = next(k for k in state.runs if "lookm" in k)
    out = _keys_are_outputs(app, app.on_run_change, app.on_run_change(state, label, 0.5))
    layers, heads, summary, gallery, strip = (
        out[c] for c in (app.layer_dd, app.head_dd, app.ins_summary, app.ins_gallery, app.strip)
    )
    budget, pref, head_fig = out[app.budget_plot], out[app.pref_plot], out[app.heads_plot]
    trace_path, report_path = out[app.trace_dl], out[app.report_dl]
    assert out[app.replay_summary] and out[app.step].maximum >= 0
    assert layers.choices[0][0] == "all layers" and len(layers.choices) == 1 + 2
    assert len(heads.choices) == 1 + 2 and "lookm" in summary
    assert all(isinstance(f, go.Figure) for f in (budget, pref, head_fig))
    captions = [c for _, c in gallery]
    assert captions[0].startswith("image 1") and sum(c.startswith("video 1 · frame") for c in captions) == 4
    assert any(label == "kept" or label == "evicted" for _, label in strip)
    assert Trace.from_json(Path(trace_path)).method == "lookm"
    assert "<figcaption>" in Path(report_path).read_text()
    # one layer and head: merges listed (LOOK-M merges evicted visual tokens)
    out = _keys_are_outputs(app, app.on_inspect, app.on_inspect(state, label, "layer 1", "KV head 0", 0.4))
    summary, merges = out[app.ins_summary], out[app.merges]
    assert "layer 1, KV head 0" in summary and merges["data"] and merges["headers"][2] == "absorbed (evicted)"


def test_about_describes_every_method(app):
    from mmkv.ui.about import about_html

    html = about_html()
    for name in METHODS:
        assert f">{name}</h3>" in html


def test_method_change_fills_hyper_parameters(app):
    assert json.loads(app.on_method_change("snapkv")[app.params]) == {
        "window": 32,
        "kernel": 5,
        "pooling": "avg",
        "gqa_reduce": "mean",
    }


def test_load_model_success_and_failure_keep_serving(app, state, tmp_path):
    def load(name):
        out = _keys_are_outputs(app, app.on_load_model, app.on_load_model(name, state))
        return out[app.state], out[app.model_status]

    st, status = load(app.context.store.default)
    assert status.startswith("Model:") and "qwen2_5_vl" in status
    st, status = load(str(tmp_path))  # a directory without config.json
    assert status.startswith("⚠️") and "config.json" in status and st.model == ""
    st, status = load("not a valid id !!")
    assert status.startswith("⚠️") and "cannot load" in status.lower()
    assert chat(app, st, _example(0))[-1][app.chat_status].startswith("Done")  # still serving on the previous model


# ---- bad inputs ---------------------------------------------------------------------------------
def _assert_message(status: str, *needles):
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

    monkeypatch.setattr(app.context, "limits", Limits(max_upload_mb=0.1))
    path = _bad_files(tmp_path)[case]
    message = {"text": "what is this?", "files": [str(path)]}
    updates = chat(app, state, message)
    _assert_message(updates[-1][app.chat_status], *needles)
    assert updates[-1][app.chat_in] == {"text": "what is this?", "files": []}  # the question stays, the file goes
    assert state.chat == [] and state.runs == {}
    _assert_message(compare(app, state, message)[app.cmp_status], *needles)


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
    _assert_message(chat(app, state, message, **kwargs)[-1][app.chat_status], *needles)
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
    _assert_message(compare(app, state, _example(0), **kwargs)[app.cmp_status], *needles)
    assert not state.runs


def test_bad_inspect_requests_give_a_message(app, state):
    def summary(label, layer, head):
        return app.on_inspect(state, label, layer, head, 0.5)[app.ins_summary]

    assert summary(None, None, None).startswith("⚠️") and "nothing to inspect" in summary(None, None, None)
    chat(app, state, _example(0))
    label = state.last
    assert summary(label, "layer 99", None).startswith("⚠️")
    assert summary(label, None, "KV head x").startswith("⚠️")
    assert summary("no such run", None, None).startswith("⚠️")
    assert "Nothing to inspect" in app.on_run_change(state, "no such run", 0.5)[app.ins_summary]
    assert not summary(label, "layer 0", "KV head 1").startswith("⚠️")
    assert app.on_replay(state, "no such run", 0, None, None)[app.replay_summary].startswith("⚠️")


def test_replay_steps_and_play_stop_at_the_ends(app, state):
    chat(app, state, _example(0), max_new=4)
    label = state.last
    last = app._last_step(state, label)
    assert last >= 1
    assert app.on_prev(0, state, label) == {app.step: 0} and app.on_next(last, state, label) == {app.step: last}
    assert app.on_next("junk", state, label) == {app.step: 0}  # an unreadable step goes back to the start
    started = _keys_are_outputs(app, app.on_play, app.on_play(False))
    assert started[app.playing] is True and started[app.timer].active is True
    ticked = _keys_are_outputs(app, app.on_tick, app.on_tick(last - 1, state, label, True))
    assert ticked[app.step] == last and ticked[app.playing] is False and ticked[app.timer].active is False
