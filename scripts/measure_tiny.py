"""Measure the bundled teaching model: held-out accuracy per task through ``mmkv.generate`` and CPU answer time.

    .venv/bin/python scripts/measure_tiny.py [--model bundled] [--samples 100] [--threads 2]

Accuracy is greedy exact match (the scene checker) on held-out seeds (``seed=777``, not the training-time
eval seed) for every task of the model's suite (``training_metrics.json``, ``mmkv.tiny.tasks.suite_of``), at
its image sizes: 4 and 8 images for the multi-image tasks, two pictures for ``spot_difference``, 8 frames for
the video tasks. Timing is the median
wall time of a whole answer (prefill + greedy decode, up to 16 tokens) to an 8-image ``needle`` prompt and
an 8-frame video prompt, after one warm-up. Prints one JSON object (the model card's numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "mmkv" / "assets" / "mmkv-tiny-qwen2vl"))
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    import mmkv
    from mmkv.tiny.tasks import MULTI_IMAGE_TASKS, make_sample, suite_of

    torch.set_num_threads(args.threads)
    suite = suite_of(args.model)  # the tasks and image sizes the model was trained on (v1: 112 px)
    model, processor = mmkv.load(args.model, device="cpu")
    report: dict[str, object] = {
        "model": args.model,
        "suite": suite.version,
        "samples": args.samples,
        "threads": args.threads,
    }
    accuracy: dict[str, float] = {}
    for task in suite.tasks:
        for k in (4, 8) if task in MULTI_IMAGE_TASKS else (None,):
            samples = suite.heldout(task, args.samples, k, seed=777)
            right = sum(
                s.check(
                    mmkv.generate(model, processor, s.chat, "full", 1.0, max_new_tokens=16, record_attention=False).text
                )
                for s in samples
            )
            accuracy[task if k is None else f"{task}@{k}"] = right / len(samples)
    report["accuracy"] = accuracy
    timing: dict[str, float] = {}
    for name, sample in (
        ("needle_8_images", make_sample("needle", "timing", 8, suite.size("needle"))),
        ("video_8_frames", make_sample("video_direction", "timing")),
    ):
        mmkv.generate(model, processor, sample.chat, "full", 1.0, max_new_tokens=16, record_attention=False)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = mmkv.generate(model, processor, sample.chat, "full", 1.0, max_new_tokens=16, record_attention=False)
            times.append(time.perf_counter() - t0)
        timing[name] = round(statistics.median(times), 4)
        timing[f"{name}_prompt_tokens"] = out.trace.prompt_length
    report["answer_seconds"] = timing
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
