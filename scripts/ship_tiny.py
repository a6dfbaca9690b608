"""Verify a finished teaching-model v2 stage and write it as the bundled model (weights, metrics, model card).

    .venv/bin/python scripts/ship_tiny.py training/tiny-v2/STAGE [--out DIR] [--samples 100] [--force]

1. Held-out check through ``mmkv.generate`` with the Full cache (greedy, up to 16 tokens, the scene checker's
   exact match) on a fixed set (``seed=777``, not training's eval seed) per v2 task at its hardest setting:
   ``needle@8``, ``text_needle@8``, ``count@8``, ``spot_difference``, ``video_direction``, ``video_colour``,
   at the v2 suite's image sizes (``mmkv.tiny.tasks.V2_SUITE``). A task ships at accuracy >= 0.95.
2. Refuses (exit 2) a stage whose ``needle`` does not ship: the app's examples, the CLI's and the tests
   need it. ``--force`` writes anyway, for a dry run, never into the bundled model's folder.
3. Writes ``--out`` (default ``mmkv/assets/mmkv-tiny-qwen2vl``, replaced as a whole): the stage's model
   files (not ``aux.safetensors``, ``log.jsonl``, ``args.json``, ``metrics.json``), ``training_metrics.json``
   (the suite, the held-out accuracy per task with n, the threshold, ``shipped_tasks``, the stage chain
   with steps and wall time, totals, hardware) and the model card ``README.md``, written from those facts.

After shipping into the bundled folder, the rest follows the model (see ``docs/tiny-v2.md``): the examples
(``scripts/make_examples.py``), the example runs (``scripts/make_runs.py``), ``docs/eval.md`` and README figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUNDLED_DIR = ROOT / "mmkv" / "assets" / "mmkv-tiny-qwen2vl"
#: What a stage folder holds besides the model: the trainer's own records, never shipped.
NOT_SHIPPED = {"aux.safetensors", "log.jsonl", "args.json", "metrics.json"}
#: v2's tasks at their hardest settings (name, task, images per prompt).
SETTINGS = (
    ("needle@8", "needle", 8),
    ("text_needle@8", "text_needle", 8),
    ("count@8", "count", 8),
    ("spot_difference", "spot_difference", None),
    ("video_direction", "video_direction", None),
    ("video_colour", "video_colour", None),
)
THRESHOLD = 0.95
SEED = 777
V1_STEPS, V1_WALL_MIN = 6800, 185  # the v1 chain v2 was grown from (its model card)

QUESTIONS = {
    "needle": ('"Which image has the red circle?"', '"The red circle is in image 3."'),
    "text_needle": ('"What is the password?" (a sentence between two images)', '"The password is maple."'),
    "count": ('"How many images have a red shape?"', '"There are three images with a red shape."'),
    "spot_difference": (
        '"What changed between the two pictures?"',
        '"The blue square turned red." / "The red circle moved." / "A green triangle appeared." / '
        '"The green triangle disappeared."',
    ),
    "video_direction": ('"Which way does the ball move?"', '"The ball moves left."'),
    "video_colour": ('"What colour is the ball in the last frame?"', '"The ball is red in the last frame."'),
}


def stage_chain(stage_dir: Path) -> list[dict[str, Any]]:
    """The stages that led to ``stage_dir``, oldest first, following each stage's ``--init`` while it names a
    stage folder beside it: per stage its name, input, steps, wall time (training + evaluation) and the
    settings that differ."""
    chain: list[dict[str, Any]] = []
    here: Path | None = stage_dir
    while here is not None and (here / "metrics.json").is_file():
        m = json.loads((here / "metrics.json").read_text(encoding="utf-8"))
        a = m.get("args", {})
        init = Path(a["init"]) if a.get("init") else None
        parent = init if init is not None and (ROOT / init).parent.resolve() == stage_dir.parent.resolve() else None
        chain.append(
            {
                "stage": m.get("stage", here.name),
                "from": parent.name if parent is not None else ("v1" if not a.get("steps") else str(init or "")),
                "steps": int(m.get("steps", m.get("step", 0))),
                "train_wall_s": int(m.get("train_wall_s", 0)),
                "eval_wall_s": int(m.get("eval_wall_s", 0)),
                "recipe": recipe(a),
                "heldout_accuracy_64": m.get("heldout_accuracy", {}),
            }
        )
        here = (ROOT / parent) if parent is not None else None
        if here is not None and any(c["stage"] == here.name for c in chain):
            break  # a loop in the records: stop rather than spin
    return chain[::-1]


def recipe(a: dict[str, Any]) -> str:
    """One line of a stage's training arguments (what the model card's stage table shows)."""
    if not a.get("steps"):
        return "grown from v1 (function-preserving; training.tiny.grow)"
    parts = [f"weights {a.get('weights', '?')}"]
    if a.get("k_start") is not None:
        parts.append(f"K {a['k_start']}→{a.get('k_max')}" if a["k_start"] != a.get("k_max") else f"K {a['k_start']}")
    for key, label in (("spot_frac", "two-picture"), ("count_frac", "count scenes"), ("video_frac", "video")):
        if a.get(key):
            parts.append(f"{label} {a[key]:.0%}")
    parts.append(f"LR {a.get('lr')}, batch {a.get('batch')}")
    probes = [
        name
        for key, name in (
            ("retrieval_weight", "retrieval"),
            ("diff_weight", "diff probe"),
            ("presence_weight", "presence probe"),
        )
        if a.get(key)
    ]
    if a.get("spot_retrieval"):
        probes.append("spot retrieval")
    if probes:
        parts.append("+ " + ", ".join(probes))
    return "; ".join(parts)


def shape(model_dir: Path) -> dict[str, Any]:
    """The model's shape from ``config.json`` and its parameter count and file size from the safetensors header."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    t, v = cfg["text_config"], cfg["vision_config"]
    vision = text = 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            if "visual" in key:
                vision += n
            else:
                text += n
    return {
        "class": cfg["architectures"][0],
        "layers": t["num_hidden_layers"],
        "heads": t["num_attention_heads"],
        "kv_heads": t["num_key_value_heads"],
        "head_dim": t["hidden_size"] // t["num_attention_heads"],
        "hidden": t["hidden_size"],
        "mlp": t["intermediate_size"],
        "vocab": t["vocab_size"],
        "mrope_section": t.get("rope_parameters", {}).get("mrope_section"),
        "rms_norm_eps": t.get("rms_norm_eps"),
        "vision_width": v["embed_dim"],
        "vision_depth": v["depth"],
        "patch": v["patch_size"],
        "merge": v["spatial_merge_size"],
        "params": vision + text,
        "vision_params": vision,
        "text_params": text,
        "file_bytes": (model_dir / "model.safetensors").stat().st_size,
    }


