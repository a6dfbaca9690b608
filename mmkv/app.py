"""mmkv — see what multimodal KV-cache compression keeps: the Gradio app.

    mmkv app                              # installed command; serves http://127.0.0.1:7860
    python app.py                         # the same from a checkout (and the Hugging Face Space entry)
    MMKV_MODEL=Qwen/Qwen2.5-VL-3B-Instruct mmkv app

Tabs: Chat (streaming multimodal chat with a method and budget), Compare (the same input through
several methods: answers, bytes, times, agreement with Full), Inspect (what was kept, per layer and
head, painted over every image and video frame), About (how each method works).

This module only lays out components and forwards events to :mod:`mmkv.ui.handlers` (no Gradio
there) and :mod:`viz` (figures); errors users can fix come back as a visible message and a toast,
and the app keeps serving. It needs the ``app`` extra (``pip install "mmkv[app]"``: Gradio, plotly).
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # app start time is reported from here (imports included)

import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))

try:  # ZeroGPU: `spaces` must be imported before torch touches CUDA (app.py imports it first); elsewhere a no-op.
    import spaces

    def gpu(duration: int = 120) -> Callable[[Callable], Callable]:
        return spaces.GPU(duration=duration)
except Exception:  # not installed / not on a Space
    spaces = None

    def gpu(duration: int = 120) -> Callable[[Callable], Callable]:
        return lambda fn: fn


import gradio as gr  # noqa: E402

from viz import STRIP_COLORS  # noqa: E402

from .bundled import EXAMPLES_DIR  # noqa: E402
from .methods import METHODS  # noqa: E402
from .trace.runfile import RUNS_DIR  # noqa: E402
from .ui import Limits, UserError, default_model  # noqa: E402
from .ui import handlers as H  # noqa: E402
from .ui.about import about_html  # noqa: E402
from .ui.inputs import params_text  # noqa: E402
from .ui.models import ModelStore  # noqa: E402

log = logging.getLogger("mmkv.app")

LIMITS = Limits()
DEFAULT_MODEL, MODEL_NOTICE = default_model()
STORE = ModelStore(DEFAULT_MODEL)
METHOD_NAMES = sorted(METHODS)
DEFAULT_COMPARE = [m for m in ("full", "snapkv", "adakv") if m in METHODS]
CSS = """
#title h1 {margin-bottom: 0}
.status-box {min-height: 1.5em}
/* thumbnails show the whole picture; its title is drawn above it (captions over the cells hid them) */
#inspect-gallery .thumbnail-item .caption-label, #compare-gallery .thumbnail-item .caption-label,
#replay-gallery .thumbnail-item .caption-label {display: none}
#compare-table table, #inspect-merges table {min-width: 560px}
#compare-table .table-wrap, #inspect-merges .table-wrap {overflow-x: auto}
#compare-table th, #compare-table th *, #inspect-merges th, #inspect-merges th * {word-break: keep-all !important;
  overflow-wrap: normal !important; hyphens: none !important}
@media (max-width: 700px) {
  .gradio-container {padding: 4px !important}
  /* a phone shows method, budget, answer, kept and bytes; the times and agreement are in the charts below */
  #compare-table [aria-colindex="6"], #compare-table [aria-colindex="7"], #compare-table [aria-colindex="8"],
  #compare-table [aria-colindex="9"], #compare-table [aria-colindex="10"] {display: none}
  #chatbot {height: 360px !important}
}
/* plotly's mode bar covers titles and colour bars on small screens */
@media (max-width: 900px) { .js-plotly-plot .modebar-container {display: none !important} }
body.mmkv-present .js-plotly-plot .modebar-container {display: none !important}
body.mmkv-present #inspect-strip, body.mmkv-present #replay-answer {font-size: 22px}
/* presentation mode (switch, or ?present=1 in the URL): large type, one figure per screen */
body.mmkv-present .gradio-container {font-size: 22px; --text-sm: 18px; --text-md: 22px; --text-lg: 26px; --text-xl: 32px;
  --body-text-size: 22px; --prose-text-size: 22px; --input-text-size: 20px; --block-label-text-size: 18px;
  --block-title-text-size: 20px; --button-large-text-size: 22px; --button-small-text-size: 18px; --checkbox-label-text-size: 20px}
