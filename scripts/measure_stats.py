"""Measure what the statistics and the compression cost next to Full's prefill, per method, on CPU.

A Qwen2.5-VL with a mid-size random-weight text tower (``scripts/measure_core.py``'s builder: 8 layers,
hidden 1024, 16 query / 8 KV heads by default) prefills a hand-built multi-image prompt of about
``--lengths`` tokens once per method; the session's trace gives ``prefill_s``, ``stats_s`` and
``compress_s``. Prints ``(stats + compress) / Full's prefill`` per method and length (targets: <= 10%
for window methods, <= 30% for all-query methods), and the same share of the run's own model work
(``prefill - stats - compress``, measured in the same forward: steadier on a shared machine). For the
all-query methods (H2O, LOOK-M, MEDA) the statistics pass also computes the layer's attention output and
the model skips its own, so their statistics time includes an attention pass: what they add is the
prefill beyond Full's (``mmkv bench`` reports it as "extra prefill"). Usage:
``.venv/bin/python scripts/measure_stats.py [--lengths 3000,8000] [--methods h2o,lookm]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import mmkv
from measure_core import build_inputs, build_model
from mmkv.compat import cache_kwargs
from mmkv.methods import METHODS

GRID = 32  # 16 x 16 = 256 tokens per image


def prefill(model, inputs, modality, method: str, budget: float) -> mmkv.Trace:
    model.model.rope_deltas = None
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with (
        mmkv.compress(model, method, budget, modality=modality, record_attention=False) as session,
        torch.inference_mode(),
    ):
        model(**inputs, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return session.trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="3000,8000", help="approximate prompt lengths (tokens)")
    parser.add_argument("--methods", default=",".join(sorted(m for m in METHODS if m != "full")))
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.layers, args.hidden, args.heads, args.kv_heads)
    print(
        f"text tower: {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads, "
        f"fp32, {args.threads} threads, budget {args.budget}"
    )
    print(
        f"{'tokens':>6s} {'method':13s} {'prefill s':>9s} {'stats s':>8s} {'compress s':>10s} "
        f"{'(stats+compress)/Full':>22s} {'/own model work':>16s}"
    )
    for target in (int(x) for x in args.lengths.split(",")):
        images = max(1, round((target - 64) / (GRID // 2) ** 2))
        inputs, modality = build_inputs(images, GRID, 64)
        length = len(modality)
        prefill(model, *build_inputs(1, GRID, 64), "full", 1.0)  # warm-up
        t0 = time.perf_counter()
        full = prefill(model, inputs, modality, "full", 1.0).timings.prefill_s
        print(
            f"{length:6d} {'full':13s} {full:9.2f} {'':>8s} {'':>10s} {'':>22s}  ({time.perf_counter() - t0:.1f} s wall)"
        )
        for name in args.methods.split(","):
            t = prefill(model, inputs, modality, name, args.budget).timings
            extra = t.stats_s + t.compress_s
            print(
                f"{length:6d} {name:13s} {t.prefill_s:9.2f} {t.stats_s:8.2f} {t.compress_s:10.2f} "
                f"{100 * extra / full:21.1f}% {100 * extra / (t.prefill_s - extra):15.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
