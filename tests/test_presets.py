"""The named methods as compositions: golden kept sets, and compositions checked against an oracle.

``tests/golden/kept_sets.json.gz`` was recorded *before* the methods were rebuilt from scorers and
budget policies (docs/methods.md, "Composing methods"): every method of :data:`mmkv.methods.METHODS`
(plus a few hyper-parameter variants that take other code paths) x the tiny model of every family x
budgets 0.1, 0.3 and 8 tokens x query-aware / query-agnostic, greedy. Per run it holds the generated
ids and, per layer, the kept positions per KV head (a hex bitmask), the merges (source/target), the
decode evictions and retrievals and the plan's ``info``. The test re-runs them all and asserts
exact equality. Re-record (only on purpose) with ``python tests/test_presets.py --record``.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "kept_sets.json.gz"
BUDGETS = (0.1, 0.3, 8)
MAX_NEW_TOKENS = 4
#: prompts: two small images (text-heavy) and three larger ones (image-heavy)
PROMPTS = {"s": (2, 64), "l": (3, 128)}
#: (label, method name, hyper-parameters): the presets with their defaults, plus code paths the defaults skip.
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("full", "full", {}),
    ("streamingllm", "streamingllm", {}),
    ("h2o", "h2o", {}),
    ("h2o+decode_evict", "h2o", {"decode_evict": True}),
    ("snapkv", "snapkv", {}),
    ("snapkv+w4", "snapkv", {"window": 4, "kernel": 3, "pooling": "max"}),
    ("pyramidkv", "pyramidkv", {}),
    ("pyramidkv+w2", "pyramidkv", {"window": 2, "beta": 4}),
    ("adakv", "adakv", {}),
    ("adakv+w4", "adakv", {"window": 4}),
    ("lookm", "lookm", {}),
    ("meda", "meda", {}),
    ("madakv", "madakv", {}),
    ("madakv+A", "madakv", {"hcc": "A", "window": 4}),
    ("hybridkv", "hybridkv", {}),
    ("hybridkv+c4", "hybridkv", {"chunk_size": 4, "recent": 4, "sinks": 2}),
)


def _chat(n_images: int, size: int) -> list[dict]:
    from mmkv.testing.tiny import make_image

    content: list[dict] = [{"type": "image", "image": make_image(i, size)} for i in range(n_images)]
    content.append({"type": "text", "text": "which image has the red circle ?"})
    return [{"role": "user", "content": content}]


def _mask_hex(positions: list[int]) -> str:
    bits = 0
    for p in positions:
        bits |= 1 << int(p)
    return format(bits, "x")


def _plain(value: Any) -> Any:
    """JSON-safe, with floats rounded to 9 significant digits (same machine, same numbers)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return float(f"{value:.9g}") if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _record(result: Any) -> dict:
    trace = result.trace
    layers = []
    for layer in trace.layers:
        entry: dict[str, Any] = {"kept": [_mask_hex(k) for k in layer.kept]}
        if layer.merges is not None:
            entry["merges"] = [None if m is None else [list(m["source"]), list(m["target"])] for m in layer.merges]
        if layer.decode_evictions is not None:
            entry["evictions"] = _plain(layer.decode_evictions)
        if layer.decode_retrievals is not None:
            entry["retrievals"] = _plain(layer.decode_retrievals)
        entry["info"] = _plain(layer.info)
        layers.append(entry)
    return {"ids": list(result.token_ids), "layers": layers}


def collect(families: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Run every variant on every family, budget and query mode: ``{key: record}``."""
    import mmkv
    from mmkv.testing.tiny import FAMILIES, build_tiny

    torch.manual_seed(0)
    out: dict[str, dict] = {}
    for family in families or FAMILIES:
        model, processor = build_tiny(family)
        for prompt, (n_images, size) in PROMPTS.items():
            prepared = mmkv.adapter_for(model).prepare(model, processor, _chat(n_images, size))
            for label, method, params in VARIANTS:
                for budget in BUDGETS:
                    for query_aware in (True, False):
                        result = mmkv.generate(
                            model, processor, None, method=method, budget=budget, max_new_tokens=MAX_NEW_TOKENS,
                            prepared=prepared, query_aware=query_aware, **params,
                        )
                        mode = "qa" if query_aware else "ctx"
                        out[f"{family}|{prompt}|{label}|{budget}|{mode}"] = _record(result)
    return out


def load_golden() -> dict[str, dict]:
    with gzip.open(GOLDEN, "rt") as fh:
        return json.load(fh)


def _families() -> tuple[str, ...]:
    from mmkv.testing.tiny import FAMILIES

    return FAMILIES


@pytest.mark.parametrize("family", _families())
def test_presets_keep_the_golden_sets(family: str) -> None:
    torch.set_num_threads(2)
    golden = {k: v for k, v in load_golden().items() if k.startswith(family + "|")}
    assert len(golden) == len(PROMPTS) * len(VARIANTS) * len(BUDGETS) * 2
    got = collect((family,))
    assert set(got) == set(golden)
    for key in sorted(golden):
        assert got[key] == golden[key], key


if __name__ == "__main__":
    torch.set_num_threads(2)
    data = collect()
    if "--record" in sys.argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        with gzip.GzipFile(GOLDEN, "wb", mtime=0) as fh:
            fh.write(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
        print(f"wrote {len(data)} runs to {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
    elif "--check" in sys.argv:
        golden = load_golden()
        bad = [k for k in golden if data.get(k) != golden[k]]
        print(f"{len(golden) - len(bad)}/{len(golden)} equal; differing: {bad[:20]}")
