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
from typing import Any, Callable  # noqa: E402

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
from .ui import Limits, UserError, default_model  # noqa: E402
from .ui import handlers as H  # noqa: E402
from .ui.about import about_html  # noqa: E402
from .ui.inputs import params_text  # noqa: E402
from .ui.models import SUGGESTED_MODELS, ModelStore  # noqa: E402

log = logging.getLogger("mmkv.app")

LIMITS = Limits()
DEFAULT_MODEL, MODEL_NOTICE = default_model()
STORE = ModelStore(DEFAULT_MODEL)
METHOD_NAMES = sorted(METHODS)
DEFAULT_COMPARE = [m for m in ("full", "snapkv", "adakv") if m in METHODS]
CSS = """
#title h1 {margin-bottom: 0}
.status-box {min-height: 1.5em}
#inspect-gallery .caption-label, #compare-gallery .caption-label {white-space: normal}
"""


def _examples() -> list[dict[str, Any]]:
    import json

    items = json.loads((EXAMPLES_DIR / "examples.json").read_text(encoding="utf-8"))
    return [{"text": e["text"], "files": [str(EXAMPLES_DIR / f) for f in e["files"]]} for e in items]


def problem(exc: BaseException) -> str:
    """Show an error as a toast and return it as a status message (the app keeps serving)."""
    if isinstance(exc, UserError):
        message = str(exc)
    else:
        log.exception("unexpected error")
        message = (f"something went wrong ({type(exc).__name__}: {exc}). The app is still running: try again, "
                   "or with a smaller input / budget")
    gr.Warning(message)
    return f"⚠️ {message}"


def _new_state() -> H.AppState:
    return H.AppState()


# ---- model -----------------------------------------------------------------------------------
def on_page_load(state: H.AppState) -> str:
    try:
        loaded = STORE.get(state.model or None)
        return f"Model: {loaded.describe()}"
    except Exception as exc:  # noqa: BLE001 - shown to the user
        return problem(exc)


def on_load_model(name: str, state: H.AppState) -> tuple[H.AppState, str, list, str]:
    try:
        state, status = H.select_model(STORE, state, name)
        return state, status, state.display, "New model: the conversation was cleared."
    except Exception as exc:  # noqa: BLE001
        return state, problem(exc), state.display, gr.skip()


# ---- Chat ------------------------------------------------------------------------------------
def on_method_change(method: str) -> str:
    try:
        return params_text(method)
    except Exception as exc:  # noqa: BLE001
        problem(exc)
        return "{}"


def _run_dropdown(state: H.AppState) -> Any:
    return gr.Dropdown(choices=H.run_choices(state), value=state.last)


@gpu(duration=120)
def on_chat(message, state, method, ratio, tokens, query_aware, max_new_tokens, num_frames, params):
    """Streams (chatbot, input box, status, summary, state, inspect run dropdown)."""
    try:
        for update in H.chat_turn(STORE, state, message, method, ratio, tokens, query_aware, max_new_tokens,
                                  num_frames, params, LIMITS):
            if update.done:
                yield update.display, None, update.status, update.summary, update.state, _run_dropdown(update.state)
            else:
                yield update.display, gr.skip(), update.status, gr.skip(), gr.skip(), gr.skip()
    except Exception as exc:  # noqa: BLE001
        yield state.display, gr.skip(), problem(exc), gr.skip(), state, gr.skip()


def on_clear(state: H.AppState) -> tuple[H.AppState, list, str, str]:
    state.clear_chat()
    return state, [], "Conversation cleared.", ""


# ---- Compare ---------------------------------------------------------------------------------
@gpu(duration=180)
def _compare(message, methods, ratio, tokens, sweep, query_aware, max_new_tokens, num_frames, with_kl, state, progress=None):
    return H.compare(STORE, state, message, methods, ratio, tokens, sweep, query_aware, max_new_tokens, num_frames,
                     with_kl, LIMITS, progress)


