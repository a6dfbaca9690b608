"""MadaKV and HybridKV: naive references, budget invariants, decode-time chunk retrieval, end to end.

The references below are per-head loops over Python lists written from the formulas of
docs/methods.md (MadaKV, HybridKV: formulas and readings); they use no helper of
``mmkv.methods``. Synthetic scores are dyadic rationals (``integer / 1024``) so that sums and GQA
means are exact in fp32 and ties are real ties (ties break toward the earlier position / lower id).
"""

from __future__ import annotations

import math

import pytest
import torch

import mmkv
import oracle
from mmkv.compat import cache_kwargs
from mmkv.inputs.modality import IMAGE, TEXT, VIDEO, ModalityMap
from mmkv.methods import HybridKV, MadaKV
from mmkv.methods.base import LayerContext, LayerPlan
from mmkv.statistics.stats import LayerStats
from mmkv.testing.tiny import FAMILIES
from oracle import masked_reference_logits

torch.set_num_threads(2)


# ---- naive references -----------------------------------------------------------------------


def ref_reduce(scores_q: torch.Tensor, h_kv: int) -> list[list[float]]:
    """GQA mean: query head i belongs to KV head i // G."""
    h_q, length = scores_q.shape
    group = h_q // h_kv
    return [
        [sum(float(scores_q[h * group + g, j]) for g in range(group)) / group for j in range(length)]
        for h in range(h_kv)
    ]


def ref_cover(values: list[float], theta: float) -> int:
    """Fewest values (largest first) whose sum reaches theta * total."""
    total = sum(values)
    if not values or total <= 0:
        return 0
    acc = 0.0
    for n, v in enumerate(sorted(values, reverse=True), start=1):
        acc += v
        if acc >= theta * total:
            return n
    return len(values)


def ref_top(row: list[float], candidates: list[int], count: int) -> list[int]:
    """The ``count`` best candidates by ``row`` (ties toward the earlier position)."""
    return sorted(candidates, key=lambda j: (-row[j], j))[: max(0, count)]


