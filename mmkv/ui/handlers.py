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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

import viz

from ..models import adapter_for
from ..runtime.conversation import Conversation
from ..runtime.driver import generate
from ..trace.core import Trace
from .agreement import agreement, forced_logits
from .capacity import check_capacity
from .config import Limits
from .errors import UserError
from .inputs import check_method, parse_budget, parse_params, parse_sweep, user_content
from .models import LoadedModel, ModelStore

__all__ = [
    "ALL_LAYERS",
    "ALL_HEADS",
    "Run",
    "AppState",
    "ChatUpdate",
    "CompareResult",
    "InspectView",
    "select_model",
    "chat_turn",
    "compare",
    "inspect",
    "run_choices",
    "layer_choices",
    "head_choices",
    "COMPARE_HEADERS",
]

ALL_LAYERS = "all layers"
ALL_HEADS = "all KV heads"
MAX_RUNS = 24  # runs a session keeps for Inspect (a Compare sweep adds one per method and budget)


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
    runs: OrderedDict[str, Run] = field(default_factory=OrderedDict)
    last: str | None = None
    workdir: str | None = None
    present: bool = False  # presentation mode: figures with large type and thick lines
    # Chat's kept cache (mmkv.Conversation) and the settings it was compressed with; None = re-read next turn
    conversation: Conversation | None = field(default=None, repr=False)
    conversation_key: tuple[Any, ...] | None = None
    prefill_rate: float | None = None  # tokens per second of this conversation's last full read

    def add_run(self, run: Run) -> str:
        """Keep ``run`` for Inspect under a label no other run of the session has (returned)."""
        label, n = run.label, 2
        while label in self.runs:
            label, n = f"{run.label} ({n})", n + 1
        run.label = label
        self.runs[run.label] = run
        while len(self.runs) > MAX_RUNS:
            self.runs.popitem(last=False)
        self.last = run.label
        return run.label

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
        self.drop_cache()

    def drop_cache(self) -> None:
        """Free Chat's kept cache (the next turn re-reads the conversation)."""
        if self.conversation is not None:
            self.conversation.reset()
        self.conversation, self.conversation_key = None, None

    @property
    def cache_bytes(self) -> int:
        """Physical KV bytes Chat's kept cache holds (0 when none is kept)."""
        return 0 if self.conversation is None else self.conversation.cache_bytes

    def clear_chat(self) -> None:
        self.chat = []
        self.display = []
        self.drop_cache()


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
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a whole number, got {value!r}") from None
    if isinstance(value, bool) or not number.is_integer():  # 2.5 is refused, not rounded; NaN / inf too
        raise UserError(f"{what} must be a whole number, got {value!r}")
    n = int(number)
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


def _conversation_key(loaded: LoadedModel, method: str, budget: Any, params: dict[str, Any], *rest: Any) -> tuple:
    """The settings a kept cache was compressed with: a turn with other settings re-reads the conversation."""
    return (loaded.label, method, budget, json.dumps(params, sort_keys=True, default=str), *rest)


