"""The multi-turn evaluation: what a first question costs the second (docs/eval.md, "Multi-turn").

SCBench (Li et al., arXiv 2412.10319) measured that query-aware KV-cache compression loses accuracy on
follow-up questions about something else in a shared context: the tokens the follow-up needs were evicted
with the first question's scores. This is the multimodal version on the synthetic suite
(:mod:`mmkv.tiny.tasks`): an 8-image needle scene, turn 1 asks "Which image has the <colour> <shape>?" about a
(colour, shape) pair that occurs exactly once, turn 2 about another unique pair in a *different* image — the
earliest and the latest image that hold one, so the two needles lie far apart (``distance`` images).

Per method x budget x setting:

- ``kept``: :class:`mmkv.Conversation` keeps turn 1's compressed cache and prefills only turn 2's tokens;
- ``reread``: turn 2 reads the whole conversation (images, question 1, answer 1 as generated, question 2)
  from scratch, compressing it again with the turn-2 question (``Conversation.start_from`` + ``ask``).

Turn 1 is the same in both settings (one run). Full is the reference: its turn-2 answers must be identical in
both settings (checked, :class:`FullMismatch` otherwise). Query-aware (the question is prefilled before the
compression), as the papers. ::

    python -m mmkv.experiments.multiturn --model bundled --budgets 0.1,0.2,0.3,0.5 --samples 50 --out runs/followup
    mmkv eval --followup ...            # the same command

writes ``OUT/results.jsonl`` (one summary per cell), ``OUT/samples.jsonl`` (one record per sample and cell),
``OUT/followup.md`` (the table) and ``OUT/followup.html`` (the plot; skipped without plotly);
``--report OUT/samples.jsonl --out DIR`` rebuilds the last three from the per-sample records alone.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..methods import METHODS
from ..models import load
from ..runtime.conversation import Conversation
from ..tiny.tasks import (
    IMAGE_SIZE,
    Episode,
    MultiImageScene,
    check_answer,
    expected_answer,
    make_image_scene,
    suite_of,
)

TASK = "needle"
IMAGES = 8
SETTINGS = ("kept", "reread")
DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.5)
MAX_NEW_TOKENS = 16
SEED_PREFIX = "followup-heldout"


def needle_question(colour: str, shape: str) -> str:
    return f"Which image has the {colour} {shape}?"


def unique_pairs(scene: MultiImageScene) -> dict[tuple[str, str], int]:
    """(colour, shape) pairs that occur exactly once in the scene -> the 0-based image holding it."""
    where: dict[tuple[str, str], list[int]] = {}
    for k, objs in enumerate(scene.images):
        for o in objs:
            where.setdefault((o.colour, o.shape), []).append(k)
    return {pair: ks[0] for pair, ks in where.items() if len(ks) == 1}


@dataclass
class FollowupSample:
    """A scene and its two needle questions: ``first`` (turn 1) and ``second`` (turn 2), in different images."""

    seed: str
    scene: MultiImageScene
    first: tuple[str, str]  # (colour, shape)
    second: tuple[str, str]
    first_image: int  # 0-based
    second_image: int

    @property
    def distance(self) -> int:
        """Images between the two needles (|image 2 - image 1|)."""
        return abs(self.second_image - self.first_image)

    @property
    def question1(self) -> str:
        return needle_question(*self.first)

    @property
    def question2(self) -> str:
        return needle_question(*self.second)

    @property
    def answer1(self) -> str:
        answer = expected_answer(self.scene, TASK, self.question1)
        assert answer is not None
        return answer

    @property
    def answer2(self) -> str:
        answer = expected_answer(self.scene, TASK, self.question2)
        assert answer is not None
        return answer

    def check1(self, answer: str) -> bool:
        return check_answer(self.scene, TASK, self.question1, answer)

    def check2(self, answer: str) -> bool:
        return check_answer(self.scene, TASK, self.question2, answer)

    def episode(self) -> Episode:
        """The two-turn episode (the training format: ``episode().chat()`` is turn 2's chat with the reference answer 1)."""
        return Episode(self.scene, [(TASK, self.question1, self.answer1), (TASK, self.question2, self.answer2)])

    def media(self) -> list[dict[str, Any]]:
        """Turn 1's media parts (the images, and the password sentence where the scene has one)."""
        return self.episode().context_parts()


def make_followup_sample(seed: Any, k: int = IMAGES, size: int = IMAGE_SIZE) -> FollowupSample:
    """One two-turn sample, deterministic in ``(seed, k, size)`` (its own random namespace, ``mmkv-tiny/followup/``);
    ``size``: px per image, the model's suite (:func:`mmkv.tiny.tasks.suite_of`; 112 px is v1's flat grey).

    Scenes come from :func:`mmkv.tiny.tasks.make_image_scene` (as ``make_sample``'s needle scenes); a scene
    is redrawn until two unique pairs lie in different images. Turn 1 and turn 2 ask about a unique pair in
    the earliest and in the latest image holding one (which comes first is drawn at random).
    """
    rng = random.Random(f"mmkv-tiny/followup/{seed}/{k}")
    while True:
        scene = make_image_scene(rng, k, size=size)
        pairs = unique_pairs(scene)
        images = sorted(set(pairs.values()))
        if len(images) >= 2:
            break
    early = rng.choice(sorted(p for p, i in pairs.items() if i == images[0]))
    late = rng.choice(sorted(p for p, i in pairs.items() if i == images[-1]))
    first, second = (early, late) if rng.random() < 0.5 else (late, early)
    return FollowupSample(str(seed), scene, first, second, pairs[first], pairs[second])


def followup_set(n: int, seed: int = 10_000, k: int = IMAGES, size: int = IMAGE_SIZE) -> list[FollowupSample]:
    """``n`` held-out samples, seeds ``followup-heldout-<seed>-<i>`` (disjoint from training's
    ``mmkv-tiny-train/`` and from the single-question ``heldout-`` sets)."""
    return [make_followup_sample(f"{SEED_PREFIX}-{seed}-{i}", k, size) for i in range(n)]


class FullMismatch(AssertionError):
    """Full's turn-2 answer differs between a kept cache and a re-read (the two must agree)."""


def _turn_record(result: Any, ok: bool, t0: float) -> dict[str, Any]:
    return {
        "text": result.text,
        "correct": ok,
        "prefilled": int(result.prefilled),
        "prefill_s": float(result.prefill_s),
        "turn_s": time.perf_counter() - t0,
        "cache_bytes": int(result.cache_bytes),
        "held_tokens": int(result.held_tokens),
        "prompt_length": int(result.prepared.length),
        "retokenized": bool(result.retokenized),
    }


def run_sample(
    model: Any,
    processor: Any,
    method: str,
    budget: float | int,
    sample: FollowupSample,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, dict[str, Any]]:
    """One sample under ``method`` at ``budget``: ``{"turn1": ..., "kept": ..., "reread": ...}`` (turn-2 records)."""
    conv = Conversation(model, processor, method, budget, record_attention=False)
    t0 = time.perf_counter()
    first = conv.ask(sample.question1, media=sample.media(), max_new_tokens=max_new_tokens)
    out = {"turn1": _turn_record(first, sample.check1(first.text), t0)}
    history = list(conv.history)  # turn 1 with its answer as generated
    t0 = time.perf_counter()
    kept = conv.ask(sample.question2, max_new_tokens=max_new_tokens)
    out["kept"] = _turn_record(kept, sample.check2(kept.text), t0)
    conv.reset()
    again = Conversation(model, processor, method, budget, record_attention=False)
    again.start_from(history)  # the next ask reads the whole conversation from scratch
    t0 = time.perf_counter()
    reread = again.ask(sample.question2, max_new_tokens=max_new_tokens)
    assert reread.prefilled == reread.prepared.length  # read from scratch
    out["reread"] = _turn_record(reread, sample.check2(reread.text), t0)
    again.reset()
    return out


def _records(method: str, budget: float | int, sample: FollowupSample, index: int, run: dict[str, Any]) -> list[dict]:
    t1 = run["turn1"]
    base = {
        "method": method,
        "budget": budget,
        "index": index,
        "seed": sample.seed,
        "distance": sample.distance,
        "turn1_image": sample.first_image + 1,
        "turn2_image": sample.second_image + 1,
        "turn1_correct": t1["correct"],
        "turn1_text": t1["text"],
        "turn1_prefilled": t1["prefilled"],
    }
    out = []
    for setting in SETTINGS:
        t2 = run[setting]
        out.append(
            {
                **base,
                "setting": setting,
                "turn2_correct": t2["correct"],
                "turn2_text": t2["text"],
                "turn2_prefilled": t2["prefilled"],
                "turn2_prefill_s": t2["prefill_s"],
                "turn2_s": t2["turn_s"],
                "turn2_cache_bytes": t2["cache_bytes"],
                "turn2_held_tokens": t2["held_tokens"],
                "turn2_prompt_length": t2["prompt_length"],
                "retokenized": t2["retokenized"],
            }
        )
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (method, budget, setting), in first-seen order: accuracies (turn 1, turn 2, turn 2 given
    turn 1 right: ``nan`` when turn 1 was never right), means of turn 2's prefill tokens / seconds / KV bytes."""
    cells: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["method"], r["budget"], r["setting"]), []).append(r)
    rows = []
    for (method, budget, setting), rs in cells.items():
        t1 = [bool(r["turn1_correct"]) for r in rs]
        t2 = [bool(r["turn2_correct"]) for r in rs]
        given = [b for a, b in zip(t1, t2) if a]
        rows.append(
            {
                "method": method,
                "budget": budget,
                "setting": setting,
                "samples": len(rs),
                "turn1_correct": sum(t1),
                "turn2_correct": sum(t2),
                "turn1_acc": sum(t1) / len(rs),
                "turn2_acc": sum(t2) / len(rs),
                "turn2_given_turn1": sum(given) / len(given) if given else math.nan,
                "turn2_prefilled": _mean([r["turn2_prefilled"] for r in rs]),
                "turn2_prefill_ms": 1000 * _mean([r["turn2_prefill_s"] for r in rs]),
                "turn2_ms": 1000 * _mean([r["turn2_s"] for r in rs]),
                "turn2_kv_bytes": _mean([r["turn2_cache_bytes"] for r in rs]),
                "turn2_held_tokens": _mean([r["turn2_held_tokens"] for r in rs]),
                "mean_distance": _mean([r["distance"] for r in rs]),
                # turn 2's needle after turn 1's in the prompt (the later image) / before it
                "turn2_acc_later": _mean(
                    [float(r["turn2_correct"]) for r in rs if r["turn2_image"] > r["turn1_image"]]
                ),
                "turn2_acc_earlier": _mean(
                    [float(r["turn2_correct"]) for r in rs if r["turn2_image"] < r["turn1_image"]]
                ),
                "retokenized": sum(bool(r["retokenized"]) for r in rs),
            }
        )
    return rows


