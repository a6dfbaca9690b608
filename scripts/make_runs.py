"""Make the shipped example run files (``mmkv/assets/runs/``) with the bundled model.

    python scripts/make_runs.py                     # every example in mmkv/assets/examples/examples.json
    python scripts/make_runs.py --examples my.json --out runs/ --model bundled

Every example that names a ``method`` (and ``budget``; optional ``params``, ``answer``, ``shows``) gives
one run file, answered as ``mmkv run`` would (``mmkv.chat`` + ``mmkv.generate``), with its agreement
with the Full cache (token overlap, next-token KL; as the app's Compare). ``index.json`` lists the
runs with a one-line description (the example's ``shows``). Re-run after editing the examples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mmkv
from mmkv import EXAMPLES_DIR
from mmkv.trace.runfile import RUNS_DIR, SUFFIX, RunFile, default_label
from mmkv.ui.agreement import agreement, forced_logits

#: Method parameters used when an example gives none: H2O's decode-time eviction is an option
#: (``decode_evict``), and the example runs show it.
DEFAULT_PARAMS = {"h2o": {"decode_evict": True}}
VIDEO_SUFFIXES = (".webm", ".mp4", ".avi", ".mov", ".mkv", ".gif")


def example_chat(example: dict, folder: Path) -> list[dict]:
    files = [str(folder / f) for f in example.get("files", [])]
    images = [f for f in files if not f.lower().endswith(VIDEO_SUFFIXES)]
    videos = [f for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
    return mmkv.chat(example["text"], images=images, videos=videos)


def make_runs(
    examples_path: Path, out: Path, model_name: str = "bundled", max_new_tokens: int = 24, num_frames: int = 8
) -> list[dict]:
    examples = json.loads(examples_path.read_text(encoding="utf-8"))
    model, processor = mmkv.load(model_name, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"*{SUFFIX}"):
        old.unlink()
    index = []
    for number, example in enumerate(examples, 1):
        method = example.get("method")
        if not method or method == "full" or example.get("followup"):  # a run file holds one turn
            continue
        budget = example.get("budget", 0.2)
        params = example.get("params", DEFAULT_PARAMS.get(method, {}))
        chat = example_chat(example, examples_path.parent)
        kwargs = dict(max_new_tokens=max_new_tokens, num_frames=num_frames)
        full = mmkv.generate(model, processor, chat, "full", 1.0, **kwargs)
        result = mmkv.generate(model, processor, chat, method, budget, prepared=full.prepared, **kwargs, **params)
        ref_logits = forced_logits(model, full.prepared, "full", 1.0, full.token_ids)
        logits = forced_logits(model, full.prepared, method, budget, full.token_ids, method_params=params)
        agree = agreement(full.token_ids, result.token_ids, ref_logits, logits)
        if model_name == "bundled":
            result.trace.model = "bundled"  # not the path of the machine that made the file
        label = f"example {number} · {default_label(result.trace)}"
        run = RunFile.from_result(result, processor, question=example["text"], label=label, agreement=agree)
        name = f"{number:02d}-{method}{SUFFIX}"
        path = run.save(out / name)
        expected = example.get("answer")
        entry = {
            "file": name,
            "label": label,
            "method": method,
            "budget": budget,
            "params": params,
            "question": example["text"],
            "answer": result.text,
            "full_answer": full.text,
            "expected": expected,
            "description": example.get("shows", ""),
            "bytes": path.stat().st_size,
        }
        index.append(entry)
        ok = "" if expected is None or expected == result.text else f"  (expected {expected!r})"
        print(f"{name}: {path.stat().st_size:,} B  {method} @ {budget}  answer {result.text!r}{ok}")
    (out / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    total = sum(e["bytes"] for e in index)
    print(f"{len(index)} runs, {total:,} B in all, index: {out / 'index.json'}")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=Path, default=EXAMPLES_DIR / "examples.json")
    parser.add_argument("--out", type=Path, default=RUNS_DIR)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--num-frames", type=int, default=8)
    args = parser.parse_args(argv)
    make_runs(args.examples, args.out, args.model, args.max_new_tokens, args.num_frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