body.mmkv-present .prose, body.mmkv-present .md, body.mmkv-present table {font-size: 22px !important}
body.mmkv-present #replay-gallery .grid-container {grid-template-columns: repeat(2, minmax(0, 1fr)) !important}
body.mmkv-present .plot-row {flex-direction: column !important}
body.mmkv-present .plot-row > * {min-width: 100% !important}
body.mmkv-present .js-plotly-plot, body.mmkv-present .plot-row .plot-container {min-height: 70vh}
body.mmkv-present button[role="tab"] {font-size: 22px; padding: 10px 18px}
body.mmkv-present #inspect-gallery .grid-container {grid-template-columns: repeat(2, minmax(0, 1fr)) !important}
"""

#: Keyboard shortcuts (never while typing in a field): 1-4 switch tabs, p toggles presentation mode,
#: the arrow keys step the decode replay, space plays / pauses it.
KEYS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target; const tag = (t && t.tagName || '').toLowerCase();
  if (['input', 'textarea', 'select'].includes(tag) || (t && t.isContentEditable) || e.ctrlKey || e.metaKey || e.altKey) return;
  const click = (id) => { const el = document.querySelector('#' + id); if (el) { el.click(); e.preventDefault(); } };
  const tabs = document.querySelectorAll('button[role="tab"]');
  if (e.key >= '1' && e.key <= '4' && tabs[+e.key - 1]) { tabs[+e.key - 1].click(); e.preventDefault(); }
  else if (e.key === 'ArrowRight') click('replay-next');
  else if (e.key === 'ArrowLeft') click('replay-prev');
  else if (e.key === ' ') click('replay-play');
  else if (e.key === 'p') { const box = document.querySelector('#present-toggle input'); if (box) { box.click(); e.preventDefault(); } }
});
</script>
"""
PRESENT_FROM_URL_JS = """
() => { const v = new URLSearchParams(window.location.search).get('present');
        const on = v !== null && !['0', 'false', 'no', 'off'].includes(v.toLowerCase());
        document.body.classList.toggle('mmkv-present', on); return on; }
"""
TOGGLE_PRESENT_JS = "(on, ...rest) => { document.body.classList.toggle('mmkv-present', !!on); return [on, ...rest]; }"


def _examples() -> list[dict[str, Any]]:
    import json

    items = json.loads((EXAMPLES_DIR / "examples.json").read_text(encoding="utf-8"))
    return [{**e, "files": [str(EXAMPLES_DIR / f) for f in e["files"]]} for e in items]


def _params_json(e: dict[str, Any]) -> str:
    """The example method's hyper-parameters as the JSON box shows them, with the example's own values."""
    import json

    return json.dumps({**json.loads(params_text(e["method"])), **e.get("params", {})}, indent=1)


def _example_label(e: dict[str, Any]) -> str:
    return f"{e['text'].splitlines()[-1]} — {e['method']} @ {e['budget']:g}"


def problem(exc: BaseException) -> str:
    """Show an error as a toast and return it as a status message (the app keeps serving)."""
    if isinstance(exc, UserError):
        message = str(exc)
    else:
        log.exception("unexpected error")
        message = (
            f"something went wrong ({type(exc).__name__}). The app is still running: try again, "
            "or with a smaller input / budget"
        )
    gr.Warning(message)
    return f"⚠️ {message}"


def _new_state() -> H.AppState:
    return H.AppState()


# ---- model and presentation mode ---------------------------------------------------------------
def on_page_load(state: H.AppState) -> tuple[H.AppState, str, Any]:
    try:
        loaded = STORE.get(state.model or None)
        return state, f"Model: {loaded.describe()}", gr.skip()
    except Exception as exc:  # noqa: BLE001 - shown to the user
        return state, problem(exc), gr.skip()


def on_load_model(name: str, state: H.AppState) -> tuple[H.AppState, str, list, str]:
    try:
        state, status = H.select_model(STORE, state, name)
        return state, status, state.display, "New model: the conversation was cleared."
    except Exception as exc:  # noqa: BLE001
        return state, problem(exc), state.display, gr.skip()


def on_present(present: bool, state: H.AppState, label: str, layer: str, head: str, alpha: float) -> tuple:
    """Presentation mode on/off: re-draw the Inspect figures at the new size (Compare's at its next run)."""
    state.present = bool(present)
    if not state.runs:
        return (state,) + (gr.skip(),) * 9
    return (state, *on_inspect(state, label, layer, head, alpha))