def on_compare(message, methods, ratio, tokens, sweep, query_aware, max_new_tokens, num_frames, with_kl, state,
               progress=gr.Progress()):
    """(status, table, memory, speed, agreement, kept map, gallery, report file, traces file, state, run dropdown)."""
    try:
        # ZeroGPU runs _compare in a worker process: a progress callback cannot cross that boundary
        report = None if ZERO_GPU else (lambda f, d: progress(f, desc=d))
        res = _compare(message, methods, ratio, tokens, sweep, query_aware, max_new_tokens, num_frames, with_kl, state,
                       report)
    except Exception as exc:  # noqa: BLE001
        skip = gr.skip()
        return (problem(exc), skip, skip, skip, skip, skip, skip, skip, skip, state, skip)
    f = res.figures
    table = {"headers": H.COMPARE_HEADERS, "data": res.table()}
    return (res.status, table, f["memory"], f["speed"], f["agreement"], f["kept"], res.gallery, res.report_path,
            res.traces_path, res.state, _run_dropdown(res.state))


# ---- Inspect ---------------------------------------------------------------------------------
def _inspect_outputs(view: H.InspectView) -> tuple:
    merges = {"headers": ["layer", "kv_head", "absorbed (evicted)", "into (kept)", "similarity"],
              "data": [list(r.values()) for r in view.merges] or [["", "", "no merges for this selection", "", ""]]}
    f = view.figures
    return (view.summary, f["budget"], f["preference"], f["heads"], view.gallery, view.strip, merges,
            view.trace_path, view.report_path)


def on_inspect(state, label, layer, head, alpha):
    try:
        return _inspect_outputs(H.inspect(state, label, layer, head, alpha))
    except Exception as exc:  # noqa: BLE001
        message = problem(exc)
        return (message,) + (gr.skip(),) * 8


def on_run_change(state, label, alpha):
    """A new run was picked: reset the layer / head selectors to its shape and render it."""
    trace = state.runs[label].trace if label in state.runs else None
    layers = gr.Dropdown(choices=H.layer_choices(trace), value=H.ALL_LAYERS)
    heads = gr.Dropdown(choices=H.head_choices(trace), value=H.ALL_HEADS)
    if trace is None:
        return (layers, heads, "Nothing to inspect yet: send a message in **Chat** or run **Compare**.") + (gr.skip(),) * 8
    return (layers, heads) + on_inspect(state, label, None, None, alpha)


# ---- layout ----------------------------------------------------------------------------------
def _settings(prefix: str, compare: bool) -> dict[str, Any]:
    c: dict[str, Any] = {}
    if compare:
        c["methods"] = gr.CheckboxGroup(METHOD_NAMES, value=DEFAULT_COMPARE, label="Methods (Full always runs as the reference)",
                                        elem_id=f"{prefix}-methods")
    else:
        c["method"] = gr.Dropdown(METHOD_NAMES, value="snapkv" if "snapkv" in METHODS else METHOD_NAMES[0], label="Method",
                                  elem_id=f"{prefix}-method")
    c["ratio"] = gr.Slider(0.01, 1.0, value=0.3, step=0.01, label="Budget (share of tokens kept per layer and KV head)",
                           elem_id=f"{prefix}-budget")
    c["tokens"] = gr.Number(value=0, precision=0, label="…or an absolute budget in tokens per head (0 = use the share)",
                            elem_id=f"{prefix}-tokens")
    if compare:
        c["sweep"] = gr.Textbox(label="Budget sweep (optional)", placeholder="e.g. 0.1, 0.3, 0.6 — plots budget vs quality",
                                elem_id=f"{prefix}-sweep")
    with gr.Accordion("Generation settings", open=False):
        c["query_aware"] = gr.Checkbox(value=True, label="Query-aware (compress after reading the question, as in the papers)")
        c["max_new_tokens"] = gr.Slider(1, LIMITS.max_new_tokens, value=24 if compare else 48, step=1, label="Max new tokens")
        c["num_frames"] = gr.Slider(1, LIMITS.max_frames, value=8, step=1, label="Frames sampled per video")
        if compare:
            c["with_kl"] = gr.Checkbox(value=True, label="Next-token KL vs Full (teacher-forced; one extra prefill per method)")
    return c