def _fit_context(
    loaded: LoadedModel, chat: list[dict[str, Any]], n_frames: int, n_new: int, limits: Limits
) -> tuple[list[dict[str, Any]], Any, int]:
    """Drop the oldest turns (user + answer) until the conversation fits the turn limit and the model's
    context (or only the new turn is left); returns the chat, its prepared inputs and the turns dropped."""
    dropped = 0
    while sum(m["role"] == "user" for m in chat) > limits.max_turns:
        chat, dropped = chat[2:], dropped + 1
    while True:
        prepared = _prepare(loaded, chat, n_frames)
        try:
            check_capacity(loaded, prepared, n_new)
            return chat, prepared, dropped
        except UserError:
            if len(chat) <= 1:  # the new turn alone does not fit: its own message says how to shrink it
                raise
            chat, dropped = chat[2:], dropped + 1


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
    keep_cache: bool = True,
) -> Iterator[ChatUpdate]:
    """One chat turn, streamed: yields the growing answer; the last update has ``done=True``.

    ``keep_cache``: keep the compressed cache after the answer and prefill only the next turn's tokens
    against it (:class:`mmkv.Conversation`); else every turn re-reads the whole conversation. A turn whose
    settings differ from the kept cache's, or that needs the oldest turns dropped, re-reads.
    """
    limits = limits or Limits()
    text, files = _message(message)
    method = check_method(method)
    budget = parse_budget(ratio, tokens)
    method_params = parse_params(method, params)
    n_new = _check_new_tokens(max_new_tokens, limits)
    n_frames = _check_frames(num_frames, limits)
    content = user_content(text, files, limits)
    loaded = store.get(state.model or None)
    chat, prepared, dropped = _fit_context(
        loaded, [*state.chat, {"role": "user", "content": content}], n_frames, n_new, limits
    )
    key = _conversation_key(loaded, method, budget, method_params, bool(query_aware), n_frames)
    continuing = keep_cache and not dropped and state.conversation is not None and state.conversation_key == key
    try:
        if not keep_cache:
            state.drop_cache()
            stream: Any = generate(
                loaded.model,
                loaded.processor,
                None,
                method=method,
                budget=budget,
                max_new_tokens=n_new,
                query_aware=bool(query_aware),
                stream=True,
                prepared=prepared,
                **method_params,
            )
        else:
            if not continuing:
                state.drop_cache()
                conversation = Conversation(
                    loaded.model,
                    loaded.processor,
                    method,
                    budget,
                    query_aware=bool(query_aware),
                    num_frames=n_frames,
                    **method_params,
                )
                conversation.start_from(chat[:-1])
                state.conversation, state.conversation_key = conversation, key
            assert state.conversation is not None
            try:
                stream = state.conversation.stream(text, media=content[:-1], max_new_tokens=n_new)
            except ValueError as exc:
                if not continuing or "reread=True" not in str(exc):
                    raise
                # this family cannot attach new media to a kept cache: this turn re-reads (and keeps that cache)
                stream = state.conversation.stream(text, media=content[:-1], max_new_tokens=n_new, reread=True)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    shown = [
        *state.display,
        *({"role": "user", "content": {"path": p[p["type"]]}} for p in content if p["type"] != "text"),
        {"role": "user", "content": text.strip()},
    ]
    answer = ""
    yield ChatUpdate(
        state, [*shown, {"role": "assistant", "content": "…"}], f"Running {method} at budget {_fmt_budget(budget)} …"
    )
    try:
        for delta in stream:
            answer += delta
            yield ChatUpdate(state, [*shown, {"role": "assistant", "content": answer or "…"}], "Generating …")
    except ValueError as exc:
        state.drop_cache()  # a turn that failed half-way leaves no half-updated cache behind
        raise UserError(str(exc)) from exc
    result = stream.run()  # the deltas are all read: this only returns the result
    trace = _cpu_trace(result.trace)
    turn = sum(m["role"] == "user" for m in chat)
    # a TurnResult says how much of the conversation this turn read; a plain re-read read all of it
    kept_cache = getattr(result, "prefilled", result.prepared.length) < result.prepared.length
    how = " · kept cache" if kept_cache else ""
    run = Run(
        label=f"chat · {method} @ {_fmt_budget(budget)} · turn {turn}{how}",
        trace=trace,
        images=list(result.prepared.images),
        videos=list(result.prepared.videos),
        tokens=_tokens(loaded, result.prepared),
        answer=result.text,
        model=loaded.label,
    )
    state.chat = [*chat, {"role": "assistant", "content": [{"type": "text", "text": result.text}]}]
    state.display = [*shown, {"role": "assistant", "content": result.text or "(empty answer)"}]
    state.add_run(run)
    notes = []
    if dropped:
        notes.append(
            f"The conversation had grown past the model's context or the turn limit: the oldest {dropped} turn(s) "
            "were dropped (Clear conversation starts over)."
        )
    if not any(p["type"] != "text" for m in state.chat for p in m["content"] if isinstance(p, dict)):
        notes.append("No image or video was attached, so it answered from the text alone (attach files with the clip).")
    status = " ".join(["Done — open **Inspect** to see what was kept.", *notes])
    yield ChatUpdate(state, state.display, status, summary_markdown(run) + turn_markdown(state, result), done=True)