# ---- Chat ------------------------------------------------------------------------------------
def on_method_change(method: str) -> str:
    try:
        return params_text(method)
    except Exception as exc:  # noqa: BLE001
        problem(exc)
        return "{}"


def _run_dropdown(state: H.AppState) -> Any:
    return gr.Dropdown(choices=H.run_choices(state), value=state.last)


def on_preview(message: Any, state: H.AppState, num_frames: Any, max_new_tokens: Any) -> str:
    """The prompt's size before it runs (tokens per modality, KV bytes, whether it fits)."""
    try:
        return H.preview(STORE, state, message, num_frames, max_new_tokens, LIMITS)
    except Exception as exc:  # noqa: BLE001 - a preview never toasts
        return f"⚠️ {exc}" if isinstance(exc, UserError) else ""


@gpu(duration=120)
def on_chat(message, state, method, ratio, tokens, query_aware, max_new_tokens, num_frames, params):
    """Streams (chatbot, input box, status, summary, state, inspect run dropdown)."""
    try:
        for update in H.chat_turn(
            STORE, state, message, method, ratio, tokens, query_aware, max_new_tokens, num_frames, params, LIMITS
        ):
            if update.done:
                yield update.display, None, update.status, update.summary, update.state, _run_dropdown(update.state)
            else:
                yield update.display, gr.skip(), update.status, gr.skip(), gr.skip(), gr.skip()
    except Exception as exc:  # noqa: BLE001
        # keep the question, drop the attachments that failed (they would stay as broken icons)
        text, _ = H.message_parts(message)
        yield state.display, {"text": text, "files": []}, problem(exc), gr.skip(), state, gr.skip()


def on_clear(state: H.AppState) -> tuple[H.AppState, list, None, str, str]:
    state.clear_chat()
    return state, [], None, "Conversation cleared.", ""


# ---- Compare ---------------------------------------------------------------------------------
@gpu(duration=180)
def _compare(
    message, methods, ratio, tokens, sweep, query_aware, max_new_tokens, num_frames, with_kl, state, progress=None
):
    return H.compare(
        STORE,
        state,
        message,
        methods,
        ratio,
        tokens,
        sweep,
        query_aware,
        max_new_tokens,
        num_frames,
        with_kl,
        LIMITS,
        progress,
    )


def _compare_outputs(res: H.CompareResult) -> tuple:
    f = res.figures
    table = {"headers": H.COMPARE_HEADERS, "data": res.table()}
    return (
        res.status,
        table,
        f["memory"],
        f["speed"],
        f["agreement"],
        f["kept"],
        res.gallery,
        res.report_path,
        res.traces_path,
        res.state,
        _run_dropdown(res.state),
    )


def on_compare(
    message,
    methods,
    ratio,
    tokens,
    sweep,
    query_aware,
    max_new_tokens,
    num_frames,
    with_kl,
    state,
    progress=gr.Progress(),
):
    """(status, table, memory, speed, agreement, kept map, gallery, report file, traces file, state, run dropdown)."""
    try:
        # ZeroGPU runs _compare in a worker process: a progress callback cannot cross that boundary
        report = None if ZERO_GPU else (lambda f, d: progress(f, desc=d))
        res = _compare(
            message, methods, ratio, tokens, sweep, query_aware, max_new_tokens, num_frames, with_kl, state, report
        )
    except Exception as exc:  # noqa: BLE001
        return (problem(exc),) + (gr.skip(),) * 8 + (state, gr.skip())
    return _compare_outputs(res)


def on_compare_saved(files, examples, state):
    """Compare saved runs (uploaded files and/or shipped example runs): no model is run."""
    try:
        res = H.compare_runs(state, [*(files or []), *H.example_run_files(examples)])
    except Exception as exc:  # noqa: BLE001
        return (problem(exc),) + (gr.skip(),) * 8 + (state, gr.skip())
    return _compare_outputs(res)


# ---- Inspect ---------------------------------------------------------------------------------
def _inspect_outputs(view: H.InspectView) -> tuple:
    merges = {
        "headers": ["layer", "KV head", "absorbed (evicted)", "into (kept)", "similarity"],
        "data": [list(r.values()) for r in view.merges] or [["", "", "no merges for this selection", "", ""]],
    }
    f = view.figures
    return (
        view.summary,
        f["budget"],
        f["preference"],
        f["heads"],
        view.gallery,
        view.strip,
        merges,
        view.trace_path,
        view.report_path,
    )


