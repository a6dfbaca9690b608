"""Measure the core library on CPU: physical KV bytes per method and the prefill cost of the statistics.

A Qwen2.5-VL with a mid-size text tower (random weights) answers a multi-image prompt built by hand
(no processor needed). Usage: ``.venv/bin/python scripts/measure_core.py [--images 8] [--budget 0.2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import mmkv
from mmkv.compat import cache_kwargs
from mmkv.inputs.modality import IMAGE, ModalityMap

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 900, 901, 902, 903


def build_model(layers: int, hidden: int, heads: int, kv_heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    head_dim = hidden // heads
    quarter = head_dim // 2
    section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=1024,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_inputs(images: int, grid: int, text_tokens: int) -> tuple[dict, ModalityMap]:
    g = torch.Generator().manual_seed(1)
    per_image = (grid // 2) ** 2
    ids, types = [1, 2, 3], [0, 0, 0]
    for i in range(images):
        ids += [10 + i, VISION_START] + [IMAGE_PAD] * per_image + [VISION_END]
        types += [0, 0] + [1] * per_image + [0]
    ids += torch.randint(20, 800, (text_tokens,), generator=g).tolist()
    types += [0] * text_tokens
    input_ids = torch.tensor([ids])
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=torch.tensor([types]),
        pixel_values=torch.randn(images * grid * grid, 3 * 2 * 14 * 14, generator=g),
        image_grid_thw=torch.tensor([[1, grid, grid]] * images),
    )
    modality = ModalityMap.text_only(len(ids))
    modality.modality[torch.tensor(types) == 1] = IMAGE
    return inputs, modality


def prefill_ms(model, inputs, modality, method, budget, repeats: int) -> tuple[float, float, float, object]:
    times, stats, comp = [], [], []
    for _ in range(repeats):
        model.model.rope_deltas = None
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        with mmkv.compress(model, method, budget, modality=modality, record_attention=False) as session:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(**inputs, **cache_kwargs(model, cache), use_cache=True)
            times.append(time.perf_counter() - t0)
        stats.append(session.trace.timings.stats_s)
        comp.append(session.trace.timings.compress_s)
    return 1000 * statistics.median(times), 1000 * statistics.median(stats), 1000 * statistics.median(comp), session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--grid", type=int, default=16, help="patch grid per image (tokens = (grid/2)^2)")
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--budgets", default="0.1,0.2")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = build_model(args.layers, args.hidden, args.heads, args.kv_heads)
    inputs, modality = build_inputs(args.images, args.grid, args.text)
    counts = modality.counts()
    print(
        f"prompt: {len(modality)} tokens ({counts['image']} image, {counts['text']} text); "
        f"text tower {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads, fp32, 2 threads"
    )
    prefill_ms(model, inputs, modality, "full", 1.0, 1)  # warm-up
    full_ms, _, _, _ = prefill_ms(model, inputs, modality, "full", 1.0, args.repeats)
    print(
        f"{'method':13s} {'budget':>6s} {'KV bytes':>12s} {'vs Full':>8s} {'kept/layer/head min-mean-max':>30s} "
        f"{'prefill ms':>11s} {'stats ms':>9s} {'plan+apply ms':>14s}"
    )
    from mmkv.methods import METHODS

    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in sorted(METHODS):
            ms, st, cp, session = prefill_ms(model, inputs, modality, name, budget, args.repeats)
            t = session.trace
            kept = [sum(layer.budgets) / len(layer.budgets) for layer in t.layers]
            spread = f"{min(kept):.0f}-{sum(kept) / len(kept):.1f}-{max(kept):.0f}"
            print(
                f"{name:13s} {budget:6.2f} {t.bytes_compressed:12,d} {t.bytes_compressed / t.bytes_full:8.3f} "
                f"{spread:>30s} {ms:11.1f} {st:9.1f} {cp:14.1f}"
            )
    print(f"Full prefill (no statistics): {full_ms:.1f} ms")


if __name__ == "__main__":
    main()