def turn_markdown(state: AppState, result: Any) -> str:
    """What this turn cost: tokens prefilled, bytes held after it, and the time a kept cache saved (or would)."""
    length, prefill_s = int(result.prepared.length), float(result.trace.timings.prefill_s)
    prefilled = int(getattr(result, "prefilled", length))
    if prefilled >= length:  # a full read: its rate estimates what a re-read costs in later turns
        state.prefill_rate = length / prefill_s if prefill_s > 0 else None
    kept = state.conversation is not None
    held = state.cache_bytes if kept else int(result.trace.bytes_end)
    line = (
        f"\n\n**This turn** read {prefilled:,} of the conversation's {length:,} tokens in {1000 * prefill_s:.1f} ms; "
        + (f"KV kept for the next turn: {_kib(held)} KiB" if kept else f"KV held at the answer's end: {_kib(held)} KiB")
    )
    if prefilled < length and state.prefill_rate:
        reread_s = length / state.prefill_rate
        line += (
            f". A re-read would prefill all {length:,} tokens: about {1000 * reread_s:.0f} ms at this conversation's "
            f"last full-read rate, so the kept cache saved about {1000 * max(reread_s - prefill_s, 0.0):.0f} ms"
        )
    elif state.conversation is None:
        line += " (freed: with the cache not kept, every turn re-reads the whole conversation)"
    return line + "."