def on_inspect(state, label, layer, head, alpha):
    try:
        return _inspect_outputs(H.inspect(state, label, layer, head, alpha))
    except Exception as exc:  # noqa: BLE001
        message = problem(exc)
        return (message,) + (gr.skip(),) * 8


def _replay_outputs(view: H.ReplayView | None, message: str = "") -> tuple:
    if view is None:
        return (message, gr.skip(), gr.skip(), gr.skip())
    return (view.summary, view.gallery, view.figure, view.answer)


def on_replay(state, label, step, layer, head):
    """Draw the cache at one decode step."""
    try:
        return _replay_outputs(H.replay(state, label, step, layer, head))
    except Exception as exc:  # noqa: BLE001
        return _replay_outputs(None, problem(exc))


def on_run_change(state, label, alpha):
    """A new run was picked: reset the layer / head selectors and the replay to its shape, and render it."""
    trace = state.runs[label].trace if label in state.runs else None
    layers = gr.Dropdown(choices=H.layer_choices(trace), value=H.ALL_LAYERS)
    heads = gr.Dropdown(choices=H.head_choices(trace), value=H.ALL_HEADS)
    if trace is None:
        return (
            layers,
            heads,
            "Nothing to inspect yet: send a message in **Chat**, run **Compare** or open a saved run.",
            *(gr.skip(),) * 8,
            gr.skip(),
            *(gr.skip(),) * 4,
        )
    steps = max(H.replay_steps(trace), 1)
    slider = gr.Slider(minimum=0, maximum=steps - 1, value=0, step=1, interactive=steps > 1)
    return (
        layers,
        heads,
        *on_inspect(state, label, None, None, alpha),
        slider,
        *on_replay(state, label, 0, None, None),
    )


def on_open_runs(files, examples, state):
    """Open saved runs (uploads and/or shipped examples) in Inspect; the newest is selected."""
    try:
        state, status = H.open_runs(state, [*(files or []), *H.example_run_files(examples)])
    except Exception as exc:  # noqa: BLE001
        return state, problem(exc), gr.skip()
    return state, status, _run_dropdown(state)


def on_save_run(state, label):
    try:
        return H.save_run(state, label)
    except Exception as exc:  # noqa: BLE001
        problem(exc)
        return None


def _last_step(state: H.AppState, label: str) -> int:
    """The replay's last step for run ``label`` (0 when there is no such run or no decode record)."""
    trace = state.runs[label].trace if label in state.runs else None
    return max(H.replay_steps(trace) - 1, 0)


def on_step(step: Any, delta: int, state, label) -> Any:
    last = _last_step(state, label)
    try:
        value = int(step or 0) + delta
    except (TypeError, ValueError):
        value = 0
    return min(max(value, 0), last)


def on_play(playing: bool) -> tuple[bool, Any, Any]:
    playing = not playing
    return playing, gr.Timer(active=playing), gr.Button("⏸ Pause" if playing else "▶ Play")


def on_tick(step, state, label, playing):
    """One step forward while playing; stops at the last step."""
    last = _last_step(state, label)
    value = min(int(step or 0) + 1, last)
    if value >= last:
        return value, False, gr.Timer(active=False), gr.Button("▶ Play")
    return value, playing, gr.skip(), gr.skip()


