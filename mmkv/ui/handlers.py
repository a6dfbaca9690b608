"""What each tab does, without Gradio: Chat turns, Compare runs, Inspect views, exports.

State lives in an :class:`AppState` per browser session (``gr.State``); models live in a shared
:class:`~mmkv.ui.models.ModelStore`. Every function validates everything before it touches the
state, so a bad request leaves the session as it was, and raises :class:`UserError` with a message
that says what to do.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

import viz

from ..driver import generate
from ..models import adapter_for
from ..trace import Trace
from .agreement import agreement, forced_logits
from .config import Limits
from .errors import UserError
from .inputs import check_method, parse_budget, parse_params, parse_sweep, user_content
from .models import LoadedModel, ModelStore

__all__ = [
    "ALL_LAYERS", "ALL_HEADS", "Run", "AppState", "ChatUpdate", "CompareResult", "InspectView",
    "select_model", "chat_turn", "compare", "inspect", "run_choices", "layer_choices", "head_choices",
    "COMPARE_HEADERS",
]

ALL_LAYERS = "all layers"
ALL_HEADS = "all KV heads"
MAX_RUNS = 8


@dataclass
class Run:
    """One finished generation, kept for Inspect (CPU objects only)."""

    label: str
    trace: Trace
    images: list[Image.Image]
    videos: list[Any]
    tokens: list[str]
    answer: str
    model: str
    agreement: dict[str, Any] | None = None


@dataclass
class AppState:
    """One browser session."""

    model: str = ""  # "" = the store's default model
    chat: list[dict[str, Any]] = field(default_factory=list)  # library chat (file paths)
    display: list[dict[str, Any]] = field(default_factory=list)  # gr.Chatbot messages
    runs: "OrderedDict[str, Run]" = field(default_factory=OrderedDict)
    last: str | None = None
    workdir: str | None = None

    def add_run(self, run: Run) -> None:
        self.runs.pop(run.label, None)
        self.runs[run.label] = run
        while len(self.runs) > MAX_RUNS:
            self.runs.popitem(last=False)
        self.last = run.label

    def folder(self) -> Path:
        if self.workdir is None or not os.path.isdir(self.workdir):
            self.workdir = tempfile.mkdtemp(prefix="mmkv-app-")
        return Path(self.workdir)

    def cleanup(self) -> None:
        """Remove this session's export folder (called when Gradio drops the session)."""
        if self.workdir and os.path.isdir(self.workdir):
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def clear_chat(self) -> None:
        self.chat = []
        self.display = []


# ---- helpers ----------------------------------------------------------------------------------
def _fmt_budget(budget: float | int) -> str:
    return f"{budget} tok" if isinstance(budget, int) else f"{budget:g}"


def _kib(n: int) -> float:
    return round(n / 1024, 1)


def _prepare(loaded: LoadedModel, chat: list[dict[str, Any]], num_frames: int) -> Any:
    try:
        return adapter_for(loaded.model).prepare(loaded.model, loaded.processor, chat, num_frames=int(num_frames))
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot prepare the prompt: {exc}") from exc


def _tokens(loaded: LoadedModel, prepared: Any) -> list[str]:
    tok = getattr(loaded.processor, "tokenizer", loaded.processor)
    ids = prepared.input_ids.reshape(-1).tolist()
    return [tok.decode([i]) for i in ids]


def _cpu_trace(trace: Trace) -> Trace:
    """Make sure nothing in the trace lives on an accelerator (ZeroGPU returns must be CPU objects)."""
    m = trace.modality
    if m is not None:
        for name in ("modality", "item", "row", "col"):
            setattr(m, name, getattr(m, name).cpu())
    return trace