# ---- Compare ---------------------------------------------------------------------------------
#: The Compare table (10 columns, fits 1400 px; the memory chart has the bytes at the end, Inspect the compression time).
COMPARE_HEADERS = [
    "method",
    "budget",
    "answer",
    "kept %",
    "KV KiB kept / full",
    "prefill ms",
    "decode ms/token",
    "overlap",
    "1st diff",
    "KL",
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
            out.append(
                [
                    r["method"],
                    _fmt_budget(r["budget"]),
                    r["answer"],
                    round(100 * r["kept_ratio"], 1),
                    f"{_kib(r['kv_bytes_compressed']):g} / {_kib(r['kv_bytes_full']):g}",
                    round(r["prefill_ms"], 1),
                    round(r["decode_ms_per_token"], 2),
                    r.get("overlap"),
                    "—" if r.get("first_divergence") is None else r["first_divergence"],
                    None if r.get("kl") is None else round(r["kl"], 4),
                ]
            )
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
    followup: str | None = "",
) -> CompareResult:
    """The same prompt through Full and every chosen method (at the budget, and at each swept budget).

    With a ``followup`` question each run is a two-question conversation whose compressed cache is kept
    between the questions (:class:`mmkv.Conversation`): the table, figures and overlays show the second
    turn, the answer column both answers (no KL: teacher forcing is for one turn)."""
    limits = limits or Limits()
    text, files = _message(message)
    follow = (followup or "").strip()
    if len(follow) > limits.max_prompt_chars:
        raise UserError(f"the follow-up has {len(follow)} characters; the limit is {limits.max_prompt_chars}")
    with_kl = with_kl and not follow
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
    check_capacity(loaded, prepared, n_new)
    tokens_str = _tokens(loaded, prepared)
    step = [0]

    def tick(what: str) -> None:
        step[0] += 1
        if progress is not None:
            progress(step[0] / (total + 1), what)

    first_answers: dict[tuple[str, float | int], str] = {}

    def run_one(method: str, b: float | int) -> Any:
        try:
            if not follow:
                return generate(
                    loaded.model,
                    loaded.processor,
                    None,
                    method=method,
                    budget=b,
                    max_new_tokens=n_new,
                    query_aware=bool(query_aware),
                    prepared=prepared,
                )
            conversation = Conversation(
                loaded.model, loaded.processor, method, b, query_aware=bool(query_aware), num_frames=n_frames
            )
            first = conversation.ask(text, media=content[:-1], max_new_tokens=n_new)
            second = conversation.ask(follow, max_new_tokens=n_new)
            conversation.reset()  # the run's trace keeps what Inspect needs; the cache goes
            first_answers[(method, b)] = first.text
            return second
        except ValueError as exc:
            raise UserError(str(exc)) from exc

    t0 = time.perf_counter()
    tick("Full")
    full = run_one("full", 1.0)
    full_ids = list(full.token_ids)
    full_logits = (
        forced_logits(loaded.model, prepared, "full", 1.0, full_ids, query_aware=bool(query_aware)) if with_kl else None
    )
    results: list[tuple[str, float | int, Any, dict[str, Any]]] = [
        ("full", 1.0, full, agreement(full_ids, full_ids, full_logits, full_logits))
    ]
    for method in others:
        for b in sweep_budgets:
            tick(f"{method} @ {_fmt_budget(b)}")
            res = run_one(method, b)
            logits = (
                forced_logits(loaded.model, prepared, method, b, full_ids, query_aware=bool(query_aware))
                if with_kl
                else None
            )
            results.append((method, b, res, agreement(full_ids, res.token_ids, full_logits, logits)))
    elapsed = time.perf_counter() - t0

    runs: list[tuple[Run, float | int]] = []
    for method, b, res, agr in results:
        label = method if method == "full" else f"{method} @ {_fmt_budget(b)}"
        seen = res.prepared if follow else prepared  # a follow-up's run shows the whole conversation
        runs.append(
            (
                Run(
                    label=label + (" · turn 2" if follow else ""),
                    trace=_cpu_trace(res.trace),
                    images=list(seen.images),
                    videos=list(seen.videos),
                    tokens=_tokens(loaded, seen) if follow else tokens_str,
                    answer=f"{first_answers[(method, b)]} ⟶ {res.text}" if follow else res.text,
                    model=loaded.label,
                    agreement=agr,
                ),
                b,
            )
        )
    kl = "no KL for a two-question conversation" if follow else "KL by teacher-forcing Full's answer"
    status = (
        f"Ran {len(results)} {'two-question conversations (cache kept between the questions)' if follow else 'generations'}"
        f" in {elapsed:.1f} s on `{loaded.label}` "
        f"({'query-aware' if query_aware else 'query-agnostic'}; {kl}"
        f"{'' if with_kl or follow else ' — off'}). Open **Inspect** for any of them."
    )
    return _assemble(state, runs, budget, bool(budgets), status, prefix="compare · ")


