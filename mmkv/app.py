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

Importing it does no work: :func:`build_app` lays the page out over an :class:`AppContext` (the model
store and the request limits, from the environment by default) and returns an :class:`AppUI`, whose
components are attributes and whose event methods return dicts keyed by the components they update.
``mmkv.app.demo`` (what ``app.py`` and Gradio's reload mode read) is built on first access.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # app start time is reported from here (imports included)

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))

try:  # ZeroGPU: `spaces` must be imported before torch touches CUDA (app.py imports it first); elsewhere a no-op.
    import spaces

    def gpu(duration: int = 120) -> Callable[[Callable], Callable]:
        return spaces.GPU(duration=duration)
except Exception:  # not installed / not on a Space
    spaces = None

    def gpu(duration: int = 120) -> Callable[[Callable], Callable]:
        return lambda fn: fn


import gradio as gr

from viz import STRIP_COLORS

from .bundled import EXAMPLES_DIR
from .methods import METHODS
from .trace.runfile import RUNS_DIR
from .ui import Limits, UserError, default_model
from .ui import handlers as H
from .ui.about import about_html
from .ui.inputs import params_text
from .ui.models import ModelStore

log = logging.getLogger("mmkv.app")

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


NOTHING_TO_INSPECT = "Nothing to inspect yet: send a message in **Chat**, run **Compare** or open a saved run."


def _examples() -> list[dict[str, Any]]:
    items = json.loads((EXAMPLES_DIR / "examples.json").read_text(encoding="utf-8"))
    return [{**e, "files": [str(EXAMPLES_DIR / f) for f in e["files"]]} for e in items]


def _params_json(e: dict[str, Any]) -> str:
    """The example method's hyper-parameters as the JSON box shows them, with the example's own values."""
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
    """A new browser session's state (a function: gr.State would take a dataclass class for a value)."""
    return H.AppState()


# ---- what every session shares -----------------------------------------------------------------
@dataclass
class AppContext:
    """What the app's sessions share: the model store (loaded models) and the limits of one request."""

    store: ModelStore
    limits: Limits = field(default_factory=Limits)
    notice: str | None = None  # shown under the title (e.g. "a random-weight model is loaded")

    @classmethod
    def from_environment(cls) -> AppContext:
        """``MMKV_MODEL``, else the bundled model, else a tiny random model (:func:`mmkv.ui.default_model`)."""
        model, notice = default_model()
        return cls(ModelStore(model), Limits(), notice)


_CONTEXT: AppContext | None = None