def ref_madakv(ctxs, window=32, theta=0.9, hcc="B", phi_init=1.0, min_ratio=0.2, max_ratio=2.0):
    """MadaKV per docs/methods.md (MadaKV: formulas, readings): per layer, kept lists + budgets."""
    first = ctxs[0]
    L, C, H, N = first.length, first.capacity, first.num_kv_heads, len(ctxs)
    if C >= L:
        return [{"kept": [list(range(L))] * H} for _ in ctxs]
    w = min(window, C, L)
    phi_min = min(C, max(w, int(min_ratio * C)))
    remaining = C * H * N
    phi = phi_init * C
    out = []
    for i, ctx in enumerate(ctxs):
        codes = ctx.modality.modality.tolist()
        psi = ref_reduce(ctx.stats.window_scores, H)
        span = L - w
        vis = [j for j in range(span) if codes[j] != TEXT]
        txt = [j for j in range(span) if codes[j] == TEXT]
        pref, k_v, k_t, demand, n = [], [], [], [], []
        for h in range(H):
            wv = sum(psi[h][j] for j in vis)
            wt = sum(psi[h][j] for j in txt)
            pref.append(wv / (wv + wt) if wv + wt > 0 else len(vis) / span)
            k_v.append(ref_cover([psi[h][j] for j in vis], theta))
            k_t.append(ref_cover([psi[h][j] for j in txt], theta))
            demand.append(w + k_v[h] + k_t[h])
            if hcc == "B":
                want = min(max(demand[h], phi_min), max(phi_min, math.floor(max_ratio * phi)))
            else:
                want = math.floor(phi)
            n.append(min(L, max(phi_min, want)))
        allowed = remaining - H * (N - 1 - i) * phi_min
        if sum(n) > allowed:
            spare, over = allowed - H * phi_min, sum(n) - H * phi_min
            n = [phi_min + ((x - phi_min) * spare) // over for x in n]
        kept, vb, tb = [], [], []
        for h in range(H):
            b = n[h] - w
            if hcc == "B" and k_v[h] + k_t[h] > 0:
                pv = (2 * b * k_v[h] + (k_v[h] + k_t[h])) // (2 * (k_v[h] + k_t[h]))
            else:
                pv = math.floor(b * pref[h] + 0.5)
            pv = min(pv, len(vis))
            pt = min(b - pv, len(txt))
            pv = min(b - pt, len(vis))
            kept.append(sorted(ref_top(psi[h], vis, pv) + ref_top(psi[h], txt, pt) + list(range(span, L))))
            vb.append(pv)
            tb.append(pt)
        remaining -= sum(len(k) for k in kept)
        if hcc == "A":
            comp = sum(d - phi for d in demand)
        elif hcc == "B":
            comp = sum(len(k) - phi for k in kept)
        else:
            comp = 0.0
        out.append(
            {
                "kept": kept,
                "visual_budget": vb,
                "text_budget": tb,
                "preference": pref,
                "phi": phi,
                "demand_visual": k_v,
                "demand_text": k_t,
            }
        )
        if i < N - 1 and hcc != "off":
            phi = phi - comp / (H * (N - 1 - i))
    return out


def ref_water_fill(total: int, weights: list[float], cap: int) -> list[int]:
    """Proportional integer shares under a cap: fix capped heads, re-share, floor, leftover to largest fractions."""
    n = len(weights)
    out = [0] * n
    free = list(range(n))
    while free and total > 0:
        wsum = sum(weights[i] for i in free)
        share = {i: total * weights[i] / wsum if wsum > 0 else total / len(free) for i in free}
        over = [i for i in free if share[i] >= cap]
        if over:
            for i in over:
                out[i] = cap
                total -= cap
            free = [i for i in free if i not in over]
            continue
        fl = {i: math.floor(share[i]) for i in free}
        left = total - sum(fl.values())
        for i in sorted(free, key=lambda i: (-(share[i] - fl[i]), i))[:left]:
            fl[i] += 1
        for i in free:
            out[i] = fl[i]
        break
    return out


def ref_hybridkv(ctxs, theta=0.9, tau=None, static_fraction=0.7, r=None, chunk=16, sinks=4, recent=32):
    """HybridKV per docs/methods.md (HybridKV: formulas, readings)."""
    first = ctxs[0]
    L, C, H, N = first.length, first.capacity, first.num_kv_heads, len(ctxs)
    att = [ref_reduce(ctx.stats.question_scores, H) for ctx in ctxs]
    k_theta = [[ref_cover(att[l][h], theta) for h in range(H)] for l in range(N)]
    sparsity = [[1.0 - k_theta[l][h] / L for h in range(H)] for l in range(N)]
    heads = [(l, h) for l in range(N) for h in range(H)]
    if tau is not None:
        static = {x for x in heads if sparsity[x[0]][x[1]] >= tau}
    else:
        ranked = sorted(heads, key=lambda x: (-sparsity[x[0]][x[1]], x[0], x[1]))
        static = set(ranked[: math.floor(static_fraction * len(heads) + 0.5)])
    n_s = len(static)
    n_d = len(heads) - n_s
    total = C * H * N
    share = r if r is not None else n_s / len(heads)
    pool = total if n_d == 0 else (0 if n_s == 0 else math.floor(share * total))
    lay = None
    if n_d:
        b = min(L, (total - pool) // n_d)
        if b >= L:
            s = min(sinks, L)
            rr = min(recent, L - s)
            n_chunks = math.ceil((L - s - rr) / chunk)
            k = n_chunks
        else:
            s = min(sinks, b)
            rr = max(0, min(recent, b - s - chunk) if b - s >= chunk else min(recent, b - s))
            n_chunks = math.ceil((L - s - rr) / chunk)
            k = min(n_chunks, (b - s - rr) // chunk)
        tokens = s + rr + min(k * chunk, L - s - rr)
        lay = {"sinks": s, "recent": rr, "num_chunks": n_chunks, "top_chunks": k, "tokens": tokens}
        pool = max(0, total - n_d * tokens)
    static_list = [x for x in heads if x in static]
    budgets = dict(zip(static_list, ref_water_fill(pool, [sparsity[l][h] for l, h in static_list], L)))
    out = []
    for l, ctx in enumerate(ctxs):
        codes = ctx.modality.modality.tolist()
        kept, hb, initial = [], [], []
        for h in range(H):
            a = att[l][h]
            if (l, h) in static:
                b = min(budgets[(l, h)], L)
                w = min(recent, b)
                cand = list(range(L - w))
                order = sorted(cand, key=lambda j: (codes[j] != TEXT, -a[j], j))
                kept.append(sorted(order[: b - w] + list(range(L - w, L))))
                hb.append(budgets[(l, h)])
            else:
                s, rr, k = lay["sinks"], lay["recent"], lay["top_chunks"]
                starts = list(range(s, L - rr, chunk))
                mass = [sum(a[j] for j in range(st, min(st + chunk, L - rr))) for st in starts]
                chosen = sorted(sorted(range(len(starts)), key=lambda i: (-mass[i], i))[:k])
                initial.append(chosen)
                pos = list(range(s)) + list(range(L - rr, L))
                for i in chosen:
                    pos += list(range(starts[i], min(starts[i] + chunk, L - rr)))
                kept.append(sorted(pos))
                hb.append(lay["tokens"])
        out.append(
            {
                "kept": kept,
                "head_budgets": hb,
                "types": ["static" if (l, h) in static else "dynamic" for h in range(H)],
                "sparsity": sparsity[l],
                "initial": initial,
                "layout": lay,
            }
        )
    return out


# ---- synthetic contexts ---------------------------------------------------------------------


def dyadic(g, *shape, high=64):
    return torch.randint(0, high, shape, generator=g).float() / 1024.0


def modality_map(codes: list[int]) -> ModalityMap:
    m = ModalityMap.text_only(len(codes))
    m.modality = torch.tensor(codes, dtype=torch.int8)
    return m


# 48 tokens: system text 0-7, an image 8-31, a video frame 32-35, the question 36-47
CODES = [TEXT] * 8 + [IMAGE] * 24 + [VIDEO] * 4 + [TEXT] * 12


def mada_contexts(seed, capacity, n_layers=4, codes=CODES, h_q=4, h_kv=2, window=4):
    """KV head 0 looks only at text; KV head 1 prefers visual tokens; other heads random."""
    g = torch.Generator().manual_seed(seed)
    L = len(codes)
    vis = torch.tensor([c != TEXT for c in codes])
    ctxs = []
    for layer in range(n_layers):
        s = dyadic(g, h_q, L)
        s[0:2, vis] = 0.0  # KV head 0 = query heads 0, 1: text only
        if h_kv > 1:
            group = h_q // h_kv
            s[group : 2 * group, vis] += dyadic(g, group, int(vis.sum()), high=512) + 0.25  # KV head 1: visual
        stats = LayerStats(window=window, window_scores=s)
        ctxs.append(LayerContext(layer, n_layers, h_kv, h_q, L, capacity, modality_map(codes), stats))
    return ctxs


def plan_matches(plans, ref, keys=("visual_budget", "text_budget", "demand_visual", "demand_text")):
    for i, (plan, want) in enumerate(zip(plans, ref)):
        assert [k.tolist() for k in plan.kept] == want["kept"], f"layer {i}"
        for key in keys:
            if key in want:
                assert plan.info[key] == want[key], f"layer {i} {key}"
        if "preference" in want:
            assert plan.info["preference"] == pytest.approx(want["preference"], abs=1e-12), f"layer {i}"
            assert plan.info["phi"] == pytest.approx(want["phi"], rel=1e-12, abs=1e-9), f"layer {i}"


# ---- MadaKV: decisions ------------------------------------------------------------------------


@pytest.mark.parametrize("hcc", ["A", "B", "off"])
@pytest.mark.parametrize("capacity", [6, 12, 20])
def test_madakv_equals_naive_reference(hcc: str, capacity: int) -> None:
    ctxs = mada_contexts(seed=capacity, capacity=capacity)
    plans = MadaKV(window=4, hcc=hcc).plan(ctxs)
    plan_matches(plans, ref_madakv(ctxs, window=4, hcc=hcc))
    assert all(p.decode is None for p in plans)  # eviction only


def test_madakv_planted_modality_preference() -> None:
    ctxs = mada_contexts(seed=3, capacity=16)
    for hcc in ("A", "B", "off"):
        checked = 0
        for plan in MadaKV(window=4, hcc=hcc).plan(ctxs):
            pref, vb, tb = plan.info["preference"], plan.info["visual_budget"], plan.info["text_budget"]
            assert pref[0] == 0.0 and vb[0] == 0, hcc  # the text-only head spends nothing on pixels
            assert all(CODES[p] == TEXT for p in plan.kept[0].tolist()[:-4]), hcc
            assert pref[1] > 0.5, hcc
            if vb[1] + tb[1] > 0:  # (reading A can starve late layers down to the window)
                checked += 1
                assert vb[1] > vb[0] and vb[1] > tb[1], hcc  # the image-preferring head: larger visual budget
        assert checked >= 1, hcc


@pytest.mark.parametrize("hcc", ["A", "B", "off"])
def test_madakv_total_within_budget(hcc: str) -> None:
    for seed in range(6):
        for capacity in (5, 9, 17, 30):
            for params in (
                {},
                {"phi_init": 3.0},
                {"phi_init": 0.3, "max_ratio": 5.0},
                {"theta": 0.99, "min_ratio": 0.0},
            ):
                ctxs = mada_contexts(seed, capacity, n_layers=5)
                plans = MadaKV(window=4, hcc=hcc, **params).plan(ctxs)
                total = sum(k.numel() for p in plans for k in p.kept)
                assert total <= capacity * 2 * 5, (seed, capacity, params)
                for p in plans:
                    for h, k in enumerate(p.kept):
                        assert k.numel() == p.info["visual_budget"][h] + p.info["text_budget"][h] + p.info["window"]
                        assert k.unique().numel() == k.numel() and k.tolist() == sorted(k.tolist())


def test_madakv_reading_b_carries_the_remaining_budget() -> None:
    """With phi^1 = C, reading B's phi^l is the remaining budget shared by the remaining (layer, head) pairs."""
    ctxs = mada_contexts(seed=5, capacity=14, n_layers=6)
    plans = MadaKV(window=4, hcc="B").plan(ctxs)
    remaining = 14 * 2 * 6
    for i, p in enumerate(plans):
        assert p.info["phi"] == pytest.approx(remaining / (2 * (6 - i)))
        remaining -= sum(p.budgets)
    # the budget actually moves between layers (not uniform), so the test has teeth
    assert len({tuple(p.budgets) for p in plans}) > 1


def test_madakv_text_only_prompt() -> None:
    codes = [TEXT] * 40
    ctxs = mada_contexts(seed=2, capacity=10, codes=codes)
    plans = MadaKV(window=4).plan(ctxs)
    plan_matches(plans, ref_madakv(ctxs, window=4))
    for p in plans:
        assert p.info["preference"] == [0.0, 0.0] and p.info["visual_budget"] == [0, 0]


def test_madakv_keeps_all_when_capacity_covers_the_prompt() -> None:
    ctxs = mada_contexts(seed=1, capacity=48)
    assert all(k.tolist() == list(range(48)) for p in MadaKV().plan(ctxs) for k in p.kept)


def test_madakv_rejects_bad_parameters() -> None:
    for bad in ({"hcc": "C"}, {"theta": 0.0}, {"window": 0}, {"max_ratio": 0.5}):
        with pytest.raises(ValueError):
            MadaKV(**bad)


# ---- HybridKV: decisions ----------------------------------------------------------------------


def hybrid_contexts(seed, capacity, n_layers=3, codes=CODES, h_q=4, h_kv=2, sparse=((0, 0), (1, 1), (2, 0))):
    """Question attention: heads in ``sparse`` look at 3 keys (two of them visual); the others are diffuse."""
    g = torch.Generator().manual_seed(seed)
    L = len(codes)
    group = h_q // h_kv
    ctxs = []
    for layer in range(n_layers):
        s = dyadic(g, h_q, L, high=1024) + 0.5
        for h in range(h_kv):
            if (layer, h) in sparse:
                s[h * group : (h + 1) * group] = dyadic(g, group, L, high=4)
                s[h * group : (h + 1) * group, [3, 10 + layer, 20]] += 8.0
        stats = LayerStats(question_scores=s, question_queries=12)
        ctxs.append(LayerContext(layer, n_layers, h_kv, h_q, L, capacity, modality_map(codes), stats))
    return ctxs


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"chunk_size": 4, "sinks": 2, "recent": 4},
        {"chunk_size": 3, "tau": 0.5, "r": 0.3, "recent": 5},
        {"static_fraction": 0.0, "chunk_size": 5},
        {"static_fraction": 1.0},
        {"chunk_size": 4, "recent": 2, "r": 0.8},
    ],
)
@pytest.mark.parametrize("capacity", [8, 20, 48])
def test_hybridkv_equals_naive_reference(params: dict, capacity: int) -> None:
    ctxs = hybrid_contexts(seed=capacity, capacity=capacity)
    plans = HybridKV(**params).plan(ctxs)
    ref = ref_hybridkv(
        ctxs, **{k: v for k, v in params.items() if k != "chunk_size"}, chunk=params.get("chunk_size", 16)
    )
    for i, (plan, want) in enumerate(zip(plans, ref)):
        assert [k.tolist() for k in plan.kept] == want["kept"], f"layer {i}"
        assert plan.info["head_types"] == want["types"], f"layer {i}"
        assert plan.info["head_budgets"] == want["head_budgets"], f"layer {i}"
        assert plan.info["sparsity"] == pytest.approx(want["sparsity"])
        if "dynamic" in want["types"]:
            lay = want["layout"]
            d = plan.decode
            assert d["policy"] == "hybrid" and d["head_types"] == want["types"]
            assert (d["sinks"], d["recent"], d["top_chunks"]) == (lay["sinks"], lay["recent"], lay["top_chunks"])
            assert d["initial_chunks"] == want["initial"]
        else:
            assert plan.decode is None
    total = sum(sum(p.info["head_budgets"]) for p in plans)
    assert total <= capacity * 2 * 3
    assert sum(k.numel() for p in plans for k in p.kept) <= capacity * 2 * 3