def _assemble(
    state: AppState,
    runs: Sequence[tuple[Run, float | int]],
    budget: float | int | None,
    swept: bool,
    status: str,
    prefix: str,
) -> CompareResult:
    """The Compare view of finished runs: the table (Full and the main budget), figures, overlays, exports.

    Every run is also kept for Inspect (label ``prefix + label``); ``budget`` None = every run is a row.
    """
    rows, points, main = [], [], []
    for run, b in runs:
        t = run.trace
        row = {"label": run.label, "answer": run.answer, **t.summary(), **(run.agreement or {})}
        row["method"], row["budget"] = t.method, b  # summary() has these keys too
        if t.method != "full":
            points.append(row)
        if budget is None or t.method == "full" or b == budget:
            rows.append(row)
            main.append((run.label, t, run))
    for run, _ in runs:
        state.add_run(replace(run, label=prefix + run.label))
    present = state.present
    figures = {
        "memory": viz.memory_figure(rows, present=present),
        "speed": viz.speed_figure(rows, present=present),
        "agreement": viz.sweep_figure(points, present=present)
        if swept
        else viz.agreement_figure(rows, present=present),
        "kept": viz.keep_map_figure([(label, t) for label, t, _ in main], present=present),
    }
    gallery: list[tuple[Image.Image, str]] = []
    for _label, trace, run in main:
        if trace.method == "full":
            continue
        panels = viz.overlay_panels(trace, run.images, run.videos, max_frames=2, min_side=192, present=present)
        first_per_source: dict[tuple[int, int], viz.Panel] = {}
        for p in panels:
            first_per_source.setdefault((p.modality, p.source), p)
        for p in list(first_per_source.values())[:3]:
            caption = f"{viz.method_name(trace.method)} @ {_fmt_budget(trace.budget)} · {p.caption}"
            gallery.append((viz.with_title(p.image, caption, present), caption))
    folder = state.folder()
    report = folder / "compare-report.html"
    report.write_text(
        viz.figures_html(
            list(figures.items()),
            gallery,
            title="mmkv compare",
            notes=json.dumps([{k: v for k, v in r.items() if k != "label"} for r in rows], indent=1, default=str),
        ),
        encoding="utf-8",
    )
    traces = folder / "compare-traces.json"
    traces.write_text(json.dumps({label: trace.to_dict() for label, trace, _ in main}), encoding="utf-8")
    return CompareResult(state, rows, points, figures, gallery, status, str(report), str(traces))


# ---- saved runs (run files) ------------------------------------------------------------------
def _read_runs(files: Sequence[Any] | None) -> list[Run]:
    from ..trace.runfile import SUFFIX, load_run
    from .inputs import file_path

    if not files:
        raise UserError(
            f"choose one or more saved runs ({SUFFIX} files, from `mmkv run --save`, `mmkv.save_run` or "
            "the app's Download run button)"
        )
    runs = []
    for entry in files:
        path = Path(file_path(entry))
        if path.suffix != SUFFIX:
            raise UserError(f"{path.name} is not a saved run: open {SUFFIX} files")
        try:
            rf = load_run(path)
        except (ValueError, OSError) as exc:
            raise UserError(str(exc).replace(str(path), path.name)) from None
        fields_ = rf.app_fields()
        fields_["label"] = fields_["label"] or path.stem
        runs.append(Run(**fields_))
    return runs


def open_runs(state: AppState, files: Sequence[Any] | None) -> tuple[AppState, str]:
    """Add saved runs to the session's Inspect list (no model needed); returns the state and a status line."""
    runs = _read_runs(files)
    labels = [state.add_run(replace(run, label=f"saved · {run.label}")) for run in runs]
    return state, f"Opened {len(labels)} saved run{'s' if len(labels) > 1 else ''}: " + ", ".join(
        f"**{x}**" for x in labels
    )


def compare_runs(state: AppState, files: Sequence[Any] | None) -> CompareResult:
    """Compare saved runs side by side (no model needed): the same table, figures and overlays as a live Compare."""
    runs = _read_runs(files)
    runs.sort(key=lambda r: r.trace.method != "full")  # Full first, as in a live Compare
    status = (
        f"Compared {len(runs)} saved run{'s' if len(runs) > 1 else ''} (no model was run; numbers as recorded). "
        "Open **Inspect** for any of them."
    )
    return _assemble(state, [(r, r.trace.budget) for r in runs], None, False, status, prefix="saved · ")


def save_run(state: AppState, label: str | None) -> str:
    """Write the Inspect run ``label`` as a run file in the session folder; returns its path."""
    from ..trace.runfile import SUFFIX, RunFile

    run = _run(state, label)
    saved_as = run.label.removeprefix("saved · ")  # opening adds it again: never "saved · saved · ..."
    rf = RunFile(
        trace=run.trace,
        images=run.images,
        videos=run.videos,
        tokens=run.tokens,
        answer=run.answer,
        model=run.model,
        label=saved_as,
        agreement=run.agreement,
    )
    folder = state.folder()
    for old in folder.glob(f"*{SUFFIX}"):
        old.unlink(missing_ok=True)
    name = "".join(c if c.isalnum() or c in "-_.@" else "-" for c in saved_as).strip("-")[:80] or "run"
    return str(rf.save(folder / f"{name}{SUFFIX}"))


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


