"""Numbers for ``docs/tiny-v2.md``: ``python -m training.tiny.report_v2 [--shape] [--stages]``.

``--curves``: every held-out evaluation in the stages' logs. ``--shape``: the visual share of the held-out prompts (visual pad tokens / all prompt tokens, through the
trainer's encoder, which the tests hold equal to the processor's) per task and setting; ``--stages``: the
stage table from ``training/tiny-v2/*/metrics.json`` (steps, wall time, held-out accuracy per task).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["visual_share", "stage_rows", "main"]

STAGES = Path(__file__).resolve().parents[1] / "tiny-v2"


def visual_share(task: str, k: int | None, n: int = 64) -> tuple[float, float, float]:
    """(mean, min, mean prompt length) of the visual share over ``n`` held-out prompts of ``task``."""
    from mmkv.tiny.tasks import V2_SIZES, heldout_set

    from .grow import build_v2_processor
    from .train import FastEncoder

    enc = FastEncoder(build_v2_processor())
    shares, lengths = [], []
    for s in heldout_set(task, n, k, size=V2_SIZES.get(task)):
        b = enc.encode([s.episode()], answer_last=False, aux=False)
        total = int(b["attention_mask"].sum())
        shares.append(int((b["mm_token_type_ids"] > 0).sum()) / total)
        lengths.append(total)
    return sum(shares) / n, min(shares), sum(lengths) / n


def stage_rows(root: Path = STAGES) -> list[str]:
    rows = []
    done = sorted((p for p in root.glob("*/metrics.json")), key=lambda p: p.stat().st_mtime)
    for p in done:
        m = json.loads(p.read_text())
        acc = m["heldout_accuracy"]
        wall = (m.get("train_wall_s", 0) + m.get("eval_wall_s", 0)) / 60
        cells = " | ".join(f"{acc.get(k, float('nan')):.2f}" for k in COLUMNS)
        rows.append(f"| {m['stage']} | {m['steps']} | {wall:.0f} | {cells} |")
    return rows


def curve_rows(root: Path = STAGES) -> list[str]:
    """Every held-out evaluation in the finished stages' logs (cumulative steps since g0), one row each."""
    rows, total = [], 0
    done = sorted((p for p in root.glob("*/metrics.json")), key=lambda p: p.stat().st_mtime)
    for p in done:
        m = json.loads(p.read_text())
        seen = set()
        for line in (p.parent / "log.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "eval" in r and r["step"] not in seen:
                seen.add(r["step"])
                cells = " | ".join(f"{r['eval'].get(k, float('nan')):.2f}" for k in COLUMNS)
                rows.append(f"| {m['stage']} | {r['step']} | {total + r['step']} | {cells} |")
        total += m["steps"]
    return rows


COLUMNS = (
    "needle@4",
    "needle@8",
    "text_needle@8",
    "spot_difference",
    "count@4",
    "count@8",
    "video_direction",
    "video_colour",
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.tiny.report_v2", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="store_true")
    p.add_argument("--stages", action="store_true")
    p.add_argument("--curves", action="store_true")
    p.add_argument("-n", type=int, default=64)
    args = p.parse_args(argv)
    if args.shape:
        print("| task | setting | visual share (mean / min) | prompt tokens (mean) |\n|---|---|---|---|")
        for task, k in (
            ("needle", 8),
            ("needle", 4),
            ("needle", 2),
            ("text_needle", 8),
            ("count", 8),
            ("count", 4),
            ("spot_difference", None),
            ("video_direction", None),
            ("video_colour", None),
        ):
            mean, low, length = visual_share(task, k, args.n)
            setting = f"{k} images" if k else ("2 pictures" if task == "spot_difference" else "8 frames")
            print(f"| `{task}` | {setting} | {mean:.1%} / {low:.1%} | {length:.0f} |")
    if args.stages:
        print("| stage | steps | wall min | " + " | ".join(COLUMNS) + " |")
        print("|---|---|---|" + "---|" * len(COLUMNS))
        print("\n".join(stage_rows()))
    if args.curves:
        print("| stage | step | total steps | " + " | ".join(COLUMNS) + " |")
        print("|---|---|---|" + "---|" * len(COLUMNS))
        print("\n".join(curve_rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