# ---- layout ----------------------------------------------------------------------------------
def _settings(prefix: str, compare: bool) -> dict[str, Any]:
    c: dict[str, Any] = {}
    if compare:
        c["methods"] = gr.CheckboxGroup(
            METHOD_NAMES,
            value=DEFAULT_COMPARE,
            label="Methods (Full always runs as the reference)",
            elem_id=f"{prefix}-methods",
        )
    else:
        c["method"] = gr.Dropdown(
            METHOD_NAMES,
            value="snapkv" if "snapkv" in METHODS else METHOD_NAMES[0],
            label="Method",
            elem_id=f"{prefix}-method",
        )
    c["ratio"] = gr.Slider(
        0.01,
        1.0,
        value=0.3,
        step=0.01,
        label="Budget (share of tokens kept per layer and KV head)",
        elem_id=f"{prefix}-budget",
    )
    # precision=None: a fractional token count reaches the check (and is refused) instead of being rounded
    c["tokens"] = gr.Number(
        value=0,
        precision=None,
        minimum=0,
        label="…or an absolute budget in tokens per head (0 = use the share)",
        elem_id=f"{prefix}-tokens",
    )
    if compare:
        c["sweep"] = gr.Textbox(
            label="Budget sweep (optional)",
            placeholder="e.g. 0.1, 0.3, 0.6 — plots budget vs quality",
            elem_id=f"{prefix}-sweep",
        )
    with gr.Accordion("Generation settings", open=False):
        c["query_aware"] = gr.Checkbox(
            value=True, label="Query-aware (compress after reading the question, as in the papers)"
        )
        c["max_new_tokens"] = gr.Slider(
            1, LIMITS.max_new_tokens, value=24 if compare else 48, step=1, label="Max new tokens"
        )
        c["num_frames"] = gr.Slider(1, LIMITS.max_frames, value=8, step=1, label="Frames sampled per video")
        if compare:
            c["with_kl"] = gr.Checkbox(
                value=True, label="Next-token KL vs Full (teacher-forced; one extra prefill per method)"
            )
    return c


def _saved_run_picker(prefix: str) -> tuple[Any, Any]:
    """A file box for .mmkvrun files and a list of the shipped example runs."""
    runs = H.example_run_choices()
    files = gr.File(
        file_count="multiple", file_types=[".mmkvrun"], label="Saved runs (.mmkvrun)", elem_id=f"{prefix}-runfiles"
    )
    examples = gr.Dropdown(
        runs,
        value=[],
        multiselect=True,
        label="…or example runs made with the bundled model",
        elem_id=f"{prefix}-example-runs",
    )
    return files, examples


