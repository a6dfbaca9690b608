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
                            model,
                            processor,
                            None,
                            method=method,
                            budget=budget,
                            max_new_tokens=MAX_NEW_TOKENS,
                            prepared=prepared,
                            query_aware=query_aware,
                            **params,
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


# ---- compositions: one line each, checked against an oracle -----------------------------------


def _ctx(
    length: int,
    capacity: int,
    *,
    layer: int = 0,
    num_layers: int = 1,
    h_q: int = 4,
    h_kv: int = 2,
    seed: int = 0,
    request=None,
    modality=None,
):
    """A LayerContext with the statistics of random queries/keys (no ties in the scores)."""
    from mmkv.inputs.modality import ModalityMap
    from mmkv.methods import LayerContext
    from mmkv.statistics.stats import StatsRequest, compute_layer_stats

    g = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(1, h_q, length, d, generator=g) * 1.5
    k = torch.randn(1, h_kv, length, d, generator=g) * 1.5
    modality = modality if modality is not None else ModalityMap.text_only(length)
    request = request or StatsRequest(window=32, column_sums=True)
    stats = compute_layer_stats(q, k, modality.modality, request, d**-0.5)
    return LayerContext(layer, num_layers, h_kv, h_q, length, capacity, modality, stats)


def _largest_remainder(values: list[float], total: int) -> list[int]:
    out = [math.floor(v + 1e-9) for v in values]
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _oracle_headadaptive_h2o(ctx, alpha: float, recent_ratio: float) -> list[list[int]]:
    """AdaKV's allocation (docs/methods.md, AdaKV) over H2O's accumulated attention, in numpy."""
    import numpy as np

    h_kv, length, cap = ctx.num_kv_heads, ctx.length, ctx.capacity
    sums = ctx.stats.column_sums.numpy().astype(np.float64)  # [H_q, L]
    scores = sums.reshape(h_kv, -1, length).mean(1)  # GQA: mean over each KV head's group
    window = min(cap, max(1, round(cap * recent_ratio)))
    base, span = cap - window, length - window
    flat = scores[:, :span].ravel()
    top = np.argsort(-flat, kind="stable")[: h_kv * base]
    counts = np.bincount(top // span, minlength=h_kv)
    caps = _largest_remainder([n * (1 - alpha) + base * alpha for n in counts], h_kv * base)
    kept = []
    for h in range(h_kv):
        best = np.argsort(-scores[h, :span], kind="stable")[: caps[h]]
        kept.append(sorted(best.tolist() + list(range(span, length))))
    return kept


@pytest.mark.parametrize("length,capacity", [(41, 10), (41, 17), (64, 9), (30, 6)])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_headadaptive_over_h2o_scores_matches_oracle(length: int, capacity: int, alpha: float) -> None:
    from mmkv.methods import H2OScorer, HeadAdaptive

    for seed in range(3):
        ctx = _ctx(length, capacity, seed=seed)
        plan = HeadAdaptive(H2OScorer(recent_ratio=0.5), alpha=alpha).plan_layer(ctx)
        expected = _oracle_headadaptive_h2o(ctx, alpha, 0.5)
        assert [k.tolist() for k in plan.kept] == expected
        assert sum(plan.budgets) == capacity * ctx.num_kv_heads
        assert plan.info["head_capacities"] == [len(k) for k in expected]


def _same_plans(a, b) -> None:
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert [k.tolist() for k in pa.kept] == [k.tolist() for k in pb.kept]
        assert _plain(pa.info) == _plain(pb.info)


@pytest.mark.parametrize("length,capacity", [(41, 12), (90, 20), (90, 40), (200, 30), (20, 25)])
def test_presets_equal_their_compositions_layer_by_layer(length: int, capacity: int) -> None:
    from mmkv.methods import (
        H2O,
        AdaKV,
        H2OScorer,
        HeadAdaptive,
        Pyramid,
        PyramidKV,
        SinkScorer,
        SnapKV,
        SnapKVScorer,
        StreamingLLM,
        Uniform,
    )

    pairs = [
        (PyramidKV(), Pyramid(SnapKVScorer(window_size=8, kernel=7, pooling="max"), beta=20)),
        (PyramidKV(window=4, beta=5), Pyramid(SnapKVScorer(4, 7, "max"), beta=5)),
        (PyramidKV(), Pyramid(SnapKV(window=8, kernel=7, pooling="max"), beta=20)),  # a preset as the inner policy
        (SnapKV(), Uniform(SnapKVScorer())),
        (AdaKV(), HeadAdaptive(SnapKVScorer(32, 7, "max"), alpha=0.2)),
        (AdaKV(window=4, kernel=3), HeadAdaptive(SnapKVScorer(4, 3, "max"), alpha=0.2)),
        (H2O(), Uniform(H2OScorer())),
        (StreamingLLM(), Uniform(SinkScorer())),
    ]
    num_layers = 4
    for preset, composed in pairs:
        assert composed.stats_request() == preset.stats_request()
        for layer in range(num_layers):
            ctx = _ctx(length, capacity, layer=layer, num_layers=num_layers, seed=layer)
            want, got = preset.plan_layer(ctx), composed.plan_layer(ctx)
            if isinstance(preset, H2O):  # H2O's preset always records its recent window
                got.info.setdefault("recent", want.info["recent"])
            _same_plans([want], [got])


def test_pyramid_composes_over_any_policy() -> None:
    """``Pyramid(HeadAdaptive(H2OScorer()))``: the pyramid's layer capacities, head-adaptive inside each layer."""
    from mmkv.methods import H2OScorer, HeadAdaptive, Pyramid

    num_layers, length, capacity = 4, 90, 20
    method = Pyramid(HeadAdaptive(H2OScorer()), beta=4)
    caps = []
    for layer in range(num_layers):
        ctx = _ctx(length, capacity, layer=layer, num_layers=num_layers, seed=layer)
        plan = method.plan_layer(ctx)
        cap = plan.info["layer_capacity"]
        caps.append(cap)
        assert sum(plan.budgets) == cap * ctx.num_kv_heads
        inner = HeadAdaptive(H2OScorer()).plan_layer(_ctx(length, cap, layer=layer, num_layers=num_layers, seed=layer))
        assert [k.tolist() for k in plan.kept] == [k.tolist() for k in inner.kept]
    assert caps == sorted(caps, reverse=True) and caps[0] > caps[-1] and sum(caps) == num_layers * capacity


@pytest.fixture(scope="module")
def tiny_run():
    import mmkv
    from mmkv.testing.tiny import build_tiny

    torch.set_num_threads(2)
    model, processor = build_tiny("qwen2_vl")
    prepared = mmkv.adapter_for(model).prepare(model, processor, _chat(3, 128))

    def run(method, budget=0.3, **kw):
        return mmkv.generate(
            model, processor, None, method=method, budget=budget, max_new_tokens=3, prepared=prepared, **kw
        )

    return run


def test_global_presets_equal_their_compositions(tiny_run) -> None:
    """MEDA = LayerEntropy over LOOK-M's text prior; MadaKV = ModalityAdaptive over the unpooled window scores."""
    from mmkv.methods import MEDA, LayerEntropy, LookM, MadaKV, ModalityAdaptive, SnapKVScorer

    pairs = [
        (MEDA(), LayerEntropy(LookM(recent_share=0.75, merge="average"))),
        (MEDA(entropy="full", split=(1, 1)), LayerEntropy(LookM(recent_share=0.5, merge="average"), entropy="full")),
        (MadaKV(), ModalityAdaptive(SnapKVScorer(32, kernel=1))),
        (MadaKV(window=4, hcc="A"), ModalityAdaptive(SnapKVScorer(4, kernel=1), hcc="A")),
    ]
    for preset, composed in pairs:
        for budget in (0.1, 0.3):
            want, got = tiny_run(preset, budget), tiny_run(composed, budget)
            assert want.token_ids == got.token_ids
            assert [_record(want)["layers"]] == [_record(got)["layers"]]
            assert got.trace.method == composed.name


def test_compositions_run_end_to_end(tiny_run) -> None:
    """Any scorer under any policy runs in a session; the trace records the parts and reads back."""
    import mmkv
    from mmkv.methods import METHODS, H2OScorer, HeadAdaptive, LayerEntropy, ModalityAdaptive, Pyramid, SinkScorer

    for method in (
        HeadAdaptive(H2OScorer()),
        Pyramid(SinkScorer(2), beta=4),
        LayerEntropy(H2OScorer()),
        ModalityAdaptive(H2OScorer(), hcc="B"),
    ):
        result = tiny_run(method)
        trace = result.trace
        assert method.name not in METHODS  # compositions are not registered under a name
        again = mmkv.Trace.from_json(trace.to_json())
        assert again.method == method.name and again.to_dict() == trace.to_dict()
        cap = trace.capacity
        total = sum(sum(layer.budgets) for layer in trace.layers)
        assert total <= cap * trace.num_kv_heads * trace.num_layers
    head = tiny_run(HeadAdaptive(H2OScorer())).trace.params
    assert head == {"scorer": {"type": "H2OScorer", "recent_ratio": 0.5, "gqa_reduce": "mean"}, "alpha": 0.2}


def test_text_prior_over_h2o_is_lookm_selection_under_the_budget() -> None:
    """``Uniform(TextPrior(H2OScorer()))`` keeps LOOK-M's tokens when the text fits in N; else the budget holds."""
    from mmkv.inputs.modality import IMAGE, ModalityMap
    from mmkv.methods import H2OScorer, LookM, TextPrior, Uniform

    length = 60
    codes = torch.zeros(length, dtype=torch.int8)
    codes[5:45] = IMAGE  # 5 text tokens, 40 image tokens, 15 text tokens (question)
    modality = ModalityMap.text_only(length)
    modality.modality = codes
    for capacity in (30, 40, 50):  # even: H2O's round(C/2) == LOOK-M's floor(C/2)
        ctx = _ctx(length, capacity, modality=modality, seed=capacity)
        got = Uniform(TextPrior(H2OScorer())).plan_layer(ctx)
        want = LookM(merge="none").plan_layer(ctx)
        assert [k.tolist() for k in got.kept] == [k.tolist() for k in want.kept]
    ctx = _ctx(length, 16, modality=modality, seed=1)  # N = 8 < the 12 text tokens before the window
    got = Uniform(TextPrior(H2OScorer())).plan_layer(ctx)
    assert got.budgets == [16, 16] and LookM(merge="none").plan_layer(ctx).budgets == [20, 20]
    for kept in got.kept:
        assert all(codes[p] == 0 for p in kept.tolist() if p < length - 8)  # only text before the window


def test_decode_policies_are_typed_and_read_the_dict_form() -> None:
    from mmkv.methods import H2O, ChunkRetrieval, H2OEviction
    from mmkv.methods.decode import as_decode_policy

    ctx = _ctx(41, 10)
    plan = H2O(decode_evict=True).plan_layer(ctx)
    assert isinstance(plan.decode, H2OEviction)
    assert plan.decode["policy"] == "h2o" and plan.decode.capacity == 10 and dict(plan.decode)["recent"] == 5
    spec = {"policy": "h2o", "capacity": 10, "recent": 5, "scores": plan.decode.scores}
    typed = as_decode_policy(spec)
    assert isinstance(typed, H2OEviction) and typed.capacity == 10 and typed.scores is plan.decode.scores
    hybrid = as_decode_policy(
        {
            "policy": "hybrid",
            "head_types": ["static", "dynamic"],
            "sinks": 2,
            "recent": 4,
            "chunk_size": 4,
            "top_chunks": 1,
        }
    )
    assert isinstance(hybrid, ChunkRetrieval) and hybrid.scoring == "mean" and hybrid["offload"] is True
    with pytest.raises(ValueError, match="unknown decode policy"):
        as_decode_policy({"policy": "nope"})
    import mmkv.cache.hybrid  # noqa: F401  (importing it registers nothing)
    import mmkv.cache.layers

    assert not hasattr(mmkv.cache.layers, "DECODE_POLICIES")


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
