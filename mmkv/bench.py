"""``python -m mmkv.bench``: physical KV memory and decode speed of every method, against the floor.

A decode step cannot be faster than reading the weights plus the kept KV once from device memory, so
each run reports the **floor** ``(weight bytes + KV bytes) / measured memory bandwidth`` next to the
measured decode time. Real-size runs need no hub: models are built from the published Qwen2.5-VL
configurations with random weights (speed and memory do not depend on the values), and prompts are
synthetic multi-image inputs with a realistic visual share.

Per (context, method, budget): physical KV bytes after compression, peak device memory in prefill
and decode, prefill / statistics / compression time, decode ms per token (median after warm-up,
device-synchronised), the floor, measured/floor and the speed-up vs Full. Output: JSON, CSV, a
markdown table and a plotly HTML report.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from .cache import cache_bytes
from .compat import cache_kwargs
from .modality import IMAGE, ModalityMap
from .records import write_records
from .session import Session

#: Text and vision sizes of the published Qwen2.5-VL checkpoints (config.json of the Instruct models).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
    "qwen2.5-vl-3b": dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
}
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653


@dataclass
class BenchRow:
    model: str
    device: str
    context: int
    method: str
    budget: float | int
    kv_bytes_full: int
    kv_bytes: int
    kv_ratio: float
    peak_prefill_bytes: int
    peak_decode_bytes: int
    prefill_ms: float
    stats_ms: float
    compress_ms: float
    compress_overhead: float  # (stats + compression) / prefill of Full at the same context
    decode_ms: float  # median per token after warm-up
    floor_ms: float
    vs_floor: float
    speedup: float = 1.0  # decode speed-up vs Full at the same context
    floor_speedup: float = 1.0  # speed-up the floor predicts


def build_shape(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A Qwen2.5-VL with a published shape and random weights, directly on ``device``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = SHAPES[name]
    config = Qwen2_5_VLConfig(
        text_config=shape["text"], vision_config=shape["vision"], image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    config._name_or_path = f"{name} (random weights)"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def synthetic_prompt(model: torch.nn.Module, length: int, visual_share: float = 0.9, image_grid: int = 64,
                     seed: int = 0) -> tuple[dict[str, Any], ModalityMap]:
    """Input ids + random pixels for a Qwen-VL prompt of ``length`` tokens, ``visual_share`` of them image tokens.

    Each image is a ``image_grid x image_grid`` patch grid, i.e. ``(image_grid / 2)^2`` LLM tokens.
    """
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    merge = cfg.vision_config.spatial_merge_size
    per_image = (image_grid // merge) ** 2
    n_images = max(1, min(round(visual_share * length / per_image), (length - 4) // (per_image + 2)))
    text_len = length - n_images * (per_image + 2)
    if text_len < 4:
        raise ValueError(f"context {length} is too short for {n_images} images of {per_image} tokens")
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.get_text_config().vocab_size
    filler = torch.randint(100, min(vocab, 150000), (text_len,), generator=g).tolist()
    ids: list[int] = filler[: text_len // 2]
    types: list[int] = [0] * len(ids)
    for _ in range(n_images):
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * per_image + [cfg.vision_end_token_id]
        types += [0] + [1] * per_image + [0]
    ids += filler[text_len // 2 :]
    types += [0] * (text_len - text_len // 2)
    patch_dim = 3 * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size ** 2
    input_ids = torch.tensor([ids], device=device)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=torch.tensor([types], device=device),
        pixel_values=torch.randn(n_images * image_grid * image_grid, patch_dim, generator=g).to(device, dtype),
        image_grid_thw=torch.tensor([[1, image_grid, image_grid]] * n_images, device=device),
    )
    modality = ModalityMap.text_only(len(ids))
    modality.modality[torch.tensor(types) == 1] = IMAGE
    return inputs, modality


def memory_bandwidth(device: torch.device, size_mb: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = size_mb * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: the language model's parameters.

    The vision tower is idle during decoding, and of an untied input-embedding table only one row
    is read per token, so both are left out.
    """
    visual = getattr(getattr(model, "model", model), "visual", None)
    skip = {id(p) for p in visual.parameters()} if visual is not None else set()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        skip |= {id(p) for p in embed.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


@torch.inference_mode()
def run_one(model, inputs, modality, method: str, budget: float | int, new_tokens: int, warmup: int,
            bandwidth: float, preallocate: bool = True) -> dict[str, Any]:
    """Prefill + compress + ``new_tokens`` greedy decode steps; returns the measured numbers."""
    device = next(model.parameters()).device
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    session = Session(model, method, budget, modality=modality, record_attention=False,
                      reserve=new_tokens if preallocate else 0)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    _reset_peak(device)
    with session.activate():
        out = model(**inputs, **cache_kwargs(model, cache), use_cache=True)
        _sync(device)
        peak_prefill = _peak(device)
        _reset_peak(device)
        token = out.logits[:, -1:].argmax(-1)
        del out
        kv_mid = cache_bytes(cache)
        for step in range(new_tokens):
            out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if step == new_tokens // 2:
                kv_mid = cache_bytes(cache)
        _sync(device)
        peak_decode = _peak(device)
    trace = session.trace
    steps = trace.timings.decode_s[warmup:] or trace.timings.decode_s
    decode_ms = 1000 * statistics.median(steps)
    floor_ms = 1000 * (weight_bytes(model) + kv_mid) / bandwidth
    return dict(
        kv_bytes_full=trace.bytes_full, kv_bytes=trace.bytes_compressed,
        kv_ratio=trace.bytes_compressed / trace.bytes_full if trace.bytes_full else 1.0,
        peak_prefill_bytes=peak_prefill, peak_decode_bytes=peak_decode,
        prefill_ms=1000 * trace.timings.prefill_s, stats_ms=1000 * trace.timings.stats_s,
        compress_ms=1000 * trace.timings.compress_s, decode_ms=decode_ms, floor_ms=floor_ms,
        vs_floor=decode_ms / floor_ms,
    )


def run(model_name: str, contexts: Sequence[int], methods: Sequence[str], budgets: Sequence[float | int],
        new_tokens: int = 64, warmup: int = 8, device: str | None = None, dtype: str = "bfloat16",
        visual_share: float = 0.9, image_grid: int = 64, preallocate: bool = True) -> list[BenchRow]:
    """Run the grid; Full is always measured first at every context as the reference."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model_name == "tiny":
        from .testing.tiny import build_tiny

        model, _ = build_tiny("qwen2_5_vl")
        model = model.to(device)
    elif model_name in SHAPES:
        model = build_shape(model_name, str(device), getattr(torch, dtype))
    else:
        from .models import load

        model, _ = load(model_name, device=str(device), dtype=dtype)
    bandwidth = memory_bandwidth(device, size_mb=64 if device.type == "cpu" else 1024)
    rows: list[BenchRow] = []
    for context in contexts:
        inputs, modality = synthetic_prompt(model, context, visual_share, image_grid)
        run_one(model, inputs, modality, "full", 1.0, min(new_tokens, warmup + 2), 0, bandwidth, preallocate)  # warm-up
        full = run_one(model, inputs, modality, "full", 1.0, new_tokens, warmup, bandwidth, preallocate)
        grid = [("full", 1.0)] + [(m, b) for m in methods if m != "full" for b in budgets]
        for method, budget in grid:
            measured = full if method == "full" else run_one(model, inputs, modality, method, budget, new_tokens,
                                                              warmup, bandwidth, preallocate)
            rows.append(BenchRow(
                model=model_name, device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                context=context, method=method, budget=budget,
                compress_overhead=(measured["stats_ms"] + measured["compress_ms"]) / full["prefill_ms"],
                speedup=full["decode_ms"] / measured["decode_ms"], floor_speedup=full["floor_ms"] / measured["floor_ms"],
                **measured,
            ))
    return rows


def markdown_table(rows: Sequence[BenchRow]) -> str:
    head = ("| context | method | budget | KV MiB | KV ratio | peak prefill GiB | peak decode GiB | prefill ms | "
            "stats+compress % | decode ms/tok | floor ms | measured/floor | speed-up | floor speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.context} | {r.method} | {r.budget} | {r.kv_bytes / 2**20:.1f} | {r.kv_ratio:.3f} | "
            f"{r.peak_prefill_bytes / 2**30:.2f} | {r.peak_decode_bytes / 2**30:.2f} | {r.prefill_ms:.1f} | "
            f"{100 * r.compress_overhead:.1f} | {r.decode_ms:.2f} | {r.floor_ms:.2f} | {r.vs_floor:.2f} | "
            f"{r.speedup:.2f} | {r.floor_speedup:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[BenchRow]) -> Any:
    """Plotly figure: decode ms/token vs KV bytes per method, with the floor."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(r.method for r in rows):
        sel = [r for r in rows if r.method == method]
        fig.add_scatter(x=[r.kv_bytes / 2**20 for r in sel], y=[r.decode_ms for r in sel], mode="markers",
                        name=method, text=[f"ctx {r.context}, budget {r.budget}" for r in sel])
    fig.add_scatter(x=[r.kv_bytes / 2**20 for r in rows], y=[r.floor_ms for r in rows], mode="markers",
                    marker_symbol="line-ew-open", marker_size=14, name="floor")
    fig.update_layout(xaxis_title="physical KV (MiB)", yaxis_title="decode ms / token",
                      title="Decode time vs kept KV, with the memory-bandwidth floor")
    return fig


def write(rows: Sequence[BenchRow], out: Path) -> None:
    write_records(rows, out, "bench")
    (out / "bench.md").write_text(markdown_table(rows) + "\n")
    try:
        plot(rows).write_html(out / "bench.html", include_plotlyjs="cdn")
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import parse_budget
    from .methods import METHODS

    p = argparse.ArgumentParser(prog="python -m mmkv.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help=f"tiny, {', '.join(SHAPES)}, or a local checkpoint")
    p.add_argument("--contexts", default="256", help="comma-separated prompt lengths, e.g. 8192,32768,65536")
    p.add_argument("--methods", default=",".join(sorted(METHODS)))
    p.add_argument("--budgets", default="0.1,0.2")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--visual-share", type=float, default=0.9)
    p.add_argument("--image-grid", type=int, default=64, help="patch grid per image (tokens = (grid/2)^2)")
    p.add_argument("--no-preallocate", action="store_true",
                   help="grow the cache by concatenation at every step (the plain reference path)")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    rows = run(a.model, [int(c) for c in a.contexts.split(",")], a.methods.split(","),
               [parse_budget(b) for b in a.budgets.split(",")], a.new_tokens, a.warmup, a.device, a.dtype,
               a.visual_share, a.image_grid, not a.no_preallocate)
    write(rows, Path(a.out))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