def build_demo() -> gr.Blocks:
    examples = _examples()
    labels = [_example_label(e) for e in examples]
    chat_rows = [
        [{"text": e["text"], "files": e["files"]}, e["method"], e["budget"], _params_json(e)] for e in examples
    ]
    compare_rows = [
        [{"text": e["text"], "files": e["files"]}, list(dict.fromkeys([e["method"], "snapkv", "h2o"])), e["budget"]]
        for e in examples
    ]
    # delete_cache: exports are rewritten at every Inspect render; drop cached copies older than an hour
    with gr.Blocks(title="mmkv — multimodal KV-cache compression", delete_cache=(1800, 3600)) as demo:
        state = gr.State(_new_state, delete_callback=H.AppState.cleanup)  # removes the session's export folder
        gr.Markdown(
            "# mmkv — see what multimodal KV-cache compression keeps\n"
            "Upload images or a video, ask a question, and watch which image patches, video frames and "
            "words each method keeps in the model's memory.",
            elem_id="title",
        )
        if MODEL_NOTICE:
            gr.Markdown(f"> ℹ️ {MODEL_NOTICE}", elem_id="model-notice")
        with gr.Row(equal_height=True):
            model_box = gr.Dropdown(
                STORE.choices(),
                value=STORE.label(STORE.default),
                allow_custom_value=STORE.settings.allowed_models is None,
                label="Model",
                scale=4,
                elem_id="model-name",
            )
            load_btn = gr.Button("Load model", scale=1, elem_id="model-load")
            present = gr.Checkbox(False, label="Presentation mode (p)", scale=1, elem_id="present-toggle")
        model_status = gr.Markdown(
            f"Model: `{STORE.label(STORE.default)}` (loads on first use)", elem_id="model-status"
        )

        with gr.Tabs(overflow_behavior="wrap") as tabs:
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        cs = _settings("chat", compare=False)
                        with gr.Accordion("Method hyper-parameters (JSON)", open=False):
                            params = gr.Code(
                                params_text(cs["method"].value),
                                language="json",
                                label="hyper-parameters",
                                elem_id="chat-params",
                            )
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(height=420, label="Conversation", elem_id="chatbot")
                        # any file type reaches the checks, which say what is wrong (a refused type would only toast)
                        chat_in = gr.MultimodalTextbox(
                            file_count="multiple",
                            placeholder="Ask about your images or video (attach with the clip)…",
                            label="Message",
                            elem_id="chat-input",
                            sources=["upload"],
                        )
                        chat_preview = gr.Markdown(elem_id="chat-preview")
                        with gr.Row():
                            clear_btn = gr.Button("Clear conversation", size="sm", elem_id="chat-clear")
                            to_inspect = gr.Button("Open Inspect", size="sm", elem_id="chat-to-inspect")
                        chat_status = gr.Markdown(elem_id="chat-status", elem_classes=["status-box"])
                        chat_summary = gr.Markdown(elem_id="chat-summary")
                        gr.Examples(
                            chat_rows,
                            inputs=[chat_in, cs["method"], cs["ratio"], params],
                            example_labels=labels,
                            label="Examples (click one — it sets the method and budget too — then press Enter)",
                            elem_id="chat-examples",
                        )

            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        cmp_in = gr.MultimodalTextbox(
                            file_count="multiple",
                            submit_btn=False,
                            placeholder="Question + images/video to run through every method",
                            label="Input",
                            elem_id="compare-input",
                            sources=["upload"],
                        )
                        cmp_preview = gr.Markdown(elem_id="compare-preview")
                        cc = _settings("compare", compare=True)
                        gr.Examples(
                            compare_rows,
                            inputs=[cmp_in, cc["methods"], cc["ratio"]],
                            example_labels=labels,
                            label="Examples",
                            elem_id="compare-examples",
                        )
                        cmp_btn = gr.Button("Run compare", variant="primary", elem_id="compare-run")
                        with gr.Accordion("Compare saved runs (no model needed)", open=False):
                            cmp_files, cmp_examples = _saved_run_picker("compare")
                            cmp_saved_btn = gr.Button("Compare saved runs", elem_id="compare-saved-run")
                    with gr.Column(scale=3):
                        cmp_status = gr.Markdown(elem_id="compare-status", elem_classes=["status-box"])
                        cmp_table = gr.Dataframe(
                            headers=H.COMPARE_HEADERS,
                            label="Answers and costs",
                            wrap=True,
                            interactive=False,
                            elem_id="compare-table",
                            max_chars=60,
                            column_widths=[
                                "96px",
                                "64px",
                                "220px",
                                "60px",
                                "104px",
                                "72px",
                                "84px",
                                "72px",
                                "56px",
                                "72px",
                            ],
                        )
                        with gr.Row(elem_classes=["plot-row"]):
                            mem_plot = gr.Plot(label="Memory", show_label=False, elem_id="compare-memory")
                            speed_plot = gr.Plot(label="Time", show_label=False, elem_id="compare-speed")
                        with gr.Row(elem_classes=["plot-row"]):
                            agree_plot = gr.Plot(
                                label="Agreement with Full", show_label=False, elem_id="compare-agreement"
                            )
                            kept_plot = gr.Plot(label="Kept tokens", show_label=False, elem_id="compare-kept")
                        cmp_gallery = gr.Gallery(
                            label="What each method kept (all layers and heads; title above each picture)",
                            columns=3,
                            height="auto",
                            object_fit="contain",
                            elem_id="compare-gallery",
                        )
                        with gr.Row():
                            cmp_report = gr.DownloadButton("Download charts (HTML)", elem_id="compare-report")
                            cmp_traces = gr.DownloadButton("Download traces (JSON)", elem_id="compare-traces")

            with gr.Tab("Inspect", id="inspect"):
                with gr.Row():
                    run_dd = gr.Dropdown([], label="Run", scale=3, elem_id="inspect-run")
                    layer_dd = gr.Dropdown(
                        [H.ALL_LAYERS], value=H.ALL_LAYERS, label="Layer", scale=1, elem_id="inspect-layer"
                    )
                    head_dd = gr.Dropdown(
                        [H.ALL_HEADS], value=H.ALL_HEADS, label="KV head", scale=1, elem_id="inspect-head"
                    )
                    alpha = gr.Slider(
                        0.1, 0.9, value=0.5, step=0.05, label="Fade of evicted cells", scale=1, elem_id="inspect-alpha"
                    )
                with gr.Accordion("Open a saved run · save this one", open=False, elem_id="inspect-saved"):
                    with gr.Row():
                        ins_files, ins_examples = _saved_run_picker("inspect")
                    with gr.Row():
                        open_btn = gr.Button("Open in Inspect", elem_id="inspect-open-run")
                        save_btn = gr.DownloadButton("Download this run (.mmkvrun)", elem_id="inspect-save-run")
                ins_summary = gr.Markdown(
                    "Nothing to inspect yet: send a message in **Chat**, run **Compare** or open a saved run.",
                    elem_id="inspect-summary",
                )
                ins_gallery = gr.Gallery(
                    label="What the cache kept over each image and frame",
                    columns=4,
                    height="auto",
                    object_fit="contain",
                    elem_id="inspect-gallery",
                )
                with gr.Accordion("Decode replay: the cache at every generated token", open=True, elem_id="replay"):
                    with gr.Row(equal_height=True):
                        prev_btn = gr.Button("◀ Step", size="sm", scale=0, min_width=90, elem_id="replay-prev")
                        step = gr.Slider(
                            0, 1, value=0, step=1, label="Decode step (← → keys)", scale=4, elem_id="replay-step"
                        )
                        next_btn = gr.Button("Step ▶", size="sm", scale=0, min_width=90, elem_id="replay-next")
                        play_btn = gr.Button("▶ Play", size="sm", scale=0, min_width=100, elem_id="replay-play")
                    playing = gr.State(False)
                    timer = gr.Timer(1.0, active=False)
                    replay_summary = gr.Markdown(elem_id="replay-summary")
                    replay_answer = gr.HighlightedText(
                        label="The answer so far (this step's token highlighted)",
                        color_map={"this step": "#E69F00"},
                        combine_adjacent=False,
                        show_legend=False,
                        elem_id="replay-answer",
                    )
                    replay_gallery = gr.Gallery(
                        label="The cache at this step",
                        columns=4,
                        height="auto",
                        object_fit="contain",
                        elem_id="replay-gallery",
                    )
                    replay_plot = gr.Plot(label="Bytes held per step", show_label=False, elem_id="replay-bytes")
                with gr.Row(elem_classes=["plot-row"]):
                    budget_plot = gr.Plot(label="Budget per layer", show_label=False, elem_id="inspect-budget")
                    pref_plot = gr.Plot(label="Modality preference", show_label=False, elem_id="inspect-preference")
                heads_plot = gr.Plot(label="Per-head budgets / head types", show_label=False, elem_id="inspect-heads")
                strip = gr.HighlightedText(
                    label="Prompt tokens (images and frames collapsed into chips)",
                    color_map=STRIP_COLORS,
                    show_legend=True,
                    combine_adjacent=False,
                    elem_id="inspect-strip",
                )
                merges = gr.Dataframe(
                    label="Merges: which kept token absorbed which (first 500)",
                    interactive=False,
                    wrap=True,
                    elem_id="inspect-merges",
                )
                with gr.Row():
                    trace_dl = gr.DownloadButton("Download trace (JSON)", elem_id="inspect-trace")
                    report_dl = gr.DownloadButton("Download figures (HTML)", elem_id="inspect-report")

            with gr.Tab("About", id="about"):
                gr.HTML(about_html(), elem_id="about")

        # ---- events ----
        # model runs share one queue ("model"); loading a model has its own, so a slow load never holds up chats
        model_kw: dict[str, Any] = dict(
            concurrency_id="model", concurrency_limit=int(os.environ.get("MMKV_CONCURRENCY", "1"))
        )
        light: dict[str, Any] = dict(concurrency_limit=4)
        demo.load(
            on_page_load,
            inputs=[state],
            outputs=[state, model_status, present],
            concurrency_id="load",
            concurrency_limit=2,
        )
        demo.load(
            None, None, [present], js=PRESENT_FROM_URL_JS
        )  # ?present=1 ticks the switch (its change does the rest)
        load_btn.click(
            on_load_model,
            [model_box, state],
            [state, model_status, chatbot, chat_status],
            concurrency_id="load",
            concurrency_limit=2,
        )
        view_out = [ins_summary, budget_plot, pref_plot, heads_plot, ins_gallery, strip, merges, trace_dl, report_dl]
        present.change(
            on_present,
            [present, state, run_dd, layer_dd, head_dd, alpha],
            [state, *view_out],
            js=TOGGLE_PRESENT_JS,
            **light,
        )
        cs["method"].input(on_method_change, [cs["method"]], [params], **light)  # not on an example's own params
        for box, settings, shown in ((chat_in, cs, chat_preview), (cmp_in, cc, cmp_preview)):
            box.change(
                on_preview,
                [box, state, settings["num_frames"], settings["max_new_tokens"]],
                [shown],
                trigger_mode="always_last",
                concurrency_id="preview",
                concurrency_limit=2,
                show_progress="hidden",
            )
        chat_in.submit(
            on_chat,
            [
                chat_in,
                state,
                cs["method"],
                cs["ratio"],
                cs["tokens"],
                cs["query_aware"],
                cs["max_new_tokens"],
                cs["num_frames"],
                params,
            ],
            [chatbot, chat_in, chat_status, chat_summary, state, run_dd],
            **model_kw,
        )
        clear_btn.click(on_clear, [state], [state, chatbot, chat_in, chat_status, chat_summary], **light)
        to_inspect.click(lambda: gr.Tabs(selected="inspect"), None, [tabs], **light)
        compare_out = [
            cmp_status,
            cmp_table,
            mem_plot,
            speed_plot,
            agree_plot,
            kept_plot,
            cmp_gallery,
            cmp_report,
            cmp_traces,
            state,
            run_dd,
        ]
        cmp_btn.click(
            on_compare,
            [
                cmp_in,
                cc["methods"],
                cc["ratio"],
                cc["tokens"],
                cc["sweep"],
                cc["query_aware"],
                cc["max_new_tokens"],
                cc["num_frames"],
                cc["with_kl"],
                state,
            ],
            compare_out,
            **model_kw,
        )
        cmp_saved_btn.click(on_compare_saved, [cmp_files, cmp_examples, state], compare_out, **light)
        replay_out = [replay_summary, replay_gallery, replay_plot, replay_answer]
        run_dd.change(on_run_change, [state, run_dd, alpha], [layer_dd, head_dd, *view_out, step, *replay_out], **light)
        for trigger in (layer_dd.input, head_dd.input, alpha.release):
            trigger(on_inspect, [state, run_dd, layer_dd, head_dd, alpha], view_out, **light)
        for trigger in (layer_dd.input, head_dd.input, step.change):
            trigger(
                on_replay, [state, run_dd, step, layer_dd, head_dd], replay_out, trigger_mode="always_last", **light
            )
        prev_btn.click(lambda v, s, r: on_step(v, -1, s, r), [step, state, run_dd], [step], **light)
        next_btn.click(lambda v, s, r: on_step(v, 1, s, r), [step, state, run_dd], [step], **light)
        play_btn.click(on_play, [playing], [playing, timer, play_btn], **light)
        timer.tick(on_tick, [step, state, run_dd, playing], [step, playing, timer, play_btn], **light)
        open_btn.click(on_open_runs, [ins_files, ins_examples, state], [state, ins_summary, run_dd], **light)
        save_btn.click(on_save_run, [state, run_dd], [save_btn], **light)
    return demo