def test_hybridkv_planted_heads() -> None:
    ctxs = hybrid_contexts(seed=0, capacity=20)
    plans = HybridKV(static_fraction=0.5).plan(ctxs)
    types = [p.info["head_types"] for p in plans]
    assert types == [["static", "dynamic"], ["dynamic", "static"], ["static", "dynamic"]]
    # a sparse (static) head has the larger sparsity score
    assert plans[0].info["sparsity"][0] > plans[0].info["sparsity"][1]
    # text prior: with a budget above the text count, a static head keeps every text token
    text = [j for j, c in enumerate(CODES) if c == TEXT]
    plans = HybridKV(static_fraction=0.5, recent=4).plan(hybrid_contexts(seed=0, capacity=40))
    kept = plans[0].kept[0].tolist()
    assert plans[0].info["head_budgets"][0] > len(text) and set(text) <= set(kept)
    assert {3, 10, 20} <= set(kept)  # ... and its most attended visual tokens
    # with tau, classification follows the threshold
    plans = HybridKV(tau=0.9).plan(hybrid_contexts(seed=0, capacity=20))
    assert [p.info["head_types"] for p in plans] == types


def test_hybridkv_text_only_prompt() -> None:
    codes = [TEXT] * 40
    ctxs = hybrid_contexts(seed=4, capacity=12, codes=codes)
    plans = HybridKV(chunk_size=4, recent=4).plan(ctxs)
    for plan, want in zip(plans, ref_hybridkv(ctxs, chunk=4, recent=4)):
        assert [k.tolist() for k in plan.kept] == want["kept"]


