"""``mmkv eval``: accuracy and fidelity to the Full cache, per task x method x budget x query mode.

On the synthetic suite (`mmkv.tiny.tasks`, held-out seeds) every answer is checked against its scene.
With ``--milebench DIR`` the samples come from MileBench-format data in a local folder instead
(:mod:`mmkv.experiments.milebench`) and each answer gets the benchmark's own score (accuracy, or ROUGE-L for
open-ended datasets); the ``accuracy`` column is then the mean score. Fidelity to Full is measured on the
same samples:

- ``agreement``: the share of samples whose answer is token for token Full's answer;
- ``kl``: the mean over samples of the mean next-token ``KL(P_full || P_method)`` along Full's answer,
  teacher-forced through the method's compressed cache (:func:`mmkv.runtime.driver.forced_logits`).

The work is cut into **cells** (one shard of one task's samples x method x budget x query mode, key
``task/shard/method@budget/qa|qg``). Each finished cell is appended at once to ``OUT/results.jsonl``
(:class:`mmkv.experiments.records.ResultStore`) with every sample's score, answer text and generated token ids;
``--resume`` skips the cells already there, and a cell written twice counts once. Full's cell of a shard
runs before that shard's other cells, which read Full's answers from the store. ``--ray [ADDRESS]`` runs
the cells on a Ray cluster (:mod:`mmkv.experiments.sweep`). The tables (``eval.json``, ``eval.csv``) and the plotly
figure (``eval.html``: accuracy vs budget per method, one panel per task) are built from the store by
:func:`report`, which works on any store.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models import adapter_for, load
from ..runtime.driver import forced_logits, generate
from .progress import Progress
from .records import ResultStore, failure_record, reference_ids, write_records

if TYPE_CHECKING:
    from ..tiny.tasks import Suite

#: Methods run by default on a CPU-only machine (one per family: scoring, per-head, text-prior merging,
#: modality-aware); with a GPU every method runs.
CPU_METHODS = ("snapkv", "adakv", "lookm", "madakv")
CPU_SAMPLES, GPU_SAMPLES = 5, 50
STORE_NAME = "results.jsonl"


@dataclass
class EvalRow:
    task: str
    method: str
    budget: float | int
    query_aware: bool
    samples: int
    accuracy: float  # mean score: exact check (synthetic) or MileBench's metric
    agreement: float  # share of answers token-identical to Full's (nan when Full's cell is missing)
    kl: float  # mean next-token KL(P_full || P_method) along Full's answers (nats)
    kv_ratio: float  # mean physical KV after compression / Full


@dataclass(frozen=True)
class Cell:
    """One unit of work: the samples of ``task`` shard ``shard`` under ``method`` at ``budget``."""

    task: str
    shard: int
    method: str
    budget: float | int
    query_aware: bool

    @property
    def key(self) -> str:
        return f"{self.task}/{self.shard}/{self.method}@{self.budget!r}/{'qa' if self.query_aware else 'qg'}"

    @property
    def reference(self) -> Cell:
        """Full's cell on the same samples and query mode (its answers are the reference)."""
        return Cell(self.task, self.shard, "full", 1.0, self.query_aware)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Cell:
        return cls(rec["task"], rec["shard"], rec["method"], rec["budget"], rec["query_aware"])


@dataclass
class Plan:
    """The cells of a run and the samples of each ``(task, shard)``: ``(index within the task, sample)``."""

    cells: list[Cell]
    shards: dict[tuple[str, int], list[tuple[int, Any]]]
    config: dict[str, Any] = field(default_factory=dict)

    def pending(self, store: ResultStore) -> list[Cell]:
        """Cells not yet in ``store``, in plan order (shard by shard, each shard's Full cell first)."""
        done = store.finished()
        return [c for c in self.cells if c.key not in done]


