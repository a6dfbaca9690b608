"""``mmkv bench``: physical KV memory and decode speed of every method, against Full and the floor.

A decode step cannot be faster than reading the weights plus the kept KV once from memory, so each
run reports the **floor** ``(weight bytes + KV bytes) / measured memory bandwidth`` next to the
measured decode time. No hub is needed: models are built from published Qwen2.5-VL configurations
(or a widened bundled-model shape for CPU runs) with random weights — speed and memory do not depend
on the values — and prompts are synthetic multi-image inputs with a realistic visual share.

Per (context, method, budget) *cell*: physical KV bytes after compression (the KV ratio excludes the
room preallocated for generated tokens, so Full is 1.00 by definition), peak memory in prefill and
decode (device memory on CUDA, the process's peak RSS on CPU), prefill / statistics / compression
time, decode ms per token (median after warm-up), aten operations per decode step (device-
independent), the floor, and every ratio against Full at the same context. Each finished cell is
appended to ``<out>/bench.jsonl`` at once (``--resume`` skips finished cells); the tables (JSON, CSV,
markdown) and a plotly HTML report are built from that store.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import DynamicCache

from ..cache.layers import cache_bytes
from ..compat import cache_kwargs, model_config
from ..inputs.modality import IMAGE, ModalityMap
from ..runtime.opcount import count_ops
from ..runtime.session import Session
from .progress import Progress
from .records import ResultStore, write_records

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Text and vision sizes of the published Qwen2.5-VL checkpoints (config.json of the Instruct models).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": dict(
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    ),
    "qwen2.5-vl-3b": dict(
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    ),
}
#: A CPU-sized shape: the bundled teaching model's family widened to 8 layers x 16 query / 8 KV heads
#: (head_dim 64) with a small vision tower, so a 3k-8k-token prompt runs on a laptop CPU while reading
#: the KV cache is a real share of a decode step (as on a GPU at long context).
SHAPES["tiny-wide"] = dict(
    text=dict(
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=507,
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    ),
    vision=dict(
        depth=2,
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        out_hidden_size=1024,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
    ),
)
#: Per model: (contexts, image grid, new tokens, dtype) when the command line does not say.
DEFAULTS: dict[str, tuple[str, int, int, str]] = {
    "tiny": ("512", 8, 16, "float32"),
    "tiny-wide": ("3072,8192", 16, 24, "float32"),
}
GPU_DEFAULTS = ("8192,32768", 64, 64, "bfloat16")
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653


@dataclass
class BenchRow:
    model: str
    device: str
    context: int
    method: str
    budget: float | int
    kv_bytes_full: int
    kv_bytes: int  # the compressed prompt's KV (room reserved for generated tokens excluded)
    kv_reserved_bytes: int  # room preallocated for generated tokens
    kv_ratio: float  # kv_bytes / kv_bytes_full: 1.00 for Full
    peak_prefill_bytes: int | None  # CUDA: device memory; CPU: process peak RSS; None: unknown
    peak_decode_bytes: int | None
    prefill_ms: float
    stats_ms: float
    compress_ms: float
    decode_ms: float  # median per token after warm-up
    ops_per_step: int  # aten operations of one decode step
    floor_ms: float
    vs_floor: float
    compress_overhead: float = 0.0  # (stats + compression) / prefill of Full at the same context
    # (prefill - Full's prefill) / Full's prefill: what the method adds to the prefill, all told (for all-query
    # methods, whose statistics pass also computes the attention output, this is the honest overhead)
    prefill_overhead: float = 0.0
    speedup: float = 1.0  # decode speed-up vs Full at the same context (Full ms / method ms)
    ops_ratio: float = 1.0  # aten ops per decode step vs Full
    floor_speedup: float = 1.0  # speed-up the floor predicts


def build_shape(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A Qwen2.5-VL with a published shape and random weights, directly on ``device``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = SHAPES[name]
    vocab = shape["text"]["vocab_size"]
    special = (
        (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END)
        if vocab > IMAGE_TOKEN
        else (vocab - 4, vocab - 3, vocab - 2, vocab - 1)
    )
    config = Qwen2_5_VLConfig(
        text_config=shape["text"],
        vision_config=shape["vision"],
        image_token_id=special[0],
        video_token_id=special[1],
        vision_start_token_id=special[2],
        vision_end_token_id=special[3],
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


def image_layout(length: int, visual_share: float, per_image: int) -> tuple[int, int]:
    """``(images, text tokens)`` of a synthetic prompt: each image is ``per_image`` tokens plus its two markers."""
    n_images = max(1, min(round(visual_share * length / per_image), (length - 4) // (per_image + 2)))
    text_len = length - n_images * (per_image + 2)
    if text_len < 4:
        raise ValueError(
            f"context {length} is too short for {n_images} images of {per_image} tokens: raise --contexts or "
            f"lower --image-grid (an image of grid g is (g/2)^2 tokens)"
        )
    return n_images, text_len


def synthetic_prompt(
    model: torch.nn.Module, length: int, visual_share: float = 0.9, image_grid: int = 64, seed: int = 0
) -> tuple[dict[str, Any], ModalityMap]:
    """Input ids + random pixels for a Qwen-VL prompt of ``length`` tokens, ``visual_share`` of them image tokens.

    Each image is a ``image_grid x image_grid`` patch grid, i.e. ``(image_grid / 2)^2`` LLM tokens.
    """
    cfg = model_config(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    merge = cfg.vision_config.spatial_merge_size
    per_image = (image_grid // merge) ** 2
    n_images, text_len = image_layout(length, visual_share, per_image)
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.get_text_config().vocab_size
    filler = torch.randint(min(100, vocab // 4), min(vocab - 8, 150000), (text_len,), generator=g).tolist()
    ids: list[int] = filler[: text_len // 2]
    types: list[int] = [0] * len(ids)
    for _ in range(n_images):
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * per_image + [cfg.vision_end_token_id]
        types += [0] + [1] * per_image + [0]
    ids += filler[text_len // 2 :]
    types += [0] * (text_len - text_len // 2)
    patch_dim = 3 * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size**2
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


_HWM = "/proc/self/status"


def _rss_peak() -> int | None:
    """The process's peak resident set size (VmHWM) in bytes, or None where /proc does not tell."""
    try:
        with open(_HWM) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak(device: torch.device) -> int | None:
    """Peak memory since the last reset: device memory on CUDA, the process's peak RSS on CPU (None: unknown)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_peak()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: the language model's parameters.

    The vision tower is idle during decoding, and of an untied input-embedding table only one row
    is read per token, so both are left out.
    """
    visual = getattr(getattr(model, "model", model), "visual", None)
    skip = {id(p) for p in visual.parameters()} if visual is not None else set()
    pretrained = cast("PreTrainedModel", model)  # the embedding accessors are transformers'
    embed, head = pretrained.get_input_embeddings(), pretrained.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        skip |= {id(p) for p in embed.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


@torch.inference_mode()
def run_one(
    model,
    inputs,
    modality,
    method: str,
    budget: float | int,
    new_tokens: int,
    warmup: int,
    bandwidth: float,
    preallocate: bool = True,
) -> dict[str, Any]:
    """Prefill + compress + ``new_tokens`` greedy decode steps (+ one counted step); the measured numbers."""
    device = next(model.parameters()).device
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    reserve = new_tokens + 1 if preallocate else 0
    session = Session(model, method, budget, modality=modality, record_attention=False, reserve=reserve)
    cache = DynamicCache(config=model_config(model).get_text_config(decoder=True))
    _reset_peak(device)
    with session.activate():
        out = model(**inputs, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
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
        ops = count_ops(lambda: model(input_ids=token, **cache_kwargs(model, cache), use_cache=True))
    trace = session.trace
    assert trace is not None  # the prefill above made it
    steps = trace.timings.decode_s[warmup : warmup + new_tokens] or trace.timings.decode_s
    decode_ms = 1000 * statistics.median(steps)
    # the room reserved for generated tokens is memory held, but not part of the compressed prompt
    reserved = trace.num_layers * trace.num_kv_heads * reserve * trace.bytes_per_token_head
    kv_bytes = trace.bytes_compressed - reserved
    floor_ms = 1000 * (weight_bytes(model) + kv_mid) / bandwidth
    return dict(
        kv_bytes_full=trace.bytes_full,
        kv_bytes=kv_bytes,
        kv_reserved_bytes=reserved,
        kv_ratio=kv_bytes / trace.bytes_full if trace.bytes_full else 1.0,
        peak_prefill_bytes=peak_prefill,
        peak_decode_bytes=peak_decode,
        prefill_ms=1000 * trace.timings.prefill_s,
        stats_ms=1000 * trace.timings.stats_s,
        compress_ms=1000 * trace.timings.compress_s,
        decode_ms=decode_ms,
        ops_per_step=ops,
        floor_ms=floor_ms,
        vs_floor=decode_ms / floor_ms,
    )


def build_model(model_name: str, device: torch.device, dtype: str) -> torch.nn.Module:
    """``tiny`` (the test family's tiny Qwen2.5-VL), a shape of :data:`SHAPES`, or a checkpoint."""
    if model_name == "tiny":
        from ..testing.tiny import build_tiny

        model, _ = build_tiny("qwen2_5_vl")
        return model.to(device)
    if model_name in SHAPES:
        return build_shape(model_name, str(device), getattr(torch, dtype))
    from ..models import load

    model, _ = load(model_name, device=str(device), dtype=dtype)
    return model


def cell_key(model: str, context: int, method: str, budget: float | int) -> str:
    return f"{model}|{context}|{method}|{budget}"


class CellMeasurer:
    """A model built once on a device, with the device's measured bandwidth: measures cells one after the
    other (the serial run), or serves them as a Ray actor (:func:`mmkv.experiments.sweep.run_bench_ray`)."""

    def __init__(self, model_name: str, device: str | None, dtype: str, settings: dict[str, Any]) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model(model_name, self.device, dtype)
        self.bandwidth = memory_bandwidth(self.device, size_mb=64 if self.device.type == "cpu" else 1024)
        self.device_name = str(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu")
        self.settings = settings  # visual_share, image_grid, new_tokens, warmup, preallocate
        self.warmed: set[int] = set()

    def run(self, context: int, method: str, budget: float | int) -> dict[str, Any]:
        """One cell; the first cell at a new ``context`` first runs a short Full warm-up."""
        st = self.settings
        inputs, modality = synthetic_prompt(self.model, context, st["visual_share"], st["image_grid"])
        if context not in self.warmed:  # first forwards at a new shape pay one-off allocation costs
            run_one(
                self.model,
                inputs,
                modality,
                "full",
                1.0,
                min(st["new_tokens"], st["warmup"] + 2),
                0,
                self.bandwidth,
                st["preallocate"],
            )
            self.warmed.add(context)
        measured = run_one(
            self.model,
            inputs,
            modality,
            method,
            budget,
            st["new_tokens"],
            st["warmup"],
            self.bandwidth,
            st["preallocate"],
        )
        return {"device_name": self.device_name, **measured}


def run(
    model_name: str,
    contexts: Sequence[int],
    methods: Sequence[str],
    budgets: Sequence[float | int],
    new_tokens: int = 64,
    warmup: int = 8,
    device: str | None = None,
    dtype: str = "bfloat16",
    visual_share: float = 0.9,
    image_grid: int = 64,
    preallocate: bool = True,
    store: ResultStore | None = None,
    resume: bool = False,
    progress: bool = True,
    ray_address: str | None = None,
    workers: int | None = None,
) -> list[BenchRow]:
    """Run the grid; Full is measured first at every context as the reference.

    Each finished cell is appended to ``store`` at once; with ``resume`` the cells already in it are
    not run again (Full's included, whose record still serves as the reference). ``ray_address``
    (``""`` for a local instance) runs the cells on Ray actors instead (:func:`mmkv.experiments.sweep.run_bench_ray`).
    """
    store = store if store is not None else ResultStore()
    done = store.finished() if resume else {}
    grid = [
        (c, m, b)
        for c in contexts
        for m, b in [("full", 1.0)] + [(m, b) for m in methods if m != "full" for b in budgets]
    ]
    todo = [cell for cell in grid if cell_key(model_name, *cell) not in done]
    for context in dict.fromkeys(c for c, _, _ in todo):  # bad sizes fail before any model is built
        image_layout(context, visual_share, (image_grid // 2) ** 2)  # every shape here merges 2 x 2 patches
    bar = Progress(len(grid), len(grid) - len(todo), label="bench") if progress else None
    settings = dict(
        visual_share=visual_share, image_grid=image_grid, new_tokens=new_tokens, warmup=warmup, preallocate=preallocate
    )

    def record(cell: tuple[int, str, float | int], measured: dict[str, Any]) -> dict[str, Any]:
        context, method, budget = cell
        return {
            "kind": "cell",
            "key": cell_key(model_name, *cell),
            "model": model_name,
            "device": measured.pop("device_name", None),
            "context": context,
            "method": method,
            "budget": budget,
            **measured,
        }

    if todo and ray_address is not None:
        from .sweep import run_bench_ray  # the only module that imports Ray

        run_bench_ray(
            todo,
            store,
            model_name,
            record,
            CellMeasurer,
            address=ray_address or None,
            workers=workers,
            device=device,
            dtype=dtype,
            settings=settings,
            progress=bar,
        )
    elif todo:
        measurer = CellMeasurer(model_name, device, dtype, settings)
        for cell in todo:
            rec = record(cell, measurer.run(*cell))
            store.append(rec)
            if bar is not None:
                bar.update(f"{rec['key']}: decode {rec['decode_ms']:.2f} ms/token")
    if bar is not None:
        bar.close()
    return rows_from(store.finished(), [cell_key(model_name, *cell) for cell in grid])


def rows_from(records: dict[str, dict[str, Any]], keys: Sequence[str]) -> list[BenchRow]:
    """Rows of ``keys`` (in order) from finished cell records, with every ratio against Full at the same context."""
    names = {f.name for f in fields(BenchRow)}
    rows = []
    for key in keys:
        rec = records.get(key)
        if rec is None:
            continue
        full = records.get(cell_key(rec["model"], rec["context"], "full", 1.0), rec)
        rows.append(
            BenchRow(
                **{k: v for k, v in rec.items() if k in names},
                compress_overhead=(rec["stats_ms"] + rec["compress_ms"]) / full["prefill_ms"],
                prefill_overhead=(rec["prefill_ms"] - full["prefill_ms"]) / full["prefill_ms"],
                speedup=full["decode_ms"] / rec["decode_ms"],
                ops_ratio=rec["ops_per_step"] / full["ops_per_step"],
                floor_speedup=full["floor_ms"] / rec["floor_ms"],
            )
        )
    return rows


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def markdown_table(rows: Sequence[BenchRow]) -> str:
    mem = "RSS" if rows and rows[0].device == "cpu" else "device"
    head = (
        f"| context | method | budget | KV MiB | KV ratio | peak prefill GiB ({mem}) | peak decode GiB ({mem}) | "
        "prefill ms | stats+compress % of Full prefill | extra prefill % vs Full | decode ms/tok | decode speed-up vs Full | ops/step | ops vs Full | "
        "floor ms | measured/floor |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.context} | {r.method} | {r.budget} | {r.kv_bytes / 2**20:.1f} | {r.kv_ratio:.3f} | "
            f"{_gib(r.peak_prefill_bytes)} | {_gib(r.peak_decode_bytes)} | {r.prefill_ms:.1f} | "
            f"{100 * r.compress_overhead:.1f} | {100 * r.prefill_overhead:+.1f} | {r.decode_ms:.2f} | {r.speedup:.2f}× | {r.ops_per_step} | "
            f"{r.ops_ratio:.2f} | {r.floor_ms:.2f} | {r.vs_floor:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[BenchRow]) -> Any:
    """Plotly figure: decode ms/token vs KV bytes per method, with the floor."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(r.method for r in rows):
        sel = [r for r in rows if r.method == method]
        fig.add_scatter(
            x=[r.kv_bytes / 2**20 for r in sel],
            y=[r.decode_ms for r in sel],
            mode="markers",
            name=method,
            text=[f"ctx {r.context}, budget {r.budget}" for r in sel],
        )
    fig.add_scatter(
        x=[r.kv_bytes / 2**20 for r in rows],
        y=[r.floor_ms for r in rows],
        mode="markers",
        marker_symbol="line-ew-open",
        marker_size=14,
        name="floor",
    )
    fig.update_layout(
        xaxis_title="physical KV (MiB)",
        yaxis_title="decode ms / token",
        title="Decode time vs kept KV, with the memory-bandwidth floor",
    )
    return fig


def write(rows: Sequence[BenchRow], out: Path) -> None:
    write_records(rows, out, "bench")
    (out / "bench.md").write_text(markdown_table(rows) + "\n")
    with contextlib.suppress(ImportError):
        plot(rows).write_html(out / "bench.html", include_plotlyjs="cdn")


def main(argv: Sequence[str] | None = None) -> int:
    from ..inputs.budget import parse_budget
    from ..methods import METHODS

    p = argparse.ArgumentParser(prog="mmkv bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="tiny",
        help=f"tiny (seconds on CPU), tiny-wide (CPU at 3k-8k tokens), {', '.join(s for s in SHAPES if s != 'tiny-wide')} "
        "(published shapes, GPU), or a local checkpoint",
    )
    p.add_argument(
        "--contexts", default=None, help="comma-separated prompt lengths (default: per model, e.g. 512 for tiny)"
    )
    p.add_argument("--methods", default=",".join(sorted(METHODS)), help="comma-separated methods (Full always runs)")
    p.add_argument(
        "--budgets", default="0.2", help="comma-separated budgets: ratios like 0.2 or tokens per head like 256"
    )
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps timed per cell (default: per model)")
    p.add_argument("--warmup", type=int, default=4, help="decode steps run before timing starts")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: float32 for tiny models, bfloat16 otherwise)")
    p.add_argument("--visual-share", type=float, default=0.9, help="share of the prompt that is image tokens")
    p.add_argument(
        "--image-grid",
        type=int,
        default=None,
        help="patch grid per image, tokens per image = (grid/2)^2 (default: per model)",
    )
    p.add_argument(
        "--no-preallocate",
        action="store_true",
        help="grow the cache by concatenation at every step (the plain reference path)",
    )
    p.add_argument("--out", default="bench-results", help="folder for bench.jsonl (per cell) and the tables")
    p.add_argument("--resume", action="store_true", help="skip the cells already in OUT/bench.jsonl")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the cells on a Ray cluster (pip install 'mmkv[cluster]'); no ADDRESS: a local instance",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --ray: actors (default one per GPU, else 1: CPU actors on one machine disturb each other's timings)",
    )
    a = p.parse_args(argv)
    contexts, grid, new_tokens, dtype = DEFAULTS.get(a.model, GPU_DEFAULTS)
    out = Path(a.out)
    try:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file: give a folder")
        rows = run(
            a.model,
            [int(c) for c in (a.contexts or contexts).split(",")],
            methods,
            [parse_budget(b) for b in a.budgets.split(",")],
            a.new_tokens or new_tokens,
            a.warmup,
            a.device,
            a.dtype or dtype,
            a.visual_share,
            a.image_grid or grid,
            not a.no_preallocate,
            store=ResultStore(out / "bench.jsonl"),
            resume=a.resume,
            ray_address=a.ray,
            workers=a.workers,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write(rows, out)
    print(markdown_table(rows))
    print(
        f"results: {out / 'bench.jsonl'} (per cell), {out / 'bench.md'}, bench.json, bench.csv, bench.html",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