def _whole_number_in_range(value: Any, what: str, high: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a whole number, got {value!r}") from None
    if not 1 <= n <= high:
        raise UserError(f"{what} must be between 1 and {high}, got {value}")
    return n


def _check_frames(num_frames: Any, limits: Limits) -> int:
    return _whole_number_in_range(num_frames, "frames per video", limits.max_frames)


def _check_new_tokens(max_new_tokens: Any, limits: Limits) -> int:
    return _whole_number_in_range(max_new_tokens, "max new tokens", limits.max_new_tokens)


def _message(value: Any) -> tuple[str, list[Any]]:
    """Text and files of a MultimodalTextbox value (or a plain string)."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return value, []
    if isinstance(value, dict):
        return str(value.get("text") or ""), list(value.get("files") or [])
    text = getattr(value, "text", "")
    return str(text or ""), list(getattr(value, "files", []) or [])


def summary_markdown(run: Run) -> str:
    s = run.trace.summary()
    t = run.trace
    lines = [
        f"**{run.label}** — {t.family or 'model'} · prompt {s['prompt_tokens']} tokens "
        f"({', '.join(f'{k} {v}' for k, v in (t.modality.counts().items() if t.modality else []) if v)}) · "
        f"{'query-aware' if t.query_aware else 'query-agnostic'}",
        "",
        "| kept | KV bytes (full → compressed → end) | prefill | compression | decode / token | new tokens |",
        "|---|---|---|---|---|---|",
        f"| {100 * s['kept_ratio']:.1f}% | {_kib(s['kv_bytes_full'])} → {_kib(s['kv_bytes_compressed'])} → "
        f"{_kib(s['kv_bytes_end'])} KiB | {s['prefill_ms']:.1f} ms | {s['compress_ms']:.1f} ms | "
        f"{s['decode_ms_per_token']:.2f} ms | {s['new_tokens']} |",
    ]
    return "\n".join(lines)


# ---- model -----------------------------------------------------------------------------------
def select_model(store: ModelStore, state: AppState, name: str | None) -> tuple[AppState, str]:
    """Load ``name`` (hub id or local path; empty = default) for this session."""
    name = (name or "").strip()
    loaded = store.get(name or None)  # raises UserError; the session keeps its previous model
    state.model = "" if loaded.name == store.default else loaded.name
    state.clear_chat()
    return state, f"Model: {loaded.describe()}"


# ---- Chat ------------------------------------------------------------------------------------
@dataclass
class ChatUpdate:
    state: AppState
    display: list[dict[str, Any]]
    status: str
    summary: str = ""
    done: bool = False


def chat_turn(
    store: ModelStore,
    state: AppState,
    message: Any,
    method: str,
    ratio: Any,
    tokens: Any = 0,
    query_aware: bool = True,
    max_new_tokens: Any = 48,
    num_frames: Any = 8,
    params: str | None = "",
    limits: Limits | None = None,
) -> Iterator[ChatUpdate]:
    """One chat turn, streamed: yields the growing answer; the last update has ``done=True``."""
    limits = limits or Limits()
    text, files = _message(message)
    method = check_method(method)
    budget = parse_budget(ratio, tokens)
    method_params = parse_params(method, params)
    n_new = _check_new_tokens(max_new_tokens, limits)
    n_frames = _check_frames(num_frames, limits)
    content = user_content(text, files, limits)
    loaded = store.get(state.model or None)
    chat = [*state.chat, {"role": "user", "content": content}]
    while sum(m["role"] == "user" for m in chat) > limits.max_turns:
        chat = chat[2:]  # drop the oldest turn (user + assistant)
    prepared = _prepare(loaded, chat, n_frames)
    try:
        stream = generate(loaded.model, loaded.processor, None, method=method, budget=budget, max_new_tokens=n_new,
                          query_aware=bool(query_aware), stream=True, prepared=prepared, **method_params)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    shown = [*state.display, *({"role": "user", "content": {"path": p[p["type"]]}} for p in content if p["type"] != "text"),
             {"role": "user", "content": text.strip()}]
    answer = ""
    yield ChatUpdate(state, [*shown, {"role": "assistant", "content": "…"}], f"Running {method} at budget {_fmt_budget(budget)} …")
    try:
        for delta in stream:
            answer += delta
            yield ChatUpdate(state, [*shown, {"role": "assistant", "content": answer or "…"}], "Generating …")
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    result = stream.result
    trace = _cpu_trace(result.trace)
    turn = sum(m["role"] == "user" for m in chat)
    run = Run(label=f"chat · {method} @ {_fmt_budget(budget)} · turn {turn}", trace=trace,
              images=list(prepared.images), videos=list(prepared.videos), tokens=_tokens(loaded, prepared),
              answer=result.text, model=loaded.name)
    state.chat = [*chat, {"role": "assistant", "content": [{"type": "text", "text": result.text}]}]
    state.display = [*shown, {"role": "assistant", "content": result.text or "(empty answer)"}]
    state.add_run(run)
    yield ChatUpdate(state, state.display, "Done — open **Inspect** to see what was kept.", summary_markdown(run), done=True)


# ---- Compare ---------------------------------------------------------------------------------
COMPARE_HEADERS = [
    "method", "budget", "answer", "kept %", "KV KiB full", "KV KiB kept", "KV KiB end",
    "prefill ms", "compress ms", "decode ms/tok", "overlap", "1st diff", "KL",
]


@dataclass
class CompareResult:
    state: AppState
    rows: list[dict[str, Any]]  # main-budget runs, Full first
    sweep: list[dict[str, Any]]  # budget-vs-quality points (all budgets, non-Full methods)
    figures: dict[str, Any]
    gallery: list[tuple[Image.Image, str]]
    status: str
    report_path: str | None = None
    traces_path: str | None = None

    def table(self) -> list[list[Any]]:
        out = []
        for r in self.rows:
            out.append([
                r["method"], _fmt_budget(r["budget"]), r["answer"], round(100 * r["kept_ratio"], 1),
                _kib(r["kv_bytes_full"]), _kib(r["kv_bytes_compressed"]), _kib(r["kv_bytes_end"]),
                r["prefill_ms"], r["compress_ms"], r["decode_ms_per_token"], r.get("overlap"),
                "—" if r.get("first_divergence") is None else r["first_divergence"], r.get("kl"),
            ])
        return out


def compare(
    store: ModelStore,
    state: AppState,
    message: Any,
    methods: Sequence[str] | None,
    ratio: Any,
    tokens: Any = 0,
    sweep: str | None = "",
    query_aware: bool = True,
    max_new_tokens: Any = 24,
    num_frames: Any = 8,
    with_kl: bool = True,
    limits: Limits | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> CompareResult:
    """The same prompt through Full and every chosen method (at the budget, and at each swept budget)."""
    limits = limits or Limits()
    text, files = _message(message)
    chosen = [check_method(m) for m in (methods or [])]
    if not [m for m in chosen if m != "full"]:
        raise UserError("choose at least one method besides Full to compare (Full is always run as the reference)")
    budget = parse_budget(ratio, tokens)
    budgets = parse_sweep(sweep)
    sweep_budgets = list(dict.fromkeys([budget, *budgets])) if budgets else [budget]
    others = [m for m in dict.fromkeys(chosen) if m != "full"]
    total = 1 + len(others) * len(sweep_budgets)
    if total > limits.max_compare_runs:
        raise UserError(
            f"that is {total} runs ({len(others)} methods × {len(sweep_budgets)} budgets + Full); the limit is "
            f"{limits.max_compare_runs}: choose fewer methods or budgets"
        )
    n_new = _check_new_tokens(max_new_tokens, limits)
    n_frames = _check_frames(num_frames, limits)
    content = user_content(text, files, limits)
    loaded = store.get(state.model or None)
    chat = [{"role": "user", "content": content}]
    prepared = _prepare(loaded, chat, n_frames)
    tokens_str = _tokens(loaded, prepared)
    step = [0]

    def tick(what: str) -> None:
        step[0] += 1
        if progress is not None:
            progress(step[0] / (total + 1), what)

    def run_one(method: str, b: float | int) -> Any:
        try:
            return generate(loaded.model, loaded.processor, None, method=method, budget=b, max_new_tokens=n_new,
                            query_aware=bool(query_aware), prepared=prepared)
        except ValueError as exc:
            raise UserError(str(exc)) from exc

    t0 = time.perf_counter()
    tick("Full")
    full = run_one("full", 1.0)
    full_ids = list(full.token_ids)
    full_logits = forced_logits(loaded.model, prepared, "full", 1.0, full_ids, query_aware=bool(query_aware)) if with_kl else None
    results: list[tuple[str, float | int, Any, dict[str, Any]]] = [("full", 1.0, full, agreement(full_ids, full_ids, full_logits, full_logits))]
    for method in others:
        for b in sweep_budgets:
            tick(f"{method} @ {_fmt_budget(b)}")
            res = run_one(method, b)
            logits = forced_logits(loaded.model, prepared, method, b, full_ids, query_aware=bool(query_aware)) if with_kl else None
            results.append((method, b, res, agreement(full_ids, res.token_ids, full_logits, logits)))
    elapsed = time.perf_counter() - t0

    rows, points = [], []
    for method, b, res, agr in results:
        row = {"label": method if method == "full" else f"{method} @ {_fmt_budget(b)}", "method": method, "budget": b,
               "answer": res.text, **res.trace.summary(), **agr}
        row["method"], row["budget"] = method, b  # summary() also has these keys
        if method != "full":
            points.append(row)
        if method == "full" or b == budget:
            rows.append(row)
    for method, b, res, agr in results:
        if method == "full" or b == budget:
            label = f"compare · {method} @ {_fmt_budget(b)}"
            state.add_run(Run(label=label, trace=_cpu_trace(res.trace), images=list(prepared.images),
                              videos=list(prepared.videos), tokens=tokens_str, answer=res.text, model=loaded.name,
                              agreement=agr))
    main = [(r["label"], res.trace) for (m, b, res, _), r in zip([x for x in results if x[0] == "full" or x[1] == budget], rows)]
    figures = {
        "memory": viz.memory_figure(rows),
        "speed": viz.speed_figure(rows),
        "agreement": viz.sweep_figure(points) if budgets else viz.agreement_figure(rows),
        "kept": viz.keep_map_figure(main),
    }
    gallery: list[tuple[Image.Image, str]] = []
    for label, trace in main:
        if label == "full":
            continue
        panels = viz.overlay_panels(trace, prepared.images, prepared.videos, max_frames=2, min_side=192)
        first_per_source: dict[tuple[int, int], viz.Panel] = {}
        for p in panels:
            first_per_source.setdefault((p.modality, p.source), p)
        for p in list(first_per_source.values())[:3]:
            gallery.append((p.image, f"{label}: {p.caption}"))
    folder = state.folder()
    report = folder / "compare-report.html"
    report.write_text(viz.figures_html(list(figures.items()), gallery, title="mmkv compare",
                                       notes=json.dumps([{k: v for k, v in r.items() if k != "label"} for r in rows], indent=1, default=str)),
                      encoding="utf-8")
    traces = folder / "compare-traces.json"
    traces.write_text(json.dumps({label: trace.to_dict() for label, trace in main}), encoding="utf-8")
    status = (f"Ran {len(results)} generations in {elapsed:.1f} s on `{loaded.name}` "
              f"({'query-aware' if query_aware else 'query-agnostic'}; KL by teacher-forcing Full's answer"
              f"{'' if with_kl else ' — off'}). Open **Inspect** for any of them.")
    return CompareResult(state, rows, points, figures, gallery, status, str(report), str(traces))


# ---- Inspect ---------------------------------------------------------------------------------
def run_choices(state: AppState) -> list[str]:
    return list(reversed(list(state.runs)))


def layer_choices(trace: Trace | None) -> list[str]:
    return [ALL_LAYERS] + ([f"layer {lt.layer}" for lt in trace.layers] if trace is not None else [])


def head_choices(trace: Trace | None) -> list[str]:
    return [ALL_HEADS] + ([f"KV head {h}" for h in range(trace.num_kv_heads)] if trace is not None else [])


def _pick(choice: Any, prefix: str, limit: int, what: str) -> int | None:
    if choice in (None, "", ALL_LAYERS, ALL_HEADS):
        return None
    text = str(choice).removeprefix(prefix).strip()
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"unknown {what} {choice!r}: pick one from the list") from None
    if not 0 <= value < limit:
        raise UserError(f"{what} {value} is out of range (0–{limit - 1})")
    return value


@dataclass
class InspectView:
    run: Run
    layer: int | None
    head: int | None
    summary: str
    figures: dict[str, Any]
    gallery: list[tuple[Image.Image, str]]
    strip: list[tuple[str, str | None]]
    merges: list[dict[str, Any]]
    trace_path: str
    report_path: str


def inspect(state: AppState, label: str | None, layer: Any = None, head: Any = None, alpha: float = 0.5) -> InspectView:
    """Everything the Inspect tab shows for one run at one (layer, head) selection."""
    if not state.runs:
        raise UserError("nothing to inspect yet: send a message in Chat or run Compare first")
    label = label or state.last
    if label not in state.runs:
        raise UserError(f"no run named {label!r} in this session: pick one from the list")
    run = state.runs[label]
    trace = run.trace
    layer_i = _pick(layer, "layer", trace.num_layers, "layer")
    head_i = _pick(head, "KV head", trace.num_kv_heads, "KV head")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        alpha = 0.5
    alpha = min(max(alpha, 0.0), 1.0)
    figures = {
        "budget": viz.budget_figure(trace),
        "preference": viz.modality_heatmap(trace),
        "heads": viz.head_budget_figure(trace),
    }
    panels = viz.overlay_panels(trace, run.images, run.videos, layer_i, head_i, alpha=alpha)
    gallery = [(p.image, p.caption) for p in panels]
    strip = viz.token_strip(trace, run.tokens, layer_i, head_i)
    merges = viz.merge_rows(trace, run.tokens, layer_i, head_i)
    where = f"{'all layers' if layer_i is None else f'layer {layer_i}'}, {'all KV heads' if head_i is None else f'KV head {head_i}'}"
    summary = summary_markdown(run) + f"\n\n**Answer:** {run.answer or '(empty)'}\n\nShowing: {where}. " + (
        "Cells and tokens show the share of (layer, head) pairs that kept them." if layer_i is None or head_i is None
        else "Green kept · red evicted · blue merged into a kept token (white lines point to it).")
    if run.agreement:
        a = run.agreement
        summary += f"\n\nAgreement with Full: token overlap {a['overlap']}, first divergence {a['first_divergence']}, KL {a['kl']}."
    folder = state.folder()
    # one file of each kind per session (overwritten): a long session does not pile up exports
    trace_path = folder / f"trace-{trace.method}.json"
    for old in folder.glob("trace-*.json"):
        if old != trace_path:
            old.unlink(missing_ok=True)
    trace.to_json(trace_path)
    report_path = folder / "inspect-figures.html"
    report_path.write_text(viz.figures_html(list(figures.items()), gallery, title=f"mmkv · {label} · {where}",
                                            notes=json.dumps(trace.summary(), indent=1)), encoding="utf-8")
    return InspectView(run, layer_i, head_i, summary, figures, gallery, strip, merges, str(trace_path), str(report_path))