def evaluate(stage_dir: Path, samples: int, threads: int) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out accuracy per setting (Full cache, greedy) and the CPU time of one answer (median of 3)."""
    import torch

    import mmkv
    from mmkv.tiny.tasks import V2_SUITE, make_sample

    torch.set_num_threads(threads)
    model, processor = mmkv.load(str(stage_dir), device="cpu")
    accuracy: dict[str, float] = {}
    for name, task, k in SETTINGS:
        t0 = time.perf_counter()
        right = 0
        for s in V2_SUITE.heldout(task, samples, k, seed=SEED):
            out = mmkv.generate(model, processor, s.chat, "full", 1.0, max_new_tokens=16, record_attention=False)
            right += s.check(out.text)
        accuracy[name] = right / samples
        print(f"{name}: {right}/{samples} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    timing: dict[str, float] = {}
    for label, sample in (
        ("needle_8_images", make_sample("needle", "timing", 8, V2_SUITE.size("needle"))),
        ("video_8_frames", make_sample("video_direction", "timing")),
    ):
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            out = mmkv.generate(model, processor, sample.chat, "full", 1.0, max_new_tokens=16, record_attention=False)
            times.append(time.perf_counter() - t0)
        timing[label] = round(statistics.median(times[1:]), 3)
        timing[f"{label}_prompt_tokens"] = out.trace.prompt_length
    return accuracy, timing


def build_metrics(
    stage_dir: Path, accuracy: dict[str, float], samples: int, timing: dict[str, float], forced: bool = False
) -> dict[str, Any]:
    """``training_metrics.json`` of the shipped model (the tests and the tools read ``suite`` and ``shipped_tasks``)."""
    from mmkv.tiny.tasks import V2_SUITE

    last = json.loads((stage_dir / "metrics.json").read_text(encoding="utf-8"))
    chain = stage_chain(stage_dir)
    shipped = [task for name, task, _k in SETTINGS if accuracy.get(name, 0.0) >= THRESHOLD]
    out: dict[str, Any] = {
        "model": "mmkv-tiny-qwen2vl v2",
        "stage": last.get("stage", stage_dir.name),
        "step": sum(c["steps"] for c in chain),
        "suite": V2_SUITE.to_json(),
        "heldout_accuracy": accuracy,
        "n_per_task": samples,
        "heldout": {
            "seed": SEED,
            "method": "full",
            "decoding": "greedy, up to 16 tokens, mmkv.generate",
            "check": "exact match with the answer recomputed from the scene (mmkv.tiny.tasks.check_answer)",
            "settings": {name: {"task": task, "images": k} for name, task, k in SETTINGS},
        },
        "ship_threshold": THRESHOLD,
        "shipped_tasks": shipped,
        "chain": chain,
        "total_steps": sum(c["steps"] for c in chain),
        "total_wall_s": sum(c["train_wall_s"] + c["eval_wall_s"] for c in chain),
        "grown_from": {"model": "v1", "steps": V1_STEPS, "wall_min": V1_WALL_MIN},
        "hardware": last.get("hardware"),
        "cpu": last.get("cpu"),
        "torch": last.get("torch"),
        "answer_seconds": timing,
    }
    if forced:
        out["forced"] = True  # written with --force: a dry run, not fit to ship
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def model_card(metrics: dict[str, Any], s: dict[str, Any]) -> str:
    """The model card, written from ``training_metrics.json``'s facts and the model's shape."""
    from mmkv.tiny.tasks import WORDS, WORDS_V2

    suite = metrics["suite"]["sizes"]
    words = len(WORDS) + len(WORDS_V2)
    acc, shipped, n = metrics["heldout_accuracy"], set(metrics["shipped_tasks"]), metrics["n_per_task"]
    chain = metrics["chain"]
    hours = metrics["total_wall_s"] / 3600
    lines = [
        "# mmkv-tiny-qwen2vl: a teaching model, not a general VLM",
        "",
    ]
    if metrics.get("forced"):
        lines += [
            "> **Dry run** (`scripts/ship_tiny.py --force`): this stage does not meet the bar; not fit to ship.",
            "",
        ]
    lines += [
        f"A {s['params'] / 1e6:.2f}M-parameter `{s['class']}` trained by this project on synthetic scenes of "
        "coloured shapes (`mmkv/tiny/tasks.py`). It exists so that mmkv's app, CLI and tests can run offline on a "
        f"CPU with a model whose attention has learned something. It knows {words} words and reads "
        f"{suite['needle']} px pictures of circles, squares and triangles and 8-frame {suite['video_colour']} px "
        "videos of a moving ball. It cannot describe real photos or follow instructions.",
        "",
        "This is teaching model **v2** (`docs/tiny-v2.md`): grown from v1 (4 layers, 1.34M parameters, "
        f"{V1_STEPS:,} steps) by a function-preserving map (`training/tiny/grow.py`) and trained further in "
        f"{len(chain)} stages.",
        "",
        "## Architecture",
        f'- The real transformers class `{s["class"]}`. It loads with `mmkv.load("bundled")` with the hub '
        "offline and without torchvision.",
        f"- Text model: hidden size {s['hidden']}, {s['layers']} layers, {s['heads']} attention heads over "
        f"{s['kv_heads']} KV heads (grouped-query attention, {s['heads'] // s['kv_heads']} query heads per KV head), "
        f"head_dim {s['head_dim']}, MLP {s['mlp']}, M-RoPE sections {s['mrope_section']}, "
        f"`rms_norm_eps` {s['rms_norm_eps']}, untied LM head.",
        f"- Vision tower: width {s['vision_width']}, {s['vision_depth']} blocks, patch {s['patch']}, "
        f"{s['merge']}×{s['merge']} merge. That is {s['vision_params']:,} of the {s['params']:,} parameters "
        f"(text {s['text_params']:,}).",
        f"- Images: {suite['needle']} px for the multi-image tasks ({(suite['needle'] // 28) ** 2} visual tokens "
        f"each), {suite['spot_difference']} px for the two-picture task "
        f"({(suite['spot_difference'] // 28) ** 2} tokens), drawn on a position-shaded background (red rises left "
        "to right, blue top to bottom; `mmkv.tiny.tasks.shaded_background`) so that every token's content says "
        f"where it is. Video frames: {suite['video_colour']} px on flat grey, 8 frames = 4 temporal groups × "
        f"{(suite['video_colour'] // 28) ** 2} = {4 * (suite['video_colour'] // 28) ** 2} tokens.",
        f"- Tokenizer: word-level, {s['vocab']} tokens (v1's ids kept, the new tasks' words appended), with the "
        'Qwen special tokens. The chat template is Qwen-style, labels images "Image 1:", "Image 2:", … and has '
        "no default system turn.",
        f"- `model.safetensors` is {_mb(s['file_bytes'])} (fp32).",
        "- `training_metrics.json` records the suite (tasks and image sizes: `mmkv.tiny.tasks.suite_of` reads it, "
        "and `mmkv eval`, the examples and the tests draw this model's samples with it), the held-out accuracy, "
        "the shipped tasks and the stage chain.",
        "",
        "## Tasks and held-out accuracy",
        f"Greedy exact match of the whole answer through `mmkv.generate` (Full cache), {n} held-out samples per "
        f"task (seed {metrics['heldout']['seed']}, not training's eval seed) at each task's hardest setting "
        f"(`python scripts/ship_tiny.py`). A task ships at ≥ {metrics['ship_threshold']:.0%}; the tests hold the "
        "model to its shipped tasks.",
        "",
        "| task | question → answer | setting | accuracy | shipped |",
        "|---|---|---|---|---|",
    ]
    for name, task, k in SETTINGS:
        q, a = QUESTIONS[task]
        setting = f"{k} images" if k else ("2 pictures" if task == "spot_difference" else "8 frames")
        ok = task in shipped
        why = "yes" if ok else "no (below the bar; learning curve: `docs/tiny-v2.md`, Stages)"
        value = f"**{acc[name]:.2f}**" if ok else f"{acc[name]:.2f}"
        lines.append(f"| `{task}` | {q} → {a} | {setting} | {value} | {why} |")
    unshipped = [task for _n, task, _k in SETTINGS if task not in shipped]
    lines += [
        "",
        (
            "Every v2 task ships."
            if not unshipped
            else "Not shipped: "
            + ", ".join(f"`{t}`" for t in unshipped)
            + f". They stayed under {metrics['ship_threshold']:.0%} at their hardest setting when this stage "
            "was exported; the app offers examples only for shipped tasks, and `docs/tiny-v2.md` has the "
            "learning curve of every task over the stages."
        ),
        "",
        "## Training",
        "Every step draws fresh synthetic episodes (one scene, 1–6 question/answer turns). The loss covers the "
        "answer tokens and their closing `<|im_end|>`, plus auxiliary probes dropped at export (cells, bind, "
        "motion, retrieval attention, changed-cell and colour-presence probes; `training/tiny/train.py`). The "
        "chain (`scripts/train_tiny_v2.sh` replays it; each stage's folder in `training/tiny-v2/` keeps its "
        "arguments, log and metrics):",
        "",
        "| stage | from | steps | wall min | recipe |",
        "|---|---|---|---|---|",
    ]
    for c in chain:
        wall = (c["train_wall_s"] + c["eval_wall_s"]) / 60
        lines.append(f"| {c['stage']} | {c['from'] or '–'} | {c['steps']:,} | {wall:.0f} | {c['recipe']} |")
    lines += [
        "",
        f"Total: {metrics['total_steps']:,} steps in {hours:.1f} h of wall time after v1's {V1_STEPS:,} steps "
        f"(about {V1_WALL_MIN} min); wall time is as each stage's `metrics.json` recorded it (logged step times plus "
        "evaluations, on a shared machine). Per-stage held-out accuracy "
        "(64 samples, teacher-forced) is in "
        "`training_metrics.json` (`chain`) and in `docs/tiny-v2.md`.",
        "",
        "## Hardware and time",
        f"- {metrics.get('hardware') or 'unknown hardware'} ({metrics.get('cpu') or 'CPU'}, "
        f"torch {metrics.get('torch') or '?'}), no GPU, shared with other jobs, so wall times vary.",
    ]
    t = metrics.get("answer_seconds") or {}
    if t:
        lines.append(
            f"- An answer to an 8-image prompt ({t.get('needle_8_images_prompt_tokens')} tokens) takes "
            f"{t.get('needle_8_images')} s on this CPU (median of 3 after a warm-up); an 8-frame video prompt "
            f"({t.get('video_8_frames_prompt_tokens')} tokens) {t.get('video_8_frames')} s."
        )
    lines += [
        "",
        "## Replay",
        "```bash",
        "bash scripts/train_tiny_v2.sh       # the chain, resumable stage by stage (docs/tiny-v2.md)",
        f"python scripts/ship_tiny.py training/tiny-v2/{metrics['stage']}   # verify, write this folder",
        "```",
        "",
        "## Limitations",
        "A teaching model, not a general VLM: it knows only these scenes and question forms, answers in fixed "
        "sentences, and its accuracy outside the held-out settings above (more images, other sizes, real "
        "pictures) is not measured. It exists to make KV-cache compression visible on a CPU.",
        "",
    ]
    return "\n".join(lines)


def write_model(stage_dir: Path, out: Path, metrics: dict[str, Any]) -> Path:
    """``out`` replaced by the stage's model files, ``training_metrics.json`` and the model card."""
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise SystemExit(f"refusing to replace {out}: it is not empty and holds no model")
    tmp = out.with_name(out.name + ".shipping")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(stage_dir.iterdir()):
        if f.is_file() and f.name not in NOT_SHIPPED:
            shutil.copyfile(f, tmp / f.name)
            (tmp / f.name).chmod(0o644)  # the trainer writes some files owner-only; a package asset is world-readable
    (tmp / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(model_card(metrics, shape(tmp)), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", help="a finished v2 stage folder, e.g. training/tiny-v2/m2")
    ap.add_argument("--out", default=str(BUNDLED_DIR), help="model folder to write (default: the bundled model's)")
    ap.add_argument("--samples", type=int, default=100, help="held-out samples per task (default 100)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--force",
        action="store_true",
        help="write even when needle does not ship (a dry run; never the bundled folder)",
    )
    a = ap.parse_args(argv)
    stage, out = Path(a.stage), Path(a.out)
    meta_path = stage / "metrics.json"
    if not (stage / "model.safetensors").is_file() or not meta_path.is_file():
        print(f"{stage} is not a finished stage (model.safetensors and metrics.json)", file=sys.stderr)
        return 2
    arch = json.loads(meta_path.read_text(encoding="utf-8")).get("args", {}).get("arch")
    if arch != "v2":
        print(f"{stage} was trained with --arch {arch}, not v2: ship_tiny.py ships v2 stages", file=sys.stderr)
        return 2
    if a.force and out.resolve() == BUNDLED_DIR.resolve():
        print("--force writes a dry run: give --out another folder than the bundled model's", file=sys.stderr)
        return 2
    accuracy, timing = evaluate(stage, a.samples, a.threads)
    metrics = build_metrics(stage, accuracy, a.samples, timing, forced=a.force)
    print(json.dumps({"stage": metrics["stage"], "accuracy": accuracy, "shipped": metrics["shipped_tasks"]}, indent=2))
    if "needle" not in metrics["shipped_tasks"]:
        msg = (
            f"{stage}: needle@8 is {accuracy['needle@8']:.2f} < {THRESHOLD}: the image needle must ship "
            "(the app's examples, the CLI's and the tests use it)"
        )
        if not a.force:
            print(f"refused: {msg}; nothing written (--force writes a dry run elsewhere)", file=sys.stderr)
            return 2
        print(f"--force: {msg}; writing anyway", file=sys.stderr)
    print(f"wrote {write_model(stage, out, metrics)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