def _run(state: AppState, label: str | None) -> Run:
    if not state.runs:
        raise UserError("nothing to inspect yet: send a message in Chat, run Compare, or open a saved run")
    label = label or state.last
    if label is None or label not in state.runs:
        raise UserError(f"no run named {label!r} in this session: pick one from the list")
    return state.runs[label]


def inspect(state: AppState, label: str | None, layer: Any = None, head: Any = None, alpha: float = 0.5) -> InspectView:
    """Everything the Inspect tab shows for one run at one (layer, head) selection."""
    run = _run(state, label)
    trace = run.trace
    layer_i = _pick(layer, "layer", trace.num_layers, "layer")
    head_i = _pick(head, "KV head", trace.num_kv_heads, "KV head")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        alpha = 0.5
    alpha = min(max(alpha, 0.0), 1.0)
    present = state.present
    figures = {
        "budget": viz.budget_figure(trace, present=present),
        "preference": viz.modality_heatmap(trace, present=present),
        "heads": viz.head_budget_figure(trace, present=present),
    }
    panels = viz.overlay_panels(trace, run.images, run.videos, layer_i, head_i, alpha=alpha, present=present)
    gallery = [(viz.with_title(p.image, p.caption, present), p.caption) for p in panels]
    strip = viz.token_strip(trace, run.tokens, layer_i, head_i, present=present)
    merges = viz.merge_rows(trace, run.tokens, layer_i, head_i)
    where = f"{'all layers' if layer_i is None else f'layer {layer_i}'}, {'all KV heads' if head_i is None else f'KV head {head_i}'}"
    summary = (
        summary_markdown(run)
        + f"\n\n**Answer:** {run.answer or '(empty)'}\n\nShowing: {where}. "
        + (
            "The brighter a cell, the more (layer, KV head) pairs kept it; the map beside each picture gives the share."
            if layer_i is None or head_i is None
            else "Kept: the picture's own colours, blue outline · evicted: faded, vermillion hatching · merged into a kept token: "
            "faded, yellow dots (white lines point to the token that absorbed it)."
        )
    )
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
    report_path.write_text(
        viz.figures_html(
            list(figures.items()),
            gallery,
            title=f"mmkv · {run.label} · {where}",
            notes=json.dumps(trace.summary(), indent=1),
        ),
        encoding="utf-8",
    )
    return InspectView(
        run, layer_i, head_i, summary, figures, gallery, strip, merges, str(trace_path), str(report_path)
    )


# ---- decode replay ---------------------------------------------------------------------------
@dataclass
class ReplayView:
    summary: str
    gallery: list[tuple[Image.Image, str]]
    figure: Any
    answer: list[tuple[str, str | None]]


def replay_steps(trace: Trace | None) -> int:
    """Decode steps recorded in ``trace`` (0 when it has no decode record)."""
    return int(trace.decode_steps) if trace is not None and trace.step_lengths else 0