def check_full(records: Sequence[dict[str, Any]]) -> None:
    """Raise :class:`FullMismatch` when Full's turn-2 answer of a sample differs between kept and re-read."""
    answers: dict[tuple[Any, str], dict[str, str]] = {}
    for r in records:
        if r["method"] == "full":
            answers.setdefault((r["budget"], r["seed"]), {})[r["setting"]] = r["turn2_text"]
    for (_, seed), by in answers.items():
        if len(set(by.values())) > 1:
            raise FullMismatch(f"Full's turn-2 answers differ on sample {seed}: {by}")


def run_followup_eval(
    model: Any,
    processor: Any,
    methods: Sequence[str] | None = None,
    budgets: Sequence[float | int] = DEFAULT_BUDGETS,
    n: int = 50,
    seed: int = 10_000,
    *,
    samples: Sequence[FollowupSample] | None = None,
    size: int = IMAGE_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    sink: Any = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The per-sample records (one per method x budget x setting x sample; :func:`summarize` makes the cells).

    ``methods``: default every method in :data:`mmkv.METHODS`; Full runs once, at budget 1.0, and first, and its
    answers must agree kept vs re-read (:func:`check_full`). ``samples``: default :func:`followup_set` (``n``,
    ``seed``, ``size``: px per image, the model's suite). ``sink``: called with each cell's records as the cell ends (e.g. to append them to a file).
    """
    methods = list(methods) if methods is not None else sorted(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    samples = list(samples) if samples is not None else followup_set(n, seed, size=size)
    cells: list[tuple[str, float | int]] = [("full", 1.0)] if "full" in methods else []
    cells += [(m, b) for m in methods if m != "full" for b in budgets]
    records: list[dict[str, Any]] = []
    for c, (method, budget) in enumerate(cells):
        t0 = time.perf_counter()
        cell: list[dict[str, Any]] = []
        for i, sample in enumerate(samples):
            run = run_sample(model, processor, method, budget, sample, max_new_tokens)
            cell.extend(_records(method, budget, sample, i, run))
        if method == "full":
            check_full(cell)
        records.extend(cell)
        if sink is not None:
            sink(cell)
        if progress:
            done = {(s["setting"]): s for s in summarize(cell)}
            print(
                f"[{c + 1}/{len(cells)}] {method}@{budget}: turn 1 {done['kept']['turn1_acc']:.2f}, "
                f"turn 2 kept {done['kept']['turn2_acc']:.2f} / re-read {done['reread']['turn2_acc']:.2f} "
                f"({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return records


# ---- reports ---------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return "–" if isinstance(x, float) and math.isnan(x) else f"{x:.2f}"


def table_rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget): the kept and re-read summaries side by side (``kept``/``reread`` keys)."""
    by: dict[tuple[str, Any], dict[str, Any]] = {}
    for s in summaries:
        by.setdefault((s["method"], s["budget"]), {"method": s["method"], "budget": s["budget"]})[s["setting"]] = s
    return [row for row in by.values() if "kept" in row and "reread" in row]


def markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """The table: per method x budget, turn-1 accuracy, turn-2 accuracy kept vs re-read (and given turn 1 right),
    turn-2 prefill tokens and ms, KV held after turn 2."""
    lines = [
        "| method | budget | n | turn 1 | turn 2 kept | turn 2 re-read | turn 2 given turn 1 right (kept / re-read) "
        "| turn-2 prefill tokens (kept / re-read) | turn-2 prefill ms (kept / re-read) | KV KiB after turn 2 (kept / re-read) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(summaries):
        k, r = row["kept"], row["reread"]
        lines.append(
            f"| {row['method']} | {row['budget']} | {k['samples']} | {_pct(k['turn1_acc'])} | {_pct(k['turn2_acc'])} | "
            f"{_pct(r['turn2_acc'])} | {_pct(k['turn2_given_turn1'])} / {_pct(r['turn2_given_turn1'])} | "
            f"{k['turn2_prefilled']:.0f} / {r['turn2_prefilled']:.0f} | "
            f"{k['turn2_prefill_ms']:.0f} / {r['turn2_prefill_ms']:.0f} | "
            f"{k['turn2_kv_bytes'] / 1024:.0f} / {r['turn2_kv_bytes'] / 1024:.0f} |"
        )
    return "\n".join(lines) + "\n"


def figure(summaries: Sequence[dict[str, Any]]) -> Any:
    """Turn-2 accuracy vs budget per method: a kept cache (solid) and a re-read (dotted); Full dashed."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["turn 1", "turn 2"], shared_yaxes=True)
    rows = table_rows(summaries)
    budgets = sorted({r["budget"] for r in rows if r["method"] != "full"}) or [1.0]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        if method == "full":
            for col, key in ((1, "turn1_acc"), (2, "turn2_acc")):
                fig.add_scatter(
                    x=budgets,
                    y=[pts[0]["kept"][key]] * len(budgets),
                    name="full",
                    mode="lines",
                    line=dict(dash="dash", color="black"),
                    legendgroup="full",
                    showlegend=col == 1,
                    row=1,
                    col=col,
                )
            continue
        colour = palette[i % len(palette)]
        xs = [p["budget"] for p in pts]
        fig.add_scatter(
            x=xs,
            y=[p["kept"]["turn1_acc"] for p in pts],
            name=method,
            mode="lines+markers",
            line=dict(color=colour),
            legendgroup=method,
            row=1,
            col=1,
        )
        for setting, dash in (("kept", "solid"), ("reread", "dot")):
            fig.add_scatter(
                x=xs,
                y=[p[setting]["turn2_acc"] for p in pts],
                name=f"{method} ({'kept cache' if setting == 'kept' else 're-read'})",
                mode="lines+markers",
                line=dict(color=colour, dash=dash),
                legendgroup=method,
                showlegend=False,
                row=1,
                col=2,
            )
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", col=1)
    fig.update_xaxes(title_text="budget")
    fig.update_layout(title="Turn 2 with a kept cache (solid) vs a re-read (dotted)")
    return fig


def write_report(summaries: Sequence[dict[str, Any]], out: Path) -> None:
    """``out/results.jsonl`` (the cell summaries), ``out/followup.md`` and ``out/followup.html`` (without plotly: skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for s in summaries:
            f.write(json.dumps(s, allow_nan=True) + "\n")
    (out / "followup.md").write_text(markdown(summaries))
    try:
        fig = figure(summaries)
    except ImportError:
        print("followup.html skipped: plotly is not installed (pip install 'mmkv[app]')", file=sys.stderr)
        return
    fig.write_html(out / "followup.html", include_plotlyjs="cdn")


# ---- command line ----------------------------------------------------------------------------------------


def _budget(text: str) -> float | int:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmkv.experiments.multiturn",
        description="Two-question conversations on 8-image needle scenes: turn-2 accuracy with a kept "
        "compressed cache vs a re-read of the whole conversation (docs/eval.md, 'Multi-turn').",
    )
    p.add_argument("--model", default="bundled", help="model id, folder or 'bundled' (default)")
    p.add_argument("--methods", default=",".join(sorted(METHODS)), help="comma-separated (default: every method)")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="comma-separated budgets")
    p.add_argument("--samples", type=int, default=50, help="samples per cell (default 50)")
    p.add_argument("--seed", type=int, default=10_000, help="held-out seed: followup-heldout-<seed>-<i>")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for the bundled model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--report",
        metavar="SAMPLES_JSONL",
        help="rebuild results.jsonl / followup.md / followup.html in --out from a run's samples.jsonl (no model)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        lines = Path(args.report).read_text().splitlines()
        summaries = summarize(json.loads(line) for line in lines if line.strip())
        write_report(summaries, Path(args.out))
        print(markdown(summaries))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = [_budget(b) for b in args.budgets.split(",") if b.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {sorted(METHODS)}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, methods, budgets)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, methods: list[str], budgets: list[float | int]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load(args.model)
    t0 = time.perf_counter()
    samples_path = out / "samples.jsonl"
    samples_path.write_text("")

    def sink(cell: list[dict[str, Any]]) -> None:
        with open(samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in cell)

    try:
        records = run_followup_eval(
            model,
            processor,
            methods,
            budgets,
            args.samples,
            args.seed,
            size=suite_of(args.model).size(TASK) or IMAGE_SIZE,
            max_new_tokens=args.max_new_tokens,
            sink=sink,
            progress=True,
        )
    except FullMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summaries = summarize(records)
    write_report(summaries, out)
    wall = time.perf_counter() - t0
    (out / "run.json").write_text(
        json.dumps({"config": {**vars(args), "methods": methods, "budgets": budgets}, "wall_s": wall}, indent=1)
    )
    print(markdown(summaries))
    print(f"{len(records)} records in {wall:.0f} s: {out / 'results.jsonl'}, {out / 'followup.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