def make_plan(
    samples: Sequence[Any],
    methods: Sequence[str],
    budgets: Sequence[float | int],
    query_modes: Sequence[bool] = (True,),
    shard_size: int | None = None,
    config: dict[str, Any] | None = None,
) -> Plan:
    """Cells for ``samples`` (grouped by ``sample.task``, cut into shards of ``shard_size``; ``None`` = one per task)."""
    by_task: dict[str, list[Any]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    shards: dict[tuple[str, int], list[tuple[int, Any]]] = {}
    for task, items in by_task.items():
        size = shard_size or len(items)
        for start in range(0, len(items), size):
            shards[(task, start // size)] = list(enumerate(items))[start : start + size]
    grid = [("full", 1.0)] + [(m, b) for m in dict.fromkeys(methods) if m != "full" for b in budgets]
    cells = [Cell(task, shard, m, b, qa) for (task, shard) in shards for qa in query_modes for m, b in grid]
    return Plan(cells, shards, dict(config or {}))


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(reference.float(), -1)
    q = torch.log_softmax(other.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).clamp_min(0).mean())


class CellRunner:
    """Runs cells on one loaded model.

    Keeps the prepared inputs of the last shard (a shard's cells usually run back to back) and Full's
    teacher-forced logits while they stay under ``logits_cache_bytes``.
    """

    def __init__(
        self, model: torch.nn.Module, processor: Any, max_new_tokens: int, logits_cache_bytes: int = 256 << 20
    ) -> None:
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.logits_cache_bytes = logits_cache_bytes
        self._shard: tuple[str, int] | None = None
        self._prepared: dict[int, Any] = {}
        self._full_logits: dict[tuple[int, bool], torch.Tensor] = {}

    def _for_shard(self, cell: Cell) -> None:
        if self._shard != (cell.task, cell.shard):
            self._shard, self._prepared, self._full_logits = (cell.task, cell.shard), {}, {}

    def _prepare(self, index: int, sample: Any) -> Any:
        if index not in self._prepared:
            # a sample may fit its prompt to the model (MileBench's left truncation by tokens)
            chat = sample.chat_for(self.model, self.processor) if hasattr(sample, "chat_for") else sample.chat
            self._prepared[index] = adapter_for(self.model).prepare(self.model, self.processor, chat)
        return self._prepared[index]

    def _full(self, index: int, prepared: Any, ids: list[int], query_aware: bool) -> torch.Tensor:
        key = (index, query_aware)
        if key in self._full_logits:
            return self._full_logits[key]
        logits = forced_logits(self.model, prepared, "full", 1.0, ids, query_aware=query_aware)
        held = sum(t.numel() * t.element_size() for t in self._full_logits.values())
        if held + logits.numel() * logits.element_size() <= self.logits_cache_bytes:
            self._full_logits[key] = logits
        return logits

    def run(
        self, cell: Cell, samples: Sequence[tuple[int, Any]], reference: Sequence[list[int]] | None
    ) -> dict[str, Any]:
        """The store record of ``cell`` on ``samples``; ``reference``: Full's token ids per sample (not for Full)."""
        if cell.method != "full" and reference is None:
            raise ValueError(f"{cell.key} needs Full's answers ({cell.reference.key}) first")
        self._for_shard(cell)
        start = time.perf_counter()
        out = []
        for i, (index, sample) in enumerate(samples):
            prepared = self._prepare(index, sample)
            result = generate(
                self.model,
                self.processor,
                None,
                cell.method,
                cell.budget,
                max_new_tokens=self.max_new_tokens,
                prepared=prepared,
                record_attention=False,
                query_aware=cell.query_aware,
            )
            kl = 0.0
            if cell.method != "full" and reference is not None and reference[i]:
                ref_logits = self._full(index, prepared, reference[i], cell.query_aware)
                kl = _kl(
                    ref_logits,
                    forced_logits(
                        self.model, prepared, cell.method, cell.budget, reference[i], query_aware=cell.query_aware
                    ),
                )
            trace = result.trace
            out.append(
                {
                    "index": index,
                    "id": getattr(sample, "sample_id", index),
                    "score": float(sample.check(result.text)),
                    "answer": result.text,
                    "token_ids": list(result.token_ids),
                    "kl": kl,
                    "kv_ratio": trace.bytes_compressed / trace.bytes_full if trace.bytes_full else 1.0,
                }
            )
        return {
            "kind": "cell",
            "key": cell.key,
            **asdict(cell),
            "samples": out,
            "seconds": round(time.perf_counter() - start, 3),
            "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        }


def run_serial(
    runner: CellRunner,
    plan: Plan,
    store: ResultStore,
    progress: Progress | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run the plan's pending cells one after the other, appending each result; returns the failures."""
    failures = 0
    failed_refs: set[str] = set()
    finished = store.finished()
    for cell in plan.pending(store):
        ref = reference_ids(finished, cell)
        try:
            if cell.method != "full" and ref is None:
                raise RuntimeError(
                    f"Full's cell {cell.reference.key} "
                    + ("failed" if cell.reference.key in failed_refs else "is missing")
                )
            rec = runner.run(cell, plan.shards[(cell.task, cell.shard)], ref)
        except Exception as e:  # a failing cell is recorded and the sweep goes on
            failures += 1
            if cell.method == "full":
                failed_refs.add(cell.key)
            store.append(failure_record(cell, e))
            if progress:
                progress.update(cell.key, failed=True)
            continue
        store.append(rec)
        finished[cell.key] = rec
        if progress:
            progress.update(cell.key)
        if on_result:
            on_result(rec)
    return failures


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    samples: Sequence[Any],
    methods: Sequence[str],
    budgets: Sequence[float | int],
    *,
    max_new_tokens: int = 16,
    query_aware: bool = True,
    store: ResultStore | None = None,
    shard_size: int | None = None,
) -> list[EvalRow]:
    """Score ``samples`` (objects with ``task``, ``chat`` and ``check(answer)`` -> bool or a score in [0, 1])
    under every method x budget; ``store`` (default: in memory) keeps every cell, and cells already in it
    are not run again."""
    store = store if store is not None else ResultStore()
    plan = make_plan(samples, methods, budgets, (query_aware,), shard_size)
    failures = run_serial(CellRunner(model, processor, max_new_tokens), plan, store)
    if failures:
        errors = [r["error"] for r in store.records() if r.get("kind") == "failure"]
        raise RuntimeError(f"{failures} cell(s) failed; first: {errors[0]}")
    keys = {c.key for c in plan.cells}
    return aggregate([r for k, r in store.finished().items() if k in keys])


# ---------------------------------------------------------------------------------------------
# Reports (from any store)
# ---------------------------------------------------------------------------------------------

#: Published figures to set beside ours when the model, dataset, method, budget and query mode match,
#: read from ``mmkv/data/published.json`` (fields and sources: ``docs/eval.md``, "Published figures").
#: Each entry: model, dataset (or datasets + label), method, budget, query_aware (default true), score (the
#: paper's number on the 0-1 scale) and source ({paper, url, table}).
PUBLISHED_PATH = Path(__file__).resolve().parents[1] / "data" / "published.json"


def load_published(path: str | Path = PUBLISHED_PATH) -> list[dict[str, Any]]:
    """The entries of a published-figures file, checked (a malformed entry raises ``ValueError``)."""
    data = json.loads(Path(path).read_text())
    entries = data["entries"] if isinstance(data, dict) else data
    for i, e in enumerate(entries):
        where = f"{path}: entry {i}"
        missing = [k for k in ("model", "method", "budget", "score", "source") if k not in e]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        if ("dataset" in e) == ("datasets" in e):
            raise ValueError(
                f"{where} needs exactly one of 'dataset' (a MileBench folder name) or 'datasets' (+ 'label')"
            )
        if "datasets" in e and not (e["datasets"] and "label" in e):
            raise ValueError(f"{where}: 'datasets' needs a non-empty list and a 'label' (the paper's column name)")
        if isinstance(e["budget"], bool) or not isinstance(e["budget"], (int, float)):
            raise ValueError(f"{where}: budget must be a ratio (float) or a token count (int), got {e['budget']!r}")
        if not isinstance(e["score"], (int, float)) or not 0.0 <= e["score"] <= 1.0:
            raise ValueError(f"{where}: score must be on the 0-1 scale (a printed 39.4 is 0.394), got {e['score']!r}")
        src = e["source"]
        if not (isinstance(src, dict) and src.get("url") and src.get("table")):
            raise ValueError(f"{where}: source needs at least 'url' and 'table'")
    return list(entries)


PUBLISHED: list[dict[str, Any]] = load_published()


def _model_names(model: str | Sequence[str] | None) -> set[str]:
    names = [model] if isinstance(model, str) or model is None else list(model)
    return {str(m).rstrip("/").rsplit("/", 1)[-1].lower() for m in names if m}


def _same_budget(ours: float | int, paper: float | int) -> bool:
    """A ratio matches a ratio (to 1e-9), a token count the same count; a ratio never matches a count."""
    if isinstance(ours, int) != isinstance(paper, int):
        return False
    return ours == paper if isinstance(ours, int) else math.isclose(ours, paper, rel_tol=1e-9, abs_tol=1e-9)


def _source_text(src: dict[str, Any]) -> str:
    return ", ".join(str(src[k]) for k in ("paper", "table", "url") if src.get(k))


def aggregate(records: Iterable[dict[str, Any]]) -> list[EvalRow]:
    """One row per task x method x budget x query mode from cell records (shards pooled by sample)."""
    records = list(records)
    full_ids: dict[tuple[str, bool, int], list[int]] = {}
    for rec in records:
        if rec["method"] == "full":
            for s in rec["samples"]:
                full_ids[(rec["task"], rec["query_aware"], s["index"])] = s["token_ids"]
    groups: dict[tuple[str, str, Any, bool], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(rec["task"], rec["method"], rec["budget"], rec["query_aware"])].extend(rec["samples"])
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows = []
    for (task, method, budget, qa), items in sorted(
        groups.items(), key=lambda kv: (tasks.index(kv[0][0]), not kv[0][3], kv[0][1] != "full", kv[0][1], kv[0][2])
    ):
        n = len(items)
        refs = [full_ids.get((task, qa, s["index"])) for s in items]
        agreement = (
            (sum(s["token_ids"] == r for s, r in zip(items, refs)) / n)
            if all(r is not None for r in refs)
            else math.nan
        )
        rows.append(
            EvalRow(
                task=task,
                method=method,
                budget=budget,
                query_aware=qa,
                samples=n,
                accuracy=sum(s["score"] for s in items) / n,
                agreement=agreement,
                kl=sum(s["kl"] for s in items) / n,
                kv_ratio=sum(s["kv_ratio"] for s in items) / n,
            )
        )
    return rows


def published_beside(rows: Sequence[EvalRow], model: str | None) -> list[dict[str, Any]]:
    """One record per published figure whose model, dataset(s), method, budget and query mode match our rows:
    ``ours`` (our mean score; for a ``datasets`` entry the unweighted mean over those datasets, only when we
    have every one of them) beside ``paper``, with ``delta = ours - paper``, our sample count and the source."""
    if not _model_names(model):
        return []
    out = []
    for p in PUBLISHED:
        if not _model_names(model) & _model_names(p["model"]):
            continue
        qa = bool(p.get("query_aware", True))
        datasets = [p["dataset"]] if "dataset" in p else list(p["datasets"])
        found = []
        for ds in datasets:
            match = [
                r
                for r in rows
                if r.task == ds
                and r.method == p["method"]
                and r.query_aware == qa
                and _same_budget(r.budget, p["budget"])
            ]
            if not match:
                break
            found.append(match[0])
        else:
            ours = sum(r.accuracy for r in found) / len(found)
            src = p["source"]
            out.append(
                {
                    "model": model,
                    "dataset": p.get("dataset", p.get("label")),
                    "datasets": datasets,
                    "method": p["method"],
                    "budget": found[0].budget,
                    "query_aware": qa,
                    "ours": ours,
                    "paper": p["score"],
                    "delta": ours - p["score"],
                    "samples": sum(r.samples for r in found),
                    "source": _source_text(src),
                    "url": src["url"],
                    "table": src["table"],
                    "paper_method": src.get("paper_method", ""),
                    "note": src.get("note", ""),
                }
            )
    tasks = list(dict.fromkeys(r.task for r in rows))
    out.sort(key=lambda d: (tasks.index(d["datasets"][0]), d["dataset"], d["method"], d["budget"]))
    return out


def figure(rows: Sequence[EvalRow], published: Sequence[dict[str, Any]] = ()) -> Any:
    """Accuracy vs budget per method, one panel per task and query mode (Full as a dashed line); a published
    figure for the panel's dataset is an open diamond ("<method> (paper)") beside our curve."""
    from plotly.subplots import make_subplots

    panels = list(dict.fromkeys((r.task, r.query_aware) for r in rows))
    modes = {qa for _, qa in panels}
    titles = [t if len(modes) == 1 else f"{t} ({'query-aware' if qa else 'query-agnostic'})" for t, qa in panels]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=titles, shared_yaxes=True)
    shown: set[str] = set()
    for col, (task, qa) in enumerate(panels, start=1):
        sel = [r for r in rows if r.task == task and r.query_aware == qa]
        budgets = sorted({r.budget for r in sel if r.method != "full"})
        for method in dict.fromkeys(r.method for r in sel):
            pts = sorted((r.budget, r.accuracy) for r in sel if r.method == method)
            if method == "full":
                xs, ys = budgets or [1.0], [pts[0][1]] * max(1, len(budgets))
                fig.add_scatter(
                    x=xs,
                    y=ys,
                    name="full",
                    mode="lines",
                    line_dash="dash",
                    row=1,
                    col=col,
                    legendgroup="full",
                    showlegend=col == 1,
                )
            else:
                fig.add_scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    name=method,
                    mode="lines+markers",
                    row=1,
                    col=col,
                    legendgroup=method,
                    showlegend=col == 1,
                )
        for method in dict.fromkeys(p["method"] for p in published):
            pts = sorted(
                (p["budget"], p["paper"])
                for p in published
                if p["method"] == method and p["datasets"] == [task] and p["query_aware"] == qa
            )
            if not pts:
                continue
            xs = [b for b, _ in pts] if method != "full" else (budgets or [1.0])
            ys = [v for _, v in pts] if method != "full" else [pts[0][1]] * len(xs)
            fig.add_scatter(
                x=xs,
                y=ys,
                name=f"{method} (paper)",
                mode="markers",
                marker_symbol="diamond-open",
                marker_size=10,
                row=1,
                col=col,
                legendgroup=method,
                showlegend=method not in shown,
            )
            shown.add(method)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", col=1)
    fig.update_xaxes(title_text="budget")
    return fig


def published_markdown(published: Sequence[dict[str, Any]]) -> str:
    """The published-beside-ours table as markdown (scores on the 0-1 scale, as in ``eval.json``)."""
    lines = [
        "| dataset | method | budget | query | ours | paper | ours - paper | our samples | source |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in published:
        name = p["dataset"] if p["datasets"] == [p["dataset"]] else f"{p['dataset']} ({', '.join(p['datasets'])})"
        method = p["method"] + (f" ({p['paper_method']})" if p["paper_method"] else "")
        lines.append(
            f"| {name} | {method} | {p['budget']} | {'aware' if p['query_aware'] else 'agnostic'} | "
            f"{p['ours']:.3f} | {p['paper']:.3f} | {p['delta']:+.3f} | {p['samples']} | [{p['table']}]({p['url']}) |"
        )
    return "\n".join(lines) + "\n"


def write(rows: Sequence[EvalRow], out: Path, published: Sequence[dict[str, Any]] = ()) -> None:
    """``eval.json`` / ``eval.csv``; when any row has a published figure, ``published.json`` / ``published.csv`` /
    ``published.md`` (ours beside the paper's, with the source); and ``eval.html`` (skipped with a note when
    plotly, the ``[app]`` extra, is not installed)."""
    write_records(rows, out, "eval")
    if published:
        import csv

        (out / "published.json").write_text(json.dumps(list(published), indent=1))
        with open(out / "published.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(published[0]))
            writer.writeheader()
            writer.writerows({**p, "datasets": ";".join(p["datasets"])} for p in published)
        (out / "published.md").write_text(published_markdown(published))
        print(f"{len(published)} cell(s) beside a published figure: {out / 'published.md'}", file=sys.stderr)
    try:
        fig = figure(rows, published)
    except ImportError:
        print("eval.html skipped: plotly is not installed (pip install 'mmkv[app]')", file=sys.stderr)
        return
    fig.write_html(out / "eval.html", include_plotlyjs=True)


def report(store: ResultStore | str | Path, out: str | Path | None = None) -> list[EvalRow]:
    """The rows of any results store (a path or a :class:`ResultStore`); with ``out``, also the files of
    :func:`write`, the published figures matched to the store's model (its run record's ``config.model``)."""
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    rows = aggregate(store.finished().values())
    if out is not None and rows:
        runs = [r for r in store.records() if r.get("kind") == "run"]
        write(rows, Path(out), published_beside(rows, runs[0]["config"].get("model") if runs else None))
    return rows


def format_rows(rows: Sequence[EvalRow]) -> str:
    return "\n".join(
        f"{r.task:16s} {'qa' if r.query_aware else 'qg'} {r.method:13s} {r.budget!s:>5s} n {r.samples:3d} "
        f"acc {r.accuracy:.3f} agree {r.agreement:.3f} kl {r.kl:.4f} kv {r.kv_ratio:.3f}"
        for r in rows
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def synthetic_samples(
    tasks: Sequence[str], n: int, images: int | None, seed: int, suite: Suite | None = None
) -> list[Any]:
    """``n`` held-out samples per task, drawn at ``suite``'s image sizes (the evaluated model's own:
    :func:`mmkv.tiny.tasks.suite_of`; None: the generator's defaults, the v1 suite)."""
    from ..tiny.tasks import V1_SUITE

    suite = suite or V1_SUITE
    out: list[Any] = []
    for task in tasks:
        out.extend(suite.heldout(task, n, images, seed))
    return out


def open_store(path: Path, config: dict[str, Any], resume: bool) -> ResultStore:
    """The run's store: new, or (``resume``) an existing one written with the same settings."""
    store = ResultStore(path)
    records = store.records()
    if records and not resume:
        raise ValueError(f"{path} already holds results: pass --resume to continue that run, or another --out")
    runs = [r for r in records if r.get("kind") == "run"]
    if runs and runs[0]["config"] != config:
        old = runs[0]["config"]
        diff = ", ".join(
            f"{k}: {old.get(k)!r} -> {config.get(k)!r}"
            for k in sorted(set(old) | set(config))
            if old.get(k) != config.get(k)
        )
        raise ValueError(
            f"{path} was written with other settings ({diff}): resume with the same settings, or use another --out"
        )
    store.append({"kind": "run", "config": config, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:]})
    return store


def build_parser() -> argparse.ArgumentParser:
    from ..methods import METHODS
    from ..tiny.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="mmkv eval",
        description="Accuracy and fidelity to the Full cache, per task x method x budget x query mode.",
        epilog="Defaults depend on the machine: on CPU only the methods "
        + ",".join(CPU_METHODS)
        + f" (plus full) and {CPU_SAMPLES} samples per task; with a GPU all methods and {GPU_SAMPLES} samples. "
        "Progress (cells done/total, failures, ETA) goes to stderr; results to OUT/results.jsonl as each cell finishes.",
    )
    p.add_argument(
        "--model", default="bundled", help="checkpoint directory or hub id (default: the bundled teaching model)"
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (full always runs as the reference); default on CPU: {','.join(CPU_METHODS)}; "
        f"with a GPU: all of {','.join(sorted(METHODS))}",
    )
    p.add_argument(
        "--budgets",
        default="0.05,0.1,0.2,0.5",
        help="comma-separated budgets: ratios like 0.2 or tokens per head like 64",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated synthetic tasks (ignored with --milebench); default: the tasks the model was trained "
        f"on (its training_metrics.json's suite; else {','.join(TASKS)})",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"samples per task or dataset (with --milebench: the first N; default {CPU_SAMPLES} on CPU, {GPU_SAMPLES} with a GPU)",
    )
    p.add_argument("--images", type=int, default=8, help="images per prompt for the synthetic image tasks")
    p.add_argument("--seed", type=int, default=10_000, help="seed of the synthetic held-out samples")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default 16 on the synthetic suite, 512 on MileBench as its runner)",
    )
    p.add_argument(
        "--query-mode",
        choices=("aware", "agnostic", "both"),
        default="aware",
        help="aware: prefill the question before compressing (the papers'); agnostic: compress the context first; both",
    )
    p.add_argument("--query-agnostic", action="store_true", help="same as --query-mode agnostic")
    p.add_argument(
        "--shard-size",
        type=int,
        default=25,
        help="samples per cell (a task's samples are cut into shards of this size)",
    )
    p.add_argument(
        "--milebench",
        default=None,
        metavar="DIR",
        help="evaluate MileBench-format data in DIR (<Dataset>/<Dataset>.json + images/) instead of the synthetic suite",
    )
    p.add_argument(
        "--datasets", default=None, help="with --milebench: comma-separated dataset names (default: all in DIR)"
    )
    p.add_argument(
        "--scoring",
        choices=("official", "clean"),
        default="official",
        help="with --milebench: official = the official runner's scores, quirks included (docs/eval.md); "
        "clean = textbook ROUGE-L F1 and strict option letters",
    )
    p.add_argument(
        "--max-context-tokens",
        type=int,
        default=None,
        help="with --milebench: cut prompts from the left to N tokens as the official runner does "
        "(default: the model's context less --max-new-tokens)",
    )
    p.add_argument(
        "--tokens-per-image",
        type=int,
        default=None,
        help="with --milebench: tokens one image counts for when cutting (default: measured per image size "
        "through the model's processor; the official configs give a constant, e.g. 576 for LLaVA-1.5)",
    )
    p.add_argument("--adv", action="store_true", help="with --milebench: read the adversarial files <Dataset>-adv.json")
    p.add_argument(
        "--combine-images",
        type=int,
        default=None,
        metavar="N",
        help="with --milebench: read <Dataset>_combined_N.json and its combined_N_images/ (one image per item)",
    )
    p.add_argument(
        "--out", default="eval-results", help="output folder: results.jsonl (the store), eval.json, eval.csv, eval.html"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run whose store is in --out: finished cells are skipped"
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="STORE",
        help="build the tables and figure from the results store STORE into --out and exit (runs nothing)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the cells on a Ray cluster (pip install 'mmkv[cluster]'); no ADDRESS: a local Ray instance",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --ray: model-holding actors (default: one per GPU of the cluster, else one per CPU)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ..inputs.budget import parse_budget
    from ..methods import METHODS

    p = build_parser()
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.report:
        if not Path(a.report).is_file():
            p.error(f"no results store at {a.report}")
        rows = report(a.report, out)
        print(format_rows(rows))
        return 0
    gpu = torch.cuda.is_available()
    methods = a.methods.split(",") if a.methods else list(METHODS) if gpu else list(CPU_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
    try:
        budgets = [parse_budget(b) for b in a.budgets.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    n = a.samples if a.samples is not None else GPU_SAMPLES if gpu else CPU_SAMPLES
    mode = "agnostic" if a.query_agnostic else a.query_mode
    query_modes = {"aware": (True,), "agnostic": (False,), "both": (True, False)}[mode]
    if a.milebench:
        from .milebench import load_milebench

        max_new_tokens = a.max_new_tokens or 512
        config: dict[str, Any] = {
            "source": "milebench",
            "root": str(Path(a.milebench).resolve()),
            "samples": n,
            "scoring": a.scoring,
            "max_context_tokens": a.max_context_tokens,
            "tokens_per_image": a.tokens_per_image,
            "adv": a.adv,
            "combine_images": a.combine_images,
        }
        try:  # every item is checked here, before the model is loaded
            samples: list[Any] = load_milebench(
                a.milebench,
                a.datasets.split(",") if a.datasets else None,
                n,
                adv=a.adv,
                combine_images=a.combine_images,
                scoring=a.scoring,
                max_context_tokens=a.max_context_tokens,
                max_new_tokens=max_new_tokens,
                tokens_per_image=a.tokens_per_image,
            )
        except (OSError, ValueError) as e:
            p.error(str(e))
    else:
        max_new_tokens = a.max_new_tokens or 16
        from ..tiny.tasks import suite_of

        suite = suite_of(a.model)  # the model's own image sizes (training_metrics.json), else the v1 defaults
        config = {"source": "synthetic", "samples": n, "images": a.images, "seed": a.seed}
        if suite.version != 1:  # v1 stores keep their settings (and stay resumable)
            config["suite"] = suite.to_json()
        tasks = a.tasks.split(",") if a.tasks else list(suite.tasks)
        samples = synthetic_samples(tasks, n, a.images, a.seed, suite)
    config.update(model=a.model, max_new_tokens=max_new_tokens, shard_size=a.shard_size)
    plan = make_plan(samples, methods, budgets, query_modes, a.shard_size, config)
    try:
        store = open_store(out / STORE_NAME, config, a.resume)
    except ValueError as e:
        p.error(str(e))
    pending = plan.pending(store)
    progress = Progress(len(plan.cells), len(plan.cells) - len(pending))
    if a.ray:
        from .sweep import run_ray

        failures = run_ray(
            plan,
            store,
            a.model,
            CellRunner,
            address=None if a.ray == "local" else a.ray,
            workers=a.workers,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
    else:
        model, processor = load(a.model)
        failures = run_serial(CellRunner(model, processor, max_new_tokens), plan, store, progress)
    progress.close()
    keys = {c.key for c in plan.cells}
    rows = aggregate([r for k, r in store.finished().items() if k in keys])
    if rows:
        write(rows, out, published_beside(rows, a.model))
        print(format_rows(rows))
    if failures:
        print(
            f"{failures} cell(s) failed (errors in {out / STORE_NAME}); rerun with --resume to retry them",
            file=sys.stderr,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