def replay(state: AppState, label: str | None, step: Any = 0, layer: Any = None, head: Any = None) -> ReplayView:
    """The cache after one decode step (``mmkv.trace.replay``): painted over the pictures, bytes held, the token."""
    run = _run(state, label)
    trace = run.trace
    steps = replay_steps(trace)
    if steps == 0:
        return ReplayView(
            "This run has no decode record (it was made before mmkv recorded decode steps): run it again.", [], None, []
        )
    try:
        at = int(float(step or 0))
    except (TypeError, ValueError):
        raise UserError(f"the decode step must be a whole number, got {step!r}") from None
    at = min(max(at, 0), steps - 1)
    layer_i = _pick(layer, "layer", trace.num_layers, "layer")
    head_i = _pick(head, "KV head", trace.num_kv_heads, "KV head")
    s = trace.step_state(at, layer_i, head_i)
    present = state.present
    panels = viz.replay_panels(trace, run.images, run.videos, s, present=present)
    figure = viz.replay_bytes_figure(trace, at, present=present)
    pieces = list(trace.generated_tokens[: at + 1])
    answer = [(p if p.strip() else repr(p), "this step" if i == at else None) for i, p in enumerate(pieces)]
    pairs = max(s.pairs, 1)
    held = int(round(float(s.held.sum()) * pairs))
    events = []
    if s.evicted_now.any():
        events.append(
            f"**{int(round(float(s.evicted_now.sum()) * pairs))}** (token, KV head) pairs evicted at this step (H2O)"
        )
    if s.dynamic_pairs:
        events.append(
            f"**{int(round(float(s.retrieved.sum()) * pairs))}** tokens' worth of chunks retrieved for this step's "
            f"query by {s.dynamic_pairs} dynamic head(s) (HybridKV), "
            f"{int(round(float(s.fetched.sum()) * pairs))} newly copied from host memory"
        )
    token = pieces[at] if pieces else ""
    where = f"{'all layers' if layer_i is None else f'layer {layer_i}'}, {'all KV heads' if head_i is None else f'KV head {head_i}'}"
    summary = (
        f"**Step {at} of {steps - 1}** · this step generates **{token!r}** · the cache holds {held:,} (token, KV head) "
        f"pairs over {where}"
        + (f" · {_kib(s.bytes)} KiB on the device" if s.bytes is not None else "")
        + "."
        + (
            "\n\n" + "; ".join(events) + "."
            if events
            else "\n\nNothing changes in the prompt's cache at this step (only the new token is appended)."
        )
    )
    gallery = [(viz.with_title(p.image, p.caption, present), p.caption) for p in panels]
    return ReplayView(summary + "\n\n" + " · ".join(viz.REPLAY_WORDS.values()) + ".", gallery, figure, answer)


# ---- example runs and the prompt preview -------------------------------------------------------
def example_run_choices() -> list[tuple[str, str]]:
    """(title, file name) of the shipped example runs, for a dropdown."""
    from ..trace.runfile import example_runs

    return [
        (f"{Path(e['file']).stem[:2]} · {e.get('label') or Path(e['file']).stem}", Path(e["file"]).name)
        for e in example_runs()
    ]


def example_run_files(names: Sequence[str] | str | None) -> list[str]:
    """Paths of the chosen shipped example runs (names as :func:`example_run_choices` gives them)."""
    from ..trace.runfile import RUNS_DIR, example_runs

    if not names:
        return []
    names = [names] if isinstance(names, str) else list(names)
    known = {Path(e["file"]).name for e in example_runs()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"no example run named {', '.join(map(repr, unknown))}: pick one from the list")
    return [str(RUNS_DIR / n) for n in names]


def message_parts(value: Any) -> tuple[str, list[Any]]:
    """Text and files of a MultimodalTextbox value (or a plain string)."""
    return _message(value)


def preview(
    store: ModelStore,
    state: AppState,
    message: Any,
    num_frames: Any = 8,
    max_new_tokens: Any = 0,
    limits: Limits | None = None,
) -> str:
    """One line about the prompt before it runs: its tokens per modality, its KV bytes, whether it fits."""
    from .capacity import prompt_preview

    limits = limits or Limits()
    text, files = _message(message)
    if not files and not text.strip():
        return ""
    if not store.is_loaded(state.model or None):
        return ""  # never load a model for a preview
    content = user_content(text or "?", files, limits)
    loaded = store.get(state.model or None)
    prepared = _prepare(loaded, [*state.chat, {"role": "user", "content": content}], _check_frames(num_frames, limits))
    try:
        new = int(max_new_tokens or 0)
    except (TypeError, ValueError):
        new = 0
    return prompt_preview(loaded, prepared, max(new, 0)).summary()