def build_demo() -> gr.Blocks:
    examples = _examples()
    # delete_cache: exports are rewritten at every Inspect render; drop cached copies older than an hour
    with gr.Blocks(title="mmkv — multimodal KV-cache compression", delete_cache=(1800, 3600)) as demo:
        state = gr.State(_new_state, delete_callback=H.AppState.cleanup)  # removes the session's export folder
        gr.Markdown("# mmkv — see what multimodal KV-cache compression keeps\n"
                    "Upload images or a video, ask a question, and watch which image patches, video frames and "
                    "words each method keeps in the model's memory.", elem_id="title")
        if MODEL_NOTICE:
            gr.Markdown(f"> ℹ️ {MODEL_NOTICE}", elem_id="model-notice")
        with gr.Row():
            model_box = gr.Dropdown([DEFAULT_MODEL, *SUGGESTED_MODELS], value=DEFAULT_MODEL, allow_custom_value=True,
                                    label="Model (hub id or local checkpoint directory)", scale=4, elem_id="model-name")
            load_btn = gr.Button("Load model", scale=1, elem_id="model-load")
        model_status = gr.Markdown(f"Model: `{DEFAULT_MODEL}` (loads on first use)", elem_id="model-status")

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        cs = _settings("chat", compare=False)
                        with gr.Accordion("Method hyper-parameters (JSON)", open=False):
                            params = gr.Code(params_text(cs["method"].value), language="json", label="hyper-parameters",
                                             elem_id="chat-params")
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(height=420, label="Conversation", elem_id="chatbot")
                        chat_in = gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple",
                                                       placeholder="Ask about your images or video (attach with the clip)…",
                                                       label="Message", elem_id="chat-input", sources=["upload"])
                        with gr.Row():
                            clear_btn = gr.Button("Clear conversation", size="sm", elem_id="chat-clear")
                        chat_status = gr.Markdown(elem_id="chat-status", elem_classes=["status-box"])
                        chat_summary = gr.Markdown(elem_id="chat-summary")
                        gr.Examples(examples, inputs=[chat_in], label="Examples (click one, then press Enter)", elem_id="chat-examples",
                                    example_labels=[e["text"] for e in examples])

            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        cmp_in = gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple", submit_btn=False,
                                                      placeholder="Question + images/video to run through every method",
                                                      label="Input", elem_id="compare-input", sources=["upload"])
                        gr.Examples(examples, inputs=[cmp_in], label="Examples", elem_id="compare-examples", example_labels=[e["text"] for e in examples])
                        cc = _settings("compare", compare=True)
                        cmp_btn = gr.Button("Run compare", variant="primary", elem_id="compare-run")
                    with gr.Column(scale=3):
                        cmp_status = gr.Markdown(elem_id="compare-status", elem_classes=["status-box"])
                        cmp_table = gr.Dataframe(headers=H.COMPARE_HEADERS, label="Answers and costs", wrap=True,
                                                 interactive=False, elem_id="compare-table")
                        with gr.Row():
                            mem_plot = gr.Plot(label="Memory", elem_id="compare-memory")
                            speed_plot = gr.Plot(label="Time", elem_id="compare-speed")
                        with gr.Row():
                            agree_plot = gr.Plot(label="Agreement with Full", elem_id="compare-agreement")
                            kept_plot = gr.Plot(label="Kept tokens", elem_id="compare-kept")
                        cmp_gallery = gr.Gallery(label="Kept cells (all layers and heads): green kept · red evicted · blue merged",
                                                 columns=5, height=300, elem_id="compare-gallery")
                        with gr.Row():
                            cmp_report = gr.DownloadButton("Download charts (HTML)", elem_id="compare-report")
                            cmp_traces = gr.DownloadButton("Download traces (JSON)", elem_id="compare-traces")

            with gr.Tab("Inspect", id="inspect"):
                with gr.Row():
                    run_dd = gr.Dropdown([], label="Run", scale=3, elem_id="inspect-run")
                    layer_dd = gr.Dropdown([H.ALL_LAYERS], value=H.ALL_LAYERS, label="Layer", scale=1, elem_id="inspect-layer")
                    head_dd = gr.Dropdown([H.ALL_HEADS], value=H.ALL_HEADS, label="KV head", scale=1, elem_id="inspect-head")
                    alpha = gr.Slider(0.1, 0.9, value=0.5, step=0.05, label="Overlay opacity", scale=1, elem_id="inspect-alpha")
                ins_summary = gr.Markdown("Nothing to inspect yet: send a message in **Chat** or run **Compare**.",
                                          elem_id="inspect-summary")
                ins_gallery = gr.Gallery(label="Kept (green) / evicted (red) / merged (blue) cells over each image and frame",
                                         columns=5, height="auto", elem_id="inspect-gallery")
                with gr.Row():
                    budget_plot = gr.Plot(label="Budget per layer", elem_id="inspect-budget")
                    pref_plot = gr.Plot(label="Modality preference", elem_id="inspect-preference")
                heads_plot = gr.Plot(label="Per-head budgets / head types", elem_id="inspect-heads")
                strip = gr.HighlightedText(label="Prompt tokens (images and frames collapsed into chips)", color_map=STRIP_COLORS,
                                           show_legend=True, combine_adjacent=False, elem_id="inspect-strip")
                merges = gr.Dataframe(label="Merges: which kept token absorbed which (first 500)", interactive=False,
                                      wrap=True, elem_id="inspect-merges")
                with gr.Row():
                    trace_dl = gr.DownloadButton("Download trace (JSON)", elem_id="inspect-trace")
                    report_dl = gr.DownloadButton("Download figures (HTML)", elem_id="inspect-report")

            with gr.Tab("About", id="about"):
                gr.HTML(about_html(), elem_id="about")

        # ---- events ----
        model_kw = dict(concurrency_id="model", concurrency_limit=int(os.environ.get("MMKV_CONCURRENCY", "1")))
        demo.load(on_page_load, inputs=[state], outputs=[model_status], **model_kw)
        load_btn.click(on_load_model, [model_box, state], [state, model_status, chatbot, chat_status], **model_kw)
        cs["method"].change(on_method_change, [cs["method"]], [params], concurrency_limit=4)
        chat_in.submit(
            on_chat,
            [chat_in, state, cs["method"], cs["ratio"], cs["tokens"], cs["query_aware"], cs["max_new_tokens"],
             cs["num_frames"], params],
            [chatbot, chat_in, chat_status, chat_summary, state, run_dd], **model_kw,
        )
        clear_btn.click(on_clear, [state], [state, chatbot, chat_status, chat_summary], concurrency_limit=4)
        cmp_btn.click(
            on_compare,
            [cmp_in, cc["methods"], cc["ratio"], cc["tokens"], cc["sweep"], cc["query_aware"], cc["max_new_tokens"],
             cc["num_frames"], cc["with_kl"], state],
            [cmp_status, cmp_table, mem_plot, speed_plot, agree_plot, kept_plot, cmp_gallery, cmp_report, cmp_traces,
             state, run_dd], **model_kw,
        )
        view_out = [ins_summary, budget_plot, pref_plot, heads_plot, ins_gallery, strip, merges, trace_dl, report_dl]
        run_dd.change(on_run_change, [state, run_dd, alpha], [layer_dd, head_dd, *view_out], concurrency_limit=4)
        for trigger in (layer_dd.input, head_dd.input, alpha.release):
            trigger(on_inspect, [state, run_dd, layer_dd, head_dd, alpha], view_out, concurrency_limit=4)
    return demo


demo = build_demo()


def queue_kwargs() -> dict[str, Any]:
    """One model run at a time by default (MMKV_CONCURRENCY), a bounded queue (MMKV_QUEUE_SIZE)."""
    return {"default_concurrency_limit": 1, "max_size": int(os.environ.get("MMKV_QUEUE_SIZE", "16"))}


def launch_kwargs() -> dict[str, Any]:
    return {
        "server_name": os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
        "max_file_size": f"{LIMITS.max_upload_mb:g}mb",  # bigger uploads are refused by Gradio itself
        "theme": gr.themes.Soft(),
        "css": CSS,
        "allowed_paths": [str(EXAMPLES_DIR)],
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
    print(f"mmkv app: ready in {time.perf_counter() - _T_START:.1f} s — open http://{host}:{kwargs['server_port']}", flush=True)
    demo.launch(**kwargs)


if __name__ == "__main__":
    main()