# ---- HybridLayer: retrieval, attention, bytes --------------------------------------------------


def _layer(length=64, d=8, scoring="mean", top_chunks=2, offload=True, chunk=4, sinks=2, recent=6, plant=None, seed=0):
    """KV head 0 static (keeps every third position), KV head 1 dynamic; 2 query heads per KV head."""
    from mmkv.cache.hybrid import build_hybrid_layer

    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, length, d, generator=g) * 0.1
    values = torch.randn(1, 2, length, d, generator=g)
    if plant is not None:
        chunk_id, direction = plant
        start = sinks + chunk_id * chunk
        keys[0, 1, start : min(start + chunk, length - recent)] += 3.0 * direction
    static_kept = torch.arange(0, length, 3)
    plan = LayerPlan(
        kept=[static_kept, torch.arange(length)],
        decode={
            "policy": "hybrid",
            "head_types": ["static", "dynamic"],
            "sinks": sinks,
            "recent": recent,
            "chunk_size": chunk,
            "top_chunks": top_chunks,
            "scoring": scoring,
            "offload": offload,
            "initial_chunks": [list(range(top_chunks))],
        },
    )
    return build_hybrid_layer(keys, values, plan), keys, values, plan


def _naive_attention(query, keys, values, positions_per_kv_head, scale):
    """softmax(q k^T) v over explicit key sets; query [1, H_q, 1, d] -> [1, 1, H_q, d]."""
    h_q = query.shape[1]
    group = h_q // len(positions_per_kv_head)
    outs = []
    for hq in range(h_q):
        k = keys[hq // group][positions_per_kv_head[hq // group]]
        v = values[hq // group][positions_per_kv_head[hq // group]]
        p = torch.softmax((query[0, hq, 0] @ k.T) * scale, -1)
        outs.append(p @ v)
    return torch.stack(outs)[None, None]


@pytest.mark.parametrize("scoring", ["mean", "bounds"])
def test_hybrid_layer_retrieves_the_planted_chunk_and_attends_over_the_union(scoring: str) -> None:
    d = 8
    direction = torch.zeros(d)
    direction[3] = 1.0
    layer, keys, values, _ = _layer(scoring=scoring, plant=(9, direction))
    assert layer.chunk_starts.numel() == 14 and layer.top_chunks == 2
    for step in range(3):
        query = torch.randn(1, 4, 1, d) * 0.05
        query[0, 3, 0] += 4.0 * direction  # one query head of the dynamic group points at chunk 9,
        query[0, 2, 0] -= 4.0 * direction  # the other away from it: the group score is a max, not a mean
        new_k, new_v = torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d)
        tail_k, tail_v = layer.update(new_k, new_v)
        out = layer.attend(None, query, tail_k, tail_v, scaling=d**-0.5)
        chunks = layer.retrievals[-1][0]
        assert 9 in chunks and len(chunks) == 2 and len(layer.retrievals) == step + 1
        # naive reference over fixed ∪ retrieved ∪ generated tokens (full tensors + tail appended)
        all_k = torch.cat([keys[0], tail_k[0]], dim=1)
        all_v = torch.cat([values[0], tail_v[0]], dim=1)
        L = 64
        tail_pos = list(range(L, L + step + 1))
        dyn = (
            list(range(2))
            + [p for c in chunks for p in range(2 + 4 * c, 2 + 4 * c + 4)]
            + list(range(L - 6, L))
            + tail_pos
        )
        static = list(range(0, L, 3)) + tail_pos
        want = _naive_attention(query, all_k, all_v, [torch.tensor(static), torch.tensor(sorted(dyn))], d**-0.5)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        assert layer.kept_positions()[1].tolist() == sorted(dyn)


def test_hybrid_layer_partial_chunk_is_masked() -> None:
    d = 8
    direction = torch.zeros(d)
    direction[0] = 1.0
    # L = 63: middle span [2, 57) = 55 tokens -> 14 chunks, the last one 3 tokens long
    layer, keys, values, _ = _layer(length=63, plant=(13, direction), top_chunks=1)
    assert layer.chunk_lengths.tolist()[-1] == 3
    query = torch.zeros(1, 4, 1, d)
    query[0, 2:, 0] = 5.0 * direction
    tail_k, tail_v = layer.update(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d))
    out = layer.attend(None, query, tail_k, tail_v, scaling=d**-0.5)
    assert layer.retrievals[-1] == [[13]]
    dyn = [0, 1] + [54, 55, 56] + list(range(57, 63)) + [63]
    all_k = torch.cat([keys[0], tail_k[0]], dim=1)
    all_v = torch.cat([values[0], tail_v[0]], dim=1)
    want = _naive_attention(
        query, all_k, all_v, [torch.tensor(list(range(0, 63, 3)) + [63]), torch.tensor(dyn)], d**-0.5
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert layer.kept_positions()[1].tolist() == dyn


@pytest.mark.parametrize("scoring", ["mean", "bounds"])
def test_hybrid_layer_bytes(scoring: str) -> None:
    d, L = 8, 64
    layer, keys, _, _ = _layer(scoring=scoring)
    per_token = 2 * d * keys.element_size()
    n_chunks, k, c = 14, 2, 4
    summaries = n_chunks * d * keys.element_size() * (1 if scoring == "mean" else 2)
    static_tokens = len(range(0, L, 3))
    fixed = 2 + 6
    assert layer.summary_bytes() == summaries
    assert layer.physical_bytes() == (static_tokens + fixed + k * c) * per_token + summaries
    assert layer.host_bytes() == L * per_token  # the full prompt KV of the one dynamic head
    assert layer.physical_bytes() - static_tokens * per_token < L * per_token  # not the full KV on the device
    layer.update(torch.randn(1, 2, 3, d), torch.randn(1, 2, 3, d))
    assert layer.physical_bytes() == (static_tokens + fixed + k * c + 2 * 3) * per_token + summaries
    # no offload: the store lives on the device and counts there
    kept, *_ = _layer(scoring=scoring, offload=False)
    assert kept.host_bytes() == 0
    assert kept.physical_bytes() == (static_tokens + fixed + k * c + L) * per_token + summaries


# ---- end to end on tiny models ----------------------------------------------------------------


def _check_trace(trace, n_generated: int) -> None:
    per_token = trace.bytes_per_token_head
    H, N, cap = trace.num_kv_heads, trace.num_layers, trace.capacity
    assert len(trace.layers) == N
    assert trace.kept_tokens <= cap * H * N
    for layer in trace.layers:
        for kept in layer.kept:
            assert kept == sorted(set(kept)) and all(0 <= p < trace.span_length for p in kept)
        # device bytes = kept tokens + device overhead (HybridKV chunk summaries and unused buffer slots)
        assert layer.bytes_after == sum(layer.budgets) * per_token + layer.info.get("overhead_bytes", 0)
    assert trace.bytes_compressed < trace.bytes_full
    assert trace.bytes_end == trace.bytes_compressed + n_generated * N * H * per_token
    assert mmkv.Trace.from_json(trace.to_json()).to_dict() == trace.to_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_every_family(family: str, tiny_prepared) -> None:
    model, processor, prepared = tiny_prepared(family)
    for method, params in (
        ("madakv", {}),
        ("madakv", {"window": 4, "hcc": "A"}),
        ("hybridkv", {}),
        ("hybridkv", {"chunk_size": 4, "sinks": 2, "scoring": "bounds"}),
    ):
        result = mmkv.generate(
            model, processor, None, method=method, budget=0.2, max_new_tokens=3, prepared=prepared, **params
        )
        assert len(result.token_ids) >= 1
        _check_trace(result.trace, len(result.token_ids) - 1)
        if method == "hybridkv" and params:
            layers = result.trace.layers
            assert any("dynamic" in l.info["head_types"] and l.info["top_chunks"] >= 1 for l in layers), family


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "smolvlm"])
def test_madakv_plan_equals_masked_full_cache(family: str, tiny_prepared) -> None:
    model, _, prepared = tiny_prepared(family)
    tokens = [11, 4, 6]
    got, session, _ = oracle.compressed_logits(model, prepared, MadaKV(window=4), tokens, budget=0.3)
    kept = {layer.layer: [torch.tensor(k) for k in layer.kept] for layer in session.trace.layers}
    assert any(len(k) < prepared.length for ks in kept.values() for k in ks)
    want = masked_reference_logits(model, prepared.inputs, kept, tokens)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_hybridkv_all_chunks_equals_full_cache(family: str, tiny_prepared) -> None:
    model, _, prepared = tiny_prepared(family)
    tokens = [5, 9, 13, 7]
    oracle._reset_rope(model)
    want = masked_reference_logits(model, prepared.inputs, {}, tokens)  # nothing masked = plain full cache
    method = HybridKV(static_fraction=0.5, chunk_size=4, recent=8)
    got, session, _ = oracle.compressed_logits(model, prepared, method, tokens, budget=1.0)
    from mmkv.cache.hybrid import HybridLayer

    layers = [l for l in session.cache.layers if isinstance(l, HybridLayer)]
    assert layers and all(len(l.retrievals) == len(tokens) for l in layers)
    for l in layers:
        n = l.chunk_starts.numel()
        assert (
            n > 1
            and l.top_chunks == n
            and all(step == [list(range(n))] * len(l.dynamic_heads) for step in l.retrievals)
        )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _per_step_reference(model, inputs, masks_per_step, tokens):
    """Like oracle.masked_reference_logits, with a different eviction mask before each decode step."""
    from transformers import DynamicCache

    length = inputs["input_ids"].shape[1]
    oracle._reset_rope(model)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with oracle._attention(model, oracle.REFERENCE_ATTENTION), torch.inference_mode():
        oracle._EVICTED.clear()
        out = model(**inputs, **cache_kwargs(model, cache), use_cache=True)
        logits = [out.logits[0, -1].float()]
        for step, t in enumerate(tokens):
            oracle._EVICTED.clear()
            for layer, heads in masks_per_step[step].items():
                evicted = []
                for kept in heads:
                    e = torch.ones(length, dtype=torch.bool)
                    e[torch.as_tensor(kept, dtype=torch.long)] = False
                    evicted.append(e)
                oracle._EVICTED[layer] = evicted
            out = model(input_ids=torch.tensor([[t]]), **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[0, -1].float())
    oracle._EVICTED.clear()
    return logits


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_hybridkv_retrieval_equals_per_step_masked_full_cache(family: str, tiny_prepared) -> None:
    """Every decode step attends to exactly sinks ∪ retrieved chunks ∪ recent (dynamic) / the pruned set (static)."""
    from mmkv.cache.hybrid import HybridLayer

    model, _, prepared = tiny_prepared(family)
    tokens = [5, 9, 13, 7]
    method = HybridKV(static_fraction=0.5, chunk_size=4, sinks=2, recent=4)
    got, session, _ = oracle.compressed_logits(model, prepared, method, tokens, budget=0.5)
    masks, complement = [], []
    retrieving = 0
    for step in range(len(tokens)):
        per_layer, other = {}, {}
        for trace_layer in session.trace.layers:
            layer = session.cache.layers[trace_layer.layer]
            heads, heads_other = [], []
            for h, kept in enumerate(trace_layer.kept):
                if isinstance(layer, HybridLayer) and h in layer.dynamic_heads:
                    j = layer.dynamic_heads.index(h)
                    chunks = layer.retrievals[step][j]
                    fixed = layer.fixed_positions.tolist()
                    starts, lens = layer.chunk_starts.tolist(), layer.chunk_lengths.tolist()
                    pos = [p for c in chunks for p in range(starts[c], starts[c] + lens[c])]
                    rest = [c for c in range(len(starts)) if c not in chunks][: len(chunks)]
                    heads.append(sorted(fixed + pos))
                    heads_other.append(sorted(fixed + [p for c in rest for p in range(starts[c], starts[c] + lens[c])]))
                    retrieving += 0 < len(chunks) < len(starts)
                else:
                    heads.append(kept)
                    heads_other.append(kept)
            per_layer[trace_layer.layer], other[trace_layer.layer] = heads, heads_other
        masks.append(per_layer)
        complement.append(other)
    assert retrieving > 0  # some dynamic head really chose among chunks
    want = _per_step_reference(model, prepared.inputs, masks, tokens)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"step {step}")
    # negative control: other chunks give other logits, so the comparison has teeth
    wrong = _per_step_reference(model, prepared.inputs, complement, tokens)
    assert max((a - b).abs().max().item() for a, b in zip(got[1:], wrong[1:])) > 1e-4