demo = build_demo()


def queue_kwargs() -> dict[str, Any]:
    """One model run at a time by default (MMKV_CONCURRENCY), a bounded queue (MMKV_QUEUE_SIZE)."""
    return {"default_concurrency_limit": 1, "max_size": int(os.environ.get("MMKV_QUEUE_SIZE", "16"))}


def launch_kwargs() -> dict[str, Any]:
    return {
        "server_name": os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
        # Gradio itself refuses (with a toast only) uploads over this; up to it, mmkv's checks refuse with a message
        "max_file_size": f"{max(4 * LIMITS.max_upload_mb, 100):g}mb",
        "theme": gr.themes.Soft(),
        "css": CSS,
        "head": KEYS_JS,
        "allowed_paths": [str(EXAMPLES_DIR), str(RUNS_DIR)],
        "show_error": True,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP request Gradio makes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        loaded = STORE.get()
        print(f"mmkv app: model {loaded.describe()}", flush=True)
    except UserError as exc:  # the app still starts; the page says what to do
        print(f"mmkv app: could not load the default model: {exc}", flush=True)
    if MODEL_NOTICE:
        print("mmkv app: " + MODEL_NOTICE.replace("**", "").replace("`", ""), flush=True)
    kwargs = launch_kwargs()
    demo.queue(**queue_kwargs())
    host = "localhost" if kwargs["server_name"] in ("127.0.0.1", "0.0.0.0") else kwargs["server_name"]
    print(
        f"mmkv app: ready in {time.perf_counter() - _T_START:.1f} s — open http://{host}:{kwargs['server_port']}",
        flush=True,
    )
    demo.launch(**kwargs)


if __name__ == "__main__":
    main()
