"""``python -m mmkv.eval``: accuracy and fidelity to the Full cache, per task x method x budget.

On the synthetic suite (`mmkv.tiny.tasks`, held-out seeds) every answer is checked against its scene.
With ``--milebench DIR`` the samples come from MileBench-format data in a local folder instead
(:mod:`mmkv.milebench`) and each answer gets the benchmark's own score (accuracy, or ROUGE-L for
open-ended datasets); the ``accuracy`` column is then the mean score. Fidelity to Full is measured on the
same samples:

- ``agreement``: the share of samples whose answer is exactly Full's answer;
- ``kl``: the mean over samples of the mean next-token ``KL(P_full || P_method)`` along Full's answer,
  teacher-forced through the method's compressed cache (:func:`mmkv.driver.forced_logits`).

Writes ``eval.json``, ``eval.csv`` and ``eval.html`` (accuracy vs budget per method, one panel per task).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .driver import forced_logits, generate
from .models import adapter_for, load
from .records import write_records


@dataclass
class EvalRow:
    task: str
    method: str
    budget: float | int
    query_aware: bool
    samples: int
    accuracy: float  # mean score: exact check (synthetic) or MileBench's metric
    agreement: float  # exact-match agreement with Full's answers
    kl: float  # mean next-token KL(P_full || P_method) along Full's answers (nats)
    kv_ratio: float  # mean physical KV after compression / Full


def _progress(items: Sequence[Any], desc: str) -> Any:
    try:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False)
    except ImportError:  # tqdm comes with transformers; keep working without it
        return items


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(reference.float(), -1)
    q = torch.log_softmax(other.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).clamp_min(0).mean())


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    samples: Sequence[Any],
    methods: Sequence[str],
    budgets: Sequence[float | int],
    *,
    max_new_tokens: int = 16,
    query_aware: bool = True,
) -> list[EvalRow]:
    """Score ``samples`` (objects with ``task``, ``chat`` and ``check(answer)`` -> bool or a score in [0, 1])
    under every method x budget."""
    adapter = adapter_for(model)
    prepared = [adapter.prepare(model, processor, s.chat) for s in samples]
    full = [generate(model, processor, None, "full", 1.0, max_new_tokens=max_new_tokens, prepared=p,
                     record_attention=False, query_aware=query_aware) for p in _progress(prepared, "full")]
    full_logits = [forced_logits(model, p, "full", 1.0, r.token_ids, query_aware=query_aware)
                   for p, r in zip(prepared, full)]
    grid = [("full", 1.0)] + [(m, b) for m in methods if m != "full" for b in budgets]
    rows: list[EvalRow] = []
    for method, budget in grid:
        per_task: dict[str, list[tuple[bool, bool, float, float]]] = {}
        for s, p, ref, ref_logits in _progress(list(zip(samples, prepared, full, full_logits)), f"{method}@{budget}"):
            if method == "full":
                result, kl = ref, 0.0
            else:
                result = generate(model, processor, None, method, budget, max_new_tokens=max_new_tokens, prepared=p,
                                  record_attention=False, query_aware=query_aware)
                logits = forced_logits(model, p, method, budget, ref.token_ids, query_aware=query_aware)
                kl = _kl(ref_logits, logits) if ref.token_ids else 0.0
            trace = result.trace
            ratio = trace.bytes_compressed / trace.bytes_full if trace.bytes_full else 1.0
            per_task.setdefault(s.task, []).append((float(s.check(result.text)), result.token_ids == ref.token_ids, kl, ratio))
        for task, scores in per_task.items():
            n = len(scores)
            rows.append(EvalRow(
                task=task, method=method, budget=budget, query_aware=query_aware, samples=n,
                accuracy=sum(s[0] for s in scores) / n, agreement=sum(s[1] for s in scores) / n,
                kl=sum(s[2] for s in scores) / n, kv_ratio=sum(s[3] for s in scores) / n,
            ))
    return rows


def synthetic_samples(tasks: Sequence[str], n: int, images: int | None, seed: int) -> list[Any]:
    from .tiny.tasks import heldout_set

    out: list[Any] = []
    for task in tasks:
        out.extend(heldout_set(task, n, images if task not in ("video_direction", "video_colour") else None, seed))
    return out


def figure(rows: Sequence[EvalRow]) -> Any:
    """Accuracy vs budget per method, one panel per task (Full as a dashed line)."""
    from plotly.subplots import make_subplots

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for col, task in enumerate(tasks, start=1):
        sel = [r for r in rows if r.task == task]
        budgets = sorted({r.budget for r in sel if r.method != "full"})
        for method in dict.fromkeys(r.method for r in sel):
            pts = sorted((r.budget, r.accuracy) for r in sel if r.method == method)
            if method == "full":
                xs, ys = budgets or [1.0], [pts[0][1]] * max(1, len(budgets))
                fig.add_scatter(x=xs, y=ys, name="full", mode="lines", line_dash="dash", row=1, col=col,
                                legendgroup="full", showlegend=col == 1)
            else:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=method, mode="lines+markers",
                                row=1, col=col, legendgroup=method, showlegend=col == 1)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", col=1)
    fig.update_xaxes(title_text="budget")
    return fig


def write(rows: Sequence[EvalRow], out: Path) -> None:
    write_records(rows, out, "eval")
    figure(rows).write_html(out / "eval.html", include_plotlyjs=True)


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import parse_budget
    from .methods import METHODS
    from .tiny.tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m mmkv.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/mmkv-tiny-qwen2vl")
    p.add_argument("--methods", default=",".join(sorted(METHODS)))
    p.add_argument("--budgets", default="0.05,0.1,0.2,0.5")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--samples", type=int, default=50, help="held-out samples per task (with --milebench: the first N per dataset)")
    p.add_argument("--images", type=int, default=8, help="images per prompt for the image tasks")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--query-agnostic", action="store_true", help="compress the context before the question")
    p.add_argument("--milebench", default=None, metavar="DIR",
                   help="evaluate MileBench-format data in DIR (<Dataset>/<Dataset>.json + images/) instead of the synthetic suite")
    p.add_argument("--datasets", default=None, help="with --milebench: comma-separated dataset names (default: all in DIR)")
    p.add_argument("--max-images", type=int, default=None,
                   help="with --milebench: keep only the last N images of longer samples (and the text from the first kept one)")
    p.add_argument("--out", default="eval-results")
    a = p.parse_args(argv)
    if a.milebench:
        from .milebench import load_milebench

        try:
            samples: list[Any] = load_milebench(a.milebench, a.datasets.split(",") if a.datasets else None, a.samples, a.max_images)
        except (OSError, ValueError) as e:
            p.error(str(e))
    else:
        samples = synthetic_samples(a.tasks.split(","), a.samples, a.images, a.seed)
    model, processor = load(a.model)
    rows = evaluate(model, processor, samples, a.methods.split(","), [parse_budget(b) for b in a.budgets.split(",")],
                    max_new_tokens=a.max_new_tokens, query_aware=not a.query_agnostic)
    write(rows, Path(a.out))
    for r in rows:
        print(f"{r.task:16s} {r.method:13s} {r.budget!s:>5s} acc {r.accuracy:.3f} agree {r.agreement:.3f} "
              f"kl {r.kl:.4f} kv {r.kv_ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