def context() -> AppContext:
    """The process's :class:`AppContext`, made from the environment on first use (not at import)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = AppContext.from_environment()
    return _CONTEXT


# ---- the work that needs the accelerator (ZeroGPU decorates module-level functions) ---------------
# They read the store through context(), never as an argument: ZeroGPU ships arguments to its worker.
@gpu(duration=120)
def _chat_updates(message, state, method, ratio, tokens, query_aware, max_new_tokens, num_frames, params, keep):
    ctx = context()
    yield from H.chat_turn(
        ctx.store,
        state,
        message,
        method,
        ratio,
        tokens,
        query_aware,
        max_new_tokens,
        num_frames,
        params,
        ctx.limits,
        keep_cache=bool(keep) and not ZERO_GPU,  # ZeroGPU frees the GPU between requests: nothing can be kept
    )


@gpu(duration=180)
def _compare(
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
    progress=None,
    followup="",
):
    ctx = context()
    return H.compare(
        ctx.store,
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
        ctx.limits,
        progress,
        followup,
    )


# ---- layout pieces ----------------------------------------------------------------------------
def _settings(prefix: str, compare: bool, limits: Limits) -> dict[str, Any]:
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
    if not compare:
        c["keep_cache"] = gr.Checkbox(
            value=not ZERO_GPU,
            interactive=not ZERO_GPU,
            label="Keep the compressed cache between turns (off: every turn re-reads the whole conversation)"
            + (" — not on ZeroGPU, which frees the GPU between requests" if ZERO_GPU else ""),
            elem_id=f"{prefix}-keep-cache",
        )
    if compare:
        c["followup"] = gr.Textbox(
            label="Follow-up question (optional): each method answers both, its compressed cache kept in between",
            placeholder="e.g. Which image has the blue square?",
            elem_id=f"{prefix}-followup",
        )
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
            1, limits.max_new_tokens, value=24 if compare else 48, step=1, label="Max new tokens"
        )
        c["num_frames"] = gr.Slider(1, limits.max_frames, value=8, step=1, label="Frames sampled per video")
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


class AppUI:
    """The page: its components (attributes, made by :meth:`_layout`) and the events that update them.

    Every event method returns (or, for Chat, yields) a dict keyed by the components it updates; a component
    left out of the dict keeps its value. The methods only parse what Gradio hands over, call
    :mod:`mmkv.ui.handlers` and turn any error into a visible status message.
    """

    def __init__(self, context: AppContext) -> None:
        self.context = context
        self.examples = _examples()
        self._layout()
        self._wire()

    # ---- model and presentation mode -----------------------------------------------------------
    def on_page_load(self, state: H.AppState) -> dict[Any, Any]:
        try:
            loaded = self.context.store.get(state.model or None)
            return {self.state: state, self.model_status: f"Model: {loaded.describe()}"}
        except Exception as exc:  # noqa: BLE001 - shown to the user
            return {self.state: state, self.model_status: problem(exc)}

    def on_load_model(self, name: str, state: H.AppState) -> dict[Any, Any]:
        try:
            state, status = H.select_model(self.context.store, state, name)
        except Exception as exc:  # noqa: BLE001
            return {self.state: state, self.model_status: problem(exc), self.chatbot: state.display}
        return {
            self.state: state,
            self.model_status: status,
            self.chatbot: state.display,
            self.chat_status: "New model: the conversation was cleared.",
        }

    def on_present(self, present: bool, state: H.AppState, label: str, layer: str, head: str, alpha: float):
        """Presentation mode on/off: re-draw the Inspect figures at the new size (Compare's at its next run)."""
        state.present = bool(present)
        if not state.runs:
            return {self.state: state}
        return {self.state: state, **self.on_inspect(state, label, layer, head, alpha)}

    # ---- Chat ----------------------------------------------------------------------------------
    def on_method_change(self, method: str) -> dict[Any, Any]:
        try:
            return {self.params: params_text(method)}
        except Exception as exc:  # noqa: BLE001
            problem(exc)
            return {self.params: "{}"}

    def _run_dropdown(self, state: H.AppState) -> dict[Any, Any]:
        return {self.run_dd: gr.Dropdown(choices=H.run_choices(state), value=state.last)}

    def preview(self, message: Any, state: H.AppState, num_frames: Any, max_new_tokens: Any) -> str:
        """The prompt's size before it runs (tokens per modality, KV bytes, whether it fits)."""
        try:
            return H.preview(self.context.store, state, message, num_frames, max_new_tokens, self.context.limits)
        except Exception as exc:  # noqa: BLE001 - a preview never toasts
            return f"⚠️ {exc}" if isinstance(exc, UserError) else ""

    def on_chat_preview(self, message, state, num_frames, max_new_tokens) -> dict[Any, Any]:
        return {self.chat_preview: self.preview(message, state, num_frames, max_new_tokens)}

    def on_compare_preview(self, message, state, num_frames, max_new_tokens) -> dict[Any, Any]:
        return {self.cmp_preview: self.preview(message, state, num_frames, max_new_tokens)}

    def on_chat(
        self, message, state, method, ratio, tokens, query_aware, max_new_tokens, num_frames, params, keep_cache=True
    ) -> Iterator[dict[Any, Any]]:
        """Streams the conversation and status; when done, also the summary, the state and Inspect's run list."""
        try:
            for update in _chat_updates(
                message, state, method, ratio, tokens, query_aware, max_new_tokens, num_frames, params, keep_cache
            ):
                shown = {self.chatbot: update.display, self.chat_status: update.status}
                if update.done:
                    shown |= {self.chat_in: None, self.chat_summary: update.summary, self.state: update.state}
                    shown |= self._run_dropdown(update.state)
                yield shown
        except Exception as exc:  # noqa: BLE001
            # keep the question, drop the attachments that failed (they would stay as broken icons)
            text, _ = H.message_parts(message)
            yield {
                self.chatbot: state.display,
                self.chat_in: {"text": text, "files": []},
                self.chat_status: problem(exc),
                self.state: state,
            }

    def on_clear(self, state: H.AppState) -> dict[Any, Any]:
        state.clear_chat()
        return {
            self.state: state,
            self.chatbot: [],
            self.chat_in: None,
            self.chat_status: "Conversation cleared.",
            self.chat_summary: "",
        }

    # ---- Compare -------------------------------------------------------------------------------
    def _compare_outputs(self, res: H.CompareResult) -> dict[Any, Any]:
        f = res.figures
        return {
            self.cmp_status: res.status,
            self.cmp_table: {"headers": H.COMPARE_HEADERS, "data": res.table()},
            self.mem_plot: f["memory"],
            self.speed_plot: f["speed"],
            self.agree_plot: f["agreement"],
            self.kept_plot: f["kept"],
            self.cmp_gallery: res.gallery,
            self.cmp_report: res.report_path,
            self.cmp_traces: res.traces_path,
            self.state: res.state,
            **self._run_dropdown(res.state),
        }

    def on_compare(
        self,
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
        followup="",
        progress=gr.Progress(),
    ) -> dict[Any, Any]:
        try:
            # ZeroGPU runs _compare in a worker process: a progress callback cannot cross that boundary
            report = None if ZERO_GPU else (lambda f, d: progress(f, desc=d))
            res = _compare(
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
                report,
                followup,
            )
        except Exception as exc:  # noqa: BLE001
            return {self.cmp_status: problem(exc), self.state: state}
        return self._compare_outputs(res)

    def on_compare_saved(self, files, examples, state) -> dict[Any, Any]:
        """Compare saved runs (uploaded files and/or shipped example runs): no model is run."""
        try:
            res = H.compare_runs(state, [*(files or []), *H.example_run_files(examples)])
        except Exception as exc:  # noqa: BLE001
            return {self.cmp_status: problem(exc), self.state: state}
        return self._compare_outputs(res)

    # ---- Inspect -------------------------------------------------------------------------------
    def on_inspect(self, state, label, layer, head, alpha) -> dict[Any, Any]:
        try:
            view = H.inspect(state, label, layer, head, alpha)
        except Exception as exc:  # noqa: BLE001
            return {self.ins_summary: problem(exc)}
        f = view.figures
        merges = {
            "headers": ["layer", "KV head", "absorbed (evicted)", "into (kept)", "similarity"],
            "data": [list(r.values()) for r in view.merges] or [["", "", "no merges for this selection", "", ""]],
        }
        return {
            self.ins_summary: view.summary,
            self.budget_plot: f["budget"],
            self.pref_plot: f["preference"],
            self.heads_plot: f["heads"],
            self.ins_gallery: view.gallery,
            self.strip: view.strip,
            self.merges: merges,
            self.trace_dl: view.trace_path,
            self.report_dl: view.report_path,
        }

    def on_replay(self, state, label, step, layer, head) -> dict[Any, Any]:
        """Draw the cache at one decode step."""
        try:
            view = H.replay(state, label, step, layer, head)
        except Exception as exc:  # noqa: BLE001
            return {self.replay_summary: problem(exc)}
        return {
            self.replay_summary: view.summary,
            self.replay_gallery: view.gallery,
            self.replay_plot: view.figure,
            self.replay_answer: view.answer,
        }

    def on_run_change(self, state, label, alpha) -> dict[Any, Any]:
        """A new run was picked: reset the layer / head selectors and the replay to its shape, and render it."""
        trace = state.runs[label].trace if label in state.runs else None
        shown: dict[Any, Any] = {
            self.layer_dd: gr.Dropdown(choices=H.layer_choices(trace), value=H.ALL_LAYERS),
            self.head_dd: gr.Dropdown(choices=H.head_choices(trace), value=H.ALL_HEADS),
        }
        if trace is None:
            return shown | {self.ins_summary: NOTHING_TO_INSPECT}
        steps = max(H.replay_steps(trace), 1)
        shown[self.step] = gr.Slider(minimum=0, maximum=steps - 1, value=0, step=1, interactive=steps > 1)
        return shown | self.on_inspect(state, label, None, None, alpha) | self.on_replay(state, label, 0, None, None)

    def on_open_runs(self, files, examples, state, present=False) -> dict[Any, Any]:
        """Open saved runs (uploads and/or shipped examples) in Inspect; the newest is selected. ``present``: the
        presentation switch as shown, so the runs are drawn at its size even when this event overtook the switch's
        own (both return the session state: the later one would otherwise undo the other's flag)."""
        state.present = bool(present)
        try:
            state, status = H.open_runs(state, [*(files or []), *H.example_run_files(examples)])
        except Exception as exc:  # noqa: BLE001
            return {self.state: state, self.ins_summary: problem(exc)}
        return {self.state: state, self.ins_summary: status, **self._run_dropdown(state)}

    def on_save_run(self, state, label) -> dict[Any, Any]:
        try:
            return {self.save_btn: H.save_run(state, label)}
        except Exception as exc:  # noqa: BLE001
            problem(exc)
            return {self.save_btn: None}

    @staticmethod
    def _last_step(state: H.AppState, label: str) -> int:
        """The replay's last step for run ``label`` (0 when there is no such run or no decode record)."""
        trace = state.runs[label].trace if label in state.runs else None
        return max(H.replay_steps(trace) - 1, 0)

    def _moved(self, step: Any, delta: int, state, label) -> dict[Any, Any]:
        try:
            value = int(step or 0) + delta
        except (TypeError, ValueError):
            value = 0
        return {self.step: min(max(value, 0), self._last_step(state, label))}

    def on_prev(self, step, state, label) -> dict[Any, Any]:
        return self._moved(step, -1, state, label)

    def on_next(self, step, state, label) -> dict[Any, Any]:
        return self._moved(step, 1, state, label)

    def on_play(self, playing: bool) -> dict[Any, Any]:
        playing = not playing
        return {
            self.playing: playing,
            self.timer: gr.Timer(active=playing),
            self.play_btn: gr.Button("⏸ Pause" if playing else "▶ Play"),
        }

    def on_tick(self, step, state, label, playing) -> dict[Any, Any]:
        """One step forward while playing; stops at the last step."""
        last = self._last_step(state, label)
        value = min(int(step or 0) + 1, last)
        if value >= last:
            return {
                self.step: value,
                self.playing: False,
                self.timer: gr.Timer(active=False),
                self.play_btn: gr.Button("▶ Play"),
            }
        return {self.step: value, self.playing: playing}

    def on_to_inspect(self) -> dict[Any, Any]:
        return {self.tabs: gr.Tabs(selected="inspect")}

    # ---- layout ----------------------------------------------------------------------------------
    def _layout(self) -> None:
        labels = [_example_label(e) for e in self.examples]
        chat_rows = [
            [{"text": e["text"], "files": e["files"]}, e["method"], e["budget"], _params_json(e)] for e in self.examples
        ]
        compare_rows = [
            [
                {"text": e["text"], "files": e["files"]},
                list(dict.fromkeys([e["method"], *e.get("compare", ["snapkv", "h2o"])])),
                e["budget"],
                e.get("followup", ""),
            ]
            for e in self.examples
        ]
        # delete_cache: exports are rewritten at every Inspect render; drop cached copies older than an hour
        with gr.Blocks(title="mmkv — multimodal KV-cache compression", delete_cache=(1800, 3600)) as self.demo:
            self.state = gr.State(_new_state, delete_callback=H.AppState.cleanup)  # removes the session's export folder
            gr.Markdown(
                "# mmkv — see what multimodal KV-cache compression keeps\n"
                "Upload images or a video, ask a question, and watch which image patches, video frames and "
                "words each method keeps in the model's memory.",
                elem_id="title",
            )
            if self.context.notice:
                gr.Markdown(f"> ℹ️ {self.context.notice}", elem_id="model-notice")
            with gr.Row(equal_height=True):
                self.model_box = gr.Dropdown(
                    self.context.store.choices(),
                    value=self.context.store.label(self.context.store.default),
                    allow_custom_value=self.context.store.settings.allowed_models is None,
                    label="Model",
                    scale=4,
                    elem_id="model-name",
                )
                self.load_btn = gr.Button("Load model", scale=1, elem_id="model-load")
                self.present = gr.Checkbox(False, label="Presentation mode (p)", scale=1, elem_id="present-toggle")
            self.model_status = gr.Markdown(
                f"Model: `{self.context.store.label(self.context.store.default)}` (loads on first use)",
                elem_id="model-status",
            )

            with gr.Tabs(overflow_behavior="wrap") as self.tabs:
                with gr.Tab("Chat", id="chat"):
                    with gr.Row():
                        with gr.Column(scale=1, min_width=300):
                            self.chat_settings = cs = _settings("chat", compare=False, limits=self.context.limits)
                            with gr.Accordion("Method hyper-parameters (JSON)", open=False):
                                self.params = gr.Code(
                                    params_text(cs["method"].value),
                                    language="json",
                                    label="hyper-parameters",
                                    elem_id="chat-params",
                                )
                        with gr.Column(scale=3):
                            self.chatbot = gr.Chatbot(height=420, label="Conversation", elem_id="chatbot")
                            # any file type reaches the checks, which say what is wrong (a refused type would only toast)
                            self.chat_in = gr.MultimodalTextbox(
                                file_count="multiple",
                                placeholder="Ask about your images or video (attach with the clip)…",
                                label="Message",
                                elem_id="chat-input",
                                sources=["upload"],
                            )
                            self.chat_preview = gr.Markdown(elem_id="chat-preview")
                            with gr.Row():
                                self.clear_btn = gr.Button("Clear conversation", size="sm", elem_id="chat-clear")
                                self.to_inspect = gr.Button("Open Inspect", size="sm", elem_id="chat-to-inspect")
                            self.chat_status = gr.Markdown(elem_id="chat-status", elem_classes=["status-box"])
                            self.chat_summary = gr.Markdown(elem_id="chat-summary")
                            gr.Examples(
                                chat_rows,
                                inputs=[self.chat_in, cs["method"], cs["ratio"], self.params],
                                example_labels=labels,
                                label="Examples (click one — it sets the method and budget too — then press Enter)",
                                elem_id="chat-examples",
                            )

                with gr.Tab("Compare", id="compare"):
                    with gr.Row():
                        with gr.Column(scale=1, min_width=300):
                            self.cmp_in = gr.MultimodalTextbox(
                                file_count="multiple",
                                submit_btn=False,
                                placeholder="Question + images/video to run through every method",
                                label="Input",
                                elem_id="compare-input",
                                sources=["upload"],
                            )
                            self.cmp_preview = gr.Markdown(elem_id="compare-preview")
                            self.compare_settings = cc = _settings("compare", compare=True, limits=self.context.limits)
                            gr.Examples(
                                compare_rows,
                                inputs=[self.cmp_in, cc["methods"], cc["ratio"], cc["followup"]],
                                example_labels=labels,
                                label="Examples",
                                elem_id="compare-examples",
                            )
                            self.cmp_btn = gr.Button("Run compare", variant="primary", elem_id="compare-run")
                            with gr.Accordion("Compare saved runs (no model needed)", open=False):
                                self.cmp_files, self.cmp_examples = _saved_run_picker("compare")
                                self.cmp_saved_btn = gr.Button("Compare saved runs", elem_id="compare-saved-run")
                        with gr.Column(scale=3):
                            self.cmp_status = gr.Markdown(elem_id="compare-status", elem_classes=["status-box"])
                            self.cmp_table = gr.Dataframe(
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
                                self.mem_plot = gr.Plot(label="Memory", show_label=False, elem_id="compare-memory")
                                self.speed_plot = gr.Plot(label="Time", show_label=False, elem_id="compare-speed")
                            with gr.Row(elem_classes=["plot-row"]):
                                self.agree_plot = gr.Plot(
                                    label="Agreement with Full", show_label=False, elem_id="compare-agreement"
                                )
                                self.kept_plot = gr.Plot(label="Kept tokens", show_label=False, elem_id="compare-kept")
                            self.cmp_gallery = gr.Gallery(
                                label="What each method kept (all layers and heads; title above each picture)",
                                columns=3,
                                height="auto",
                                object_fit="contain",
                                elem_id="compare-gallery",
                            )
                            with gr.Row():
                                self.cmp_report = gr.DownloadButton("Download charts (HTML)", elem_id="compare-report")
                                self.cmp_traces = gr.DownloadButton("Download traces (JSON)", elem_id="compare-traces")

                with gr.Tab("Inspect", id="inspect"):
                    with gr.Row():
                        self.run_dd = gr.Dropdown([], label="Run", scale=3, elem_id="inspect-run")
                        self.layer_dd = gr.Dropdown(
                            [H.ALL_LAYERS], value=H.ALL_LAYERS, label="Layer", scale=1, elem_id="inspect-layer"
                        )
                        self.head_dd = gr.Dropdown(
                            [H.ALL_HEADS], value=H.ALL_HEADS, label="KV head", scale=1, elem_id="inspect-head"
                        )
                        self.alpha = gr.Slider(
                            0.1,
                            0.9,
                            value=0.5,
                            step=0.05,
                            label="Fade of evicted cells",
                            scale=1,
                            elem_id="inspect-alpha",
                        )
                    with gr.Accordion("Open a saved run · save this one", open=False, elem_id="inspect-saved"):
                        with gr.Row():
                            self.ins_files, self.ins_examples = _saved_run_picker("inspect")
                        with gr.Row():
                            self.open_btn = gr.Button("Open in Inspect", elem_id="inspect-open-run")
                            self.save_btn = gr.DownloadButton(
                                "Download this run (.mmkvrun)", elem_id="inspect-save-run"
                            )
                    self.ins_summary = gr.Markdown(
                        NOTHING_TO_INSPECT,
                        elem_id="inspect-summary",
                    )
                    self.ins_gallery = gr.Gallery(
                        label="What the cache kept over each image and frame",
                        columns=4,
                        height="auto",
                        object_fit="contain",
                        elem_id="inspect-gallery",
                    )
                    with gr.Accordion("Decode replay: the cache at every generated token", open=True, elem_id="replay"):
                        with gr.Row(equal_height=True):
                            self.prev_btn = gr.Button("◀ Step", size="sm", scale=0, min_width=90, elem_id="replay-prev")
                            self.step = gr.Slider(
                                0, 1, value=0, step=1, label="Decode step (← → keys)", scale=4, elem_id="replay-step"
                            )
                            self.next_btn = gr.Button("Step ▶", size="sm", scale=0, min_width=90, elem_id="replay-next")
                            self.play_btn = gr.Button(
                                "▶ Play", size="sm", scale=0, min_width=100, elem_id="replay-play"
                            )
                        self.playing = gr.State(False)
                        self.timer = gr.Timer(1.0, active=False)
                        self.replay_summary = gr.Markdown(elem_id="replay-summary")
                        self.replay_answer = gr.HighlightedText(
                            label="The answer so far (this step's token highlighted)",
                            color_map={"this step": "#E69F00"},
                            combine_adjacent=False,
                            show_legend=False,
                            elem_id="replay-answer",
                        )
                        self.replay_gallery = gr.Gallery(
                            label="The cache at this step",
                            columns=4,
                            height="auto",
                            object_fit="contain",
                            elem_id="replay-gallery",
                        )
                        self.replay_plot = gr.Plot(
                            label="Bytes held per step", show_label=False, elem_id="replay-bytes"
                        )
                    with gr.Row(elem_classes=["plot-row"]):
                        self.budget_plot = gr.Plot(label="Budget per layer", show_label=False, elem_id="inspect-budget")
                        self.pref_plot = gr.Plot(
                            label="Modality preference", show_label=False, elem_id="inspect-preference"
                        )
                    self.heads_plot = gr.Plot(
                        label="Per-head budgets / head types", show_label=False, elem_id="inspect-heads"
                    )
                    self.strip = gr.HighlightedText(
                        label="Prompt tokens (images and frames collapsed into chips)",
                        color_map=STRIP_COLORS,
                        show_legend=True,
                        combine_adjacent=False,
                        elem_id="inspect-strip",
                    )
                    self.merges = gr.Dataframe(
                        label="Merges: which kept token absorbed which (first 500)",
                        interactive=False,
                        wrap=True,
                        elem_id="inspect-merges",
                    )
                    with gr.Row():
                        self.trace_dl = gr.DownloadButton("Download trace (JSON)", elem_id="inspect-trace")
                        self.report_dl = gr.DownloadButton("Download figures (HTML)", elem_id="inspect-report")

                with gr.Tab("About", id="about"):
                    gr.HTML(about_html(), elem_id="about")

    # ---- events ----------------------------------------------------------------------------------
    def _wire(self) -> None:
        """Connect the events. Model runs share one queue ("model"); loading a model has its own, so a slow
        load never holds up chats on a loaded model."""
        model_kw: dict[str, Any] = dict(
            concurrency_id="model", concurrency_limit=int(os.environ.get("MMKV_CONCURRENCY", "1"))
        )
        light: dict[str, Any] = dict(concurrency_limit=4)
        load_kw: dict[str, Any] = dict(concurrency_id="load", concurrency_limit=2)
        cs, cc, state = self.chat_settings, self.compare_settings, self.state
        with self.demo:
            self.demo.load(self.on_page_load, [state], [state, self.model_status], **load_kw)
            # ?present=1 ticks the switch (its change does the rest)
            self.demo.load(None, None, [self.present], js=PRESENT_FROM_URL_JS)
            self.load_btn.click(
                self.on_load_model,
                [self.model_box, state],
                [state, self.model_status, self.chatbot, self.chat_status],
                **load_kw,
            )
            view_out = [
                self.ins_summary,
                self.budget_plot,
                self.pref_plot,
                self.heads_plot,
                self.ins_gallery,
                self.strip,
                self.merges,
                self.trace_dl,
                self.report_dl,
            ]
            replay_out = [self.replay_summary, self.replay_gallery, self.replay_plot, self.replay_answer]
            self.present.change(
                self.on_present,
                [self.present, state, self.run_dd, self.layer_dd, self.head_dd, self.alpha],
                [state, *view_out],
                js=TOGGLE_PRESENT_JS,
                **light,
            )
            # .input, not .change: an example's own hyper-parameters are not overwritten
            cs["method"].input(self.on_method_change, [cs["method"]], [self.params], **light)
            for box, settings, event, shown in (
                (self.chat_in, cs, self.on_chat_preview, self.chat_preview),
                (self.cmp_in, cc, self.on_compare_preview, self.cmp_preview),
            ):
                box.change(
                    event,
                    [box, state, settings["num_frames"], settings["max_new_tokens"]],
                    [shown],
                    trigger_mode="always_last",
                    concurrency_id="preview",
                    concurrency_limit=2,
                    show_progress="hidden",
                )
            chat_inputs = [
                self.chat_in,
                state,
                *(cs[k] for k in ("method", "ratio", "tokens", "query_aware", "max_new_tokens", "num_frames")),
                self.params,
                cs["keep_cache"],
            ]
            chat_out = [self.chatbot, self.chat_in, self.chat_status, self.chat_summary, state, self.run_dd]
            self.chat_in.submit(self.on_chat, chat_inputs, chat_out, **model_kw)
            self.clear_btn.click(self.on_clear, [state], chat_out, **light)
            self.to_inspect.click(self.on_to_inspect, None, [self.tabs], **light)
            compare_out = [
                self.cmp_status,
                self.cmp_table,
                self.mem_plot,
                self.speed_plot,
                self.agree_plot,
                self.kept_plot,
                self.cmp_gallery,
                self.cmp_report,
                self.cmp_traces,
                state,
                self.run_dd,
            ]
            compare_keys = ("methods", "ratio", "tokens", "sweep", "query_aware", "max_new_tokens", "num_frames")
            compare_inputs = [self.cmp_in, *(cc[k] for k in compare_keys), cc["with_kl"], state, cc["followup"]]
            self.cmp_btn.click(self.on_compare, compare_inputs, compare_out, **model_kw)
            self.cmp_saved_btn.click(
                self.on_compare_saved, [self.cmp_files, self.cmp_examples, state], compare_out, **light
            )
            self.run_dd.change(
                self.on_run_change,
                [state, self.run_dd, self.alpha],
                [self.layer_dd, self.head_dd, *view_out, self.step, *replay_out],
                **light,
            )
            inspect_in = [state, self.run_dd, self.layer_dd, self.head_dd, self.alpha]
            for trigger in (self.layer_dd.input, self.head_dd.input, self.alpha.release):
                trigger(self.on_inspect, inspect_in, view_out, **light)
            replay_in = [state, self.run_dd, self.step, self.layer_dd, self.head_dd]
            for trigger in (self.layer_dd.input, self.head_dd.input, self.step.change):
                trigger(self.on_replay, replay_in, replay_out, trigger_mode="always_last", **light)
            self.prev_btn.click(self.on_prev, [self.step, state, self.run_dd], [self.step], **light)
            self.next_btn.click(self.on_next, [self.step, state, self.run_dd], [self.step], **light)
            play_out = [self.playing, self.timer, self.play_btn]
            self.play_btn.click(self.on_play, [self.playing], play_out, **light)
            self.timer.tick(
                self.on_tick, [self.step, state, self.run_dd, self.playing], [self.step, *play_out], **light
            )
            self.open_btn.click(
                self.on_open_runs,
                [self.ins_files, self.ins_examples, state, self.present],
                [state, self.ins_summary, self.run_dd],
                **light,
            )
            self.save_btn.click(self.on_save_run, [state, self.run_dd], [self.save_btn], **light)


def build_app(ctx: AppContext | None = None) -> AppUI:
    """Lay out the page over ``ctx``, which becomes the process's context (one app per process; the
    accelerator functions read it there). Default: the process's, made from the environment."""
    global _CONTEXT
    if ctx is not None:
        _CONTEXT = ctx
    return AppUI(context())


def build_demo(ctx: AppContext | None = None) -> gr.Blocks:
    """The app's ``gr.Blocks`` (what a Space serves)."""
    return build_app(ctx).demo


def __getattr__(name: str) -> Any:
    """``mmkv.app.demo``: built on first access (importing this module does no work)."""
    if name == "demo":
        globals()["demo"] = built = build_demo()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def queue_kwargs() -> dict[str, Any]:
    """One model run at a time by default (MMKV_CONCURRENCY), a bounded queue (MMKV_QUEUE_SIZE)."""
    return {"default_concurrency_limit": 1, "max_size": int(os.environ.get("MMKV_QUEUE_SIZE", "16"))}


def launch_kwargs(limits: Limits | None = None) -> dict[str, Any]:
    limits = limits or context().limits
    return {
        "server_name": os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
        # Gradio itself refuses (with a toast only) uploads over this; up to it, mmkv's checks refuse with a message
        "max_file_size": f"{max(4 * limits.max_upload_mb, 100):g}mb",
        "theme": gr.themes.Soft(),
        "css": CSS,
        "head": KEYS_JS,
        "allowed_paths": [str(EXAMPLES_DIR), str(RUNS_DIR)],
        "show_error": True,
    }


def main(demo: gr.Blocks | None = None) -> None:
    """Load the default model, then serve ``demo`` (default: :func:`build_demo` over the process's context)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per HTTP request Gradio makes
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx = context()
    try:
        loaded = ctx.store.get()
        print(f"mmkv app: model {loaded.describe()}", flush=True)
    except UserError as exc:  # the app still starts; the page says what to do
        print(f"mmkv app: could not load the default model: {exc}", flush=True)
    if ctx.notice:
        print("mmkv app: " + ctx.notice.replace("**", "").replace("`", ""), flush=True)
    kwargs = launch_kwargs(ctx.limits)
    demo = demo or build_demo(ctx)
    demo.queue(**queue_kwargs())
    host = "localhost" if kwargs["server_name"] in ("127.0.0.1", "0.0.0.0") else kwargs["server_name"]
    print(
        f"mmkv app: ready in {time.perf_counter() - _T_START:.1f} s — open http://{host}:{kwargs['server_port']}",
        flush=True,
    )
    demo.launch(**kwargs)


if __name__ == "__main__":
    main()
