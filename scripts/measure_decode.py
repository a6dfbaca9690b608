"""Per-layer decode attention on CPU at realistic shapes: time and aten ops per step, by cache layer.

Layers are built from synthetic full KV ``[1, H_kv, L, d]`` with ``build_layer`` (so the script also runs
against an older checkout: ``PYTHONPATH=<old tree> python scripts/measure_decode.py``):

- ``full``: a DenseLayer holding all L tokens (what the uncompressed model attends to);
- ``dense``: every head keeps ``budget * L`` tokens (SnapKV-like);
- ``ragged``: the same total, uneven per-head budgets (AdaKV-like: 0.5x .. 1.5x the mean);
- ``ragged per-head``: the previous implementation's algorithm (a Python loop over KV heads with fp32
  up-casts), on the same ragged layer, for comparison;
- ``hybrid``: HybridKV, half the heads static (budgets as ``ragged``), half dynamic (sinks 4, recent 64,
  chunks of 16, as many chunks as the budget allows), the query re-selecting chunks every step.

Each step appends one token and attends with one query (``update`` + ``attend``: what a decode step
does per layer); the table gives the median over ``--steps`` steps and the aten ops of one step
(all ops / compute ops, i.e. without views and metadata), counted with a ``TorchDispatchMode``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mmkv.cache.hybrid  # noqa: F401  (registers the "hybrid" decode policy)
from mmkv.cache.layers import build_layer
from mmkv.methods.base import LayerPlan
from mmkv.runtime.opcount import OpCounter


class AttentionModule(torch.nn.Module):
    """Stands in for a decoder attention module (the dense path's SDPA reads these two attributes)."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = group, True


def per_head_attend(layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """The previous RaggedLayer.attend: per KV head, fp32 up-casts, one softmax over prefix + tail."""
    h_kv, group = key.shape[1], query.shape[1] // key.shape[1]
    outs = []
    for h in range(h_kv):
        a, b = layer.offsets[h], layer.offsets[h + 1]
        q = query[0, h * group : (h + 1) * group].float()
        parts = [(layer.prefix_keys[a:b], layer.prefix_values[a:b]), (key[0, h], value[0, h])]
        probs = torch.softmax(torch.cat([torch.matmul(q, k.float().T) * scale for k, _ in parts], -1), -1)
        out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
        start = 0
        for k, v in parts:
            out += torch.matmul(probs[..., start : start + k.shape[0]], v.float())
            start += k.shape[0]
        outs.append(out.to(query.dtype))
    return torch.cat(outs, dim=0).transpose(0, 1).unsqueeze(0).contiguous()


def uneven(total: int, heads: int) -> list[int]:
    """Per-head budgets from 0.5x to 1.5x the mean, summing to ``total``."""
    weights = [0.5 + h / max(1, heads - 1) for h in range(heads)]
    out = [int(total * w / sum(weights)) for w in weights]
    out[-1] += total - sum(out)
    return out


def plans(length: int, heads: int, budget: float, g: torch.Generator) -> dict[str, LayerPlan]:
    per_head = max(1, int(budget * length))
    pick = lambda n: torch.randperm(length, generator=g)[:n].sort().values  # noqa: E731
    ragged = [pick(n) for n in uneven(per_head * heads, heads)]
    chunk, sinks, recent = 16, 4, 64
    types = ["static", "dynamic"] * (heads // 2)
    return {
        "full": LayerPlan(kept=[torch.arange(length)] * heads),
        "dense": LayerPlan(kept=[pick(per_head) for _ in range(heads)]),
        "ragged": LayerPlan(kept=ragged),
        "hybrid": LayerPlan(
            kept=[ragged[h] if t == "static" else torch.arange(length) for h, t in enumerate(types)],
            decode={
                "policy": "hybrid",
                "head_types": types,
                "sinks": sinks,
                "recent": recent,
                "chunk_size": chunk,
                "top_chunks": max(1, (per_head - sinks - recent) // chunk),
                "scoring": "mean",
                "offload": True,
                "initial_chunks": None,
            },
        ),
    }


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print("| L | layer | ms / step (median) | aten ops / step (all / compute) |")
    print("|---|---|---|---|")
    for length in args.lengths:
        g = torch.Generator().manual_seed(0)
        h, d = args.kv_heads, args.head_dim
        keys = torch.randn(1, h, length, d, generator=g).to(args.dtype)
        values = torch.randn(1, h, length, d, generator=g).to(args.dtype)
        rows, module = [], AttentionModule(args.group)
        for name, plan in plans(length, h, args.budget, g).items():
            kinds = [(name, None)] + ([("ragged per-head", per_head_attend)] if name == "ragged" else [])
            for label, attend in kinds:
                layer = build_layer(keys, values, plan, reserve=args.steps + 2)
                times, ops = [], None
                for step in range(args.steps + 2):
                    new = torch.randn(1, h, 1, d, generator=g).to(args.dtype)
                    query = torch.randn(1, h * args.group, 1, d, generator=g).to(args.dtype)
                    counter = OpCounter() if step == 1 else None
                    t0 = time.perf_counter()
                    if counter is not None:
                        counter.__enter__()
                    key, value = layer.update(new, new)
                    if attend is None:
                        layer.attend(module, query, key, value, d**-0.5)
                    else:
                        attend(layer, query, key, value, d**-0.5)
                    if counter is not None:
                        counter.__exit__(None, None, None)
                        ops = (counter.total, counter.compute)
                    elif step > 1:
                        times.append(time.perf_counter() - t0)
                rows.append((label, statistics.median(times) * 1e3, ops))
        for label, ms, (total, compute) in rows:
            print(f"| {length} | {label} | {ms:.2f} | {total} / {compute} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 3072, 8192])
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=2, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float32)
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
