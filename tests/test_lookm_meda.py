"""LOOK-M, MEDA and their merge math against hand computations, naive references and the eviction oracle.

The references below are written from the formulas of docs/methods.md, LOOK-M and MEDA (and the docstrings of
mmkv/methods/lookm.py, meda.py, merge.py for the documented readings) with plain Python loops; none
of them calls mmkv.methods code:

- text prior, paper Eq. 5 literally: ``s[T] += max(s)``; ``keep = T ∪ Top_N(s[:L-M]) ∪ last M``
  (ties: earlier position), with ``M = floor(share * S)`` and ``N = S - M``;
- merges, Eq. 10-12, cosine on keys, first maximum on ties, the keys' assignment reused for values;
- MEDA layer budgets: ``w = softmax(E)``, ``x_l = clip(lam * w_l, lo, hi)`` with ``sum x = N_L * C``
  found by bisection, then the largest remainder.
"""

from __future__ import annotations

import math

import pytest
import torch

import mmkv
from mmkv.inputs.modality import IMAGE, ModalityMap, grid_item
from mmkv.methods import MEDA, LookM, make_method
from mmkv.methods.base import LayerContext
from mmkv.methods.meda import layer_budgets
from mmkv.methods.merge import merge_head, merge_layer
from mmkv.statistics.stats import StatsRequest, compute_layer_stats
from mmkv.testing.tiny import FAMILIES, build_tiny, make_image
from oracle import compressed_logits, masked_reference_logits

torch.set_num_threads(2)

H_Q, H_KV, D = 4, 2, 8

# ---- naive references -----------------------------------------------------------------------


def ref_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().tolist(), b.double().tolist()
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / max(na, 1e-12) / max(nb, 1e-12)


def ref_merge(keys, values, kept: list[int], mode: str, merge_only: set[int] | None = None):
    """Eq. 10/11/12 for one head, loop by loop. Returns new kept keys, values (float64) and (src, dst, sim)."""
    length = keys.shape[0]
    evicted = [i for i in range(length) if i not in kept]
    groups: dict[int, list[tuple[int, float]]] = {j: [] for j in kept}
    record = []
    for i in evicted:
        sims = [ref_cos(keys[i], keys[j]) for j in kept]
        best = max(range(len(kept)), key=lambda t: (sims[t], -t))  # first maximum
        if merge_only is not None and i not in merge_only:
            continue
        groups[kept[best]].append((i, sims[best]))
        record.append((i, kept[best], sims[best]))
    out = []
    for x in (keys.double(), values.double()):
        rows = []
        for j in kept:
            members = groups[j]
            total = x[j].clone()
            for i, s in members:
                if mode == "average":
                    total += x[i]
                elif mode == "pivotal":
                    total += 0.5 * (x[i] + x[j])
                else:
                    total += s * x[i]
            rows.append(total / (len(members) + 1))
        out.append(torch.stack(rows))
    return out[0], out[1], record


def ref_text_prior(col_q: torch.Tensor, text: list[bool], budget: int, share: float) -> list[list[int]]:
    """Per KV head: GQA mean, paper Eq. 5 literally, Top-N of s[:L-M] + text + last M."""
    h_q, length = col_q.shape
    group = h_q // H_KV
    recent = int(math.floor(share * budget + 1e-9))
    important = budget - recent
    kept = []
    for h in range(H_KV):
        s = [sum(float(col_q[h * group + g, j]) for g in range(group)) / group for j in range(length)]
        top = max(s)
        s = [v + top if text[j] else v for j, v in enumerate(s)]
        head = list(range(length - recent))
        chosen = sorted(head, key=lambda j: (-s[j], j))[:important]
        keep = {j for j in range(length) if text[j]} | set(chosen) | set(range(length - recent, length))
        kept.append(sorted(keep))
    return kept


def ref_layer_budgets(entropies, capacity: int, length: int, clamp=(0.01, 1.0)) -> list[int]:
    n = len(entropies)
    m = max(entropies)
    w = [math.exp(e - m) for e in entropies]
    w = [x / sum(w) for x in w]
    total = n * capacity
    lo = math.ceil(clamp[0] * length) if clamp else 0
    hi = math.floor(clamp[1] * length) if clamp else length
    lo, hi = min(lo, total // n), max(hi, -(-total // n))
    a, b = 0.0, hi / min(w) + 1.0
    for _ in range(200):
        lam = (a + b) / 2
        if sum(min(hi, max(lo, lam * x)) for x in w) < total:
            a = lam
        else:
            b = lam
    x = [min(hi, max(lo, b * v)) for v in w]
    out = [int(math.floor(v + 1e-7)) for v in x]
    for i in sorted(range(n), key=lambda i: (-(x[i] - out[i]), i))[: total - sum(out)]:
        out[i] += 1
    return out


def naive_cross_entropy(q, k, codes: list[int], scale: float) -> float:
    """MEDA Eq. 5-6 on the head-averaged distribution, causal: E_TV + E_VT (positive, nats)."""
    group = H_Q // H_KV

    def part(queries, keys) -> float:
        rows = []
        for i in queries:
            visible = [j for j in keys if j <= i]
            if not visible:
                continue
            avg = [0.0] * len(visible)
            for h in range(H_Q):
                logits = [float(q[0, h, i].double() @ k[0, h // group, j].double()) * scale for j in visible]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                for t, x in enumerate(e):
                    avg[t] += x / sum(e) / H_Q
            rows.append(-sum(p * math.log(p) for p in avg if p > 0))
        return sum(rows) / len(rows) if rows else 0.0

    text = [i for i, c in enumerate(codes) if c == 0]
    visual = [i for i, c in enumerate(codes) if c != 0]
    return part(text, visual) + part(visual, text)


# ---- merge math by hand ---------------------------------------------------------------------

# Kept positions 0, 3, 5; evicted 1, 2 (cos 0.8 and 1.0 with k0) and 4 (cos 0.8 with k3).
# v4 = (4, 0) is closer to v0 than to v3 in value space, but the keys send it to 3.
KEYS = torch.tensor([[1.0, 0.0], [4.0, 3.0], [2.0, 0.0], [0.0, 1.0], [3.0, 4.0], [-1.0, -1.0]])
VALUES = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 4.0], [0.0, 8.0], [4.0, 0.0], [7.0, 7.0]])
KEPT = torch.tensor([0, 3, 5])
BY_HAND = {  # rows: new k0, k3, k5 / v0, v3, v5
    "average": ([[7 / 3, 1.0], [1.5, 2.5], [-1.0, -1.0]], [[1.0, 5 / 3], [2.0, 4.0], [7.0, 7.0]]),
    "pivotal": ([[5 / 3, 0.5], [0.75, 1.75], [-1.0, -1.0]], [[1.0, 4 / 3], [1.0, 6.0], [7.0, 7.0]]),
    "weighted": ([[6.2 / 3, 0.8], [1.2, 2.1], [-1.0, -1.0]], [[2.6 / 3, 5 / 3], [1.6, 4.0], [7.0, 7.0]]),
}


@pytest.mark.parametrize("mode", ["average", "pivotal", "weighted"])
def test_merge_equations_by_hand(mode: str) -> None:
    keys, values, record = merge_head(KEYS, VALUES, KEPT, mode)
    want_k, want_v = BY_HAND[mode]
    torch.testing.assert_close(keys, torch.tensor(want_k), atol=1e-6, rtol=0)
    torch.testing.assert_close(values, torch.tensor(want_v), atol=1e-6, rtol=0)
    assert torch.equal(keys[2], KEYS[5]) and torch.equal(values[2], VALUES[5])  # untouched: bit-identical
    assert record.source.tolist() == [1, 2, 4] and record.target.tolist() == [0, 0, 3]
    assert record.similarity.tolist() == pytest.approx([0.8, 1.0, 0.8], abs=1e-6)
    # the naive loop reference agrees
    rk, rv, rrec = ref_merge(KEYS, VALUES, KEPT.tolist(), mode)
    torch.testing.assert_close(keys.double(), rk, atol=1e-6, rtol=0)
    torch.testing.assert_close(values.double(), rv, atol=1e-6, rtol=0)
    assert [(s, t) for s, t, _ in rrec] == [(1, 0), (2, 0), (4, 3)]


def test_merge_is_fp32_and_cast_back() -> None:
    keys, values, _ = merge_head(KEYS.bfloat16(), VALUES.bfloat16(), KEPT, "average")
    assert keys.dtype == values.dtype == torch.bfloat16
    want_k = torch.tensor(BY_HAND["average"][0]).bfloat16()
    assert torch.equal(keys, want_k)


def test_merge_filter_is_slotwise_head_mean_and_only_for_avg_weighted() -> None:
    # Two heads, same kept set {0, 3}; evicted slots 1, 2, 4 with max-cos per head:
    k1 = KEYS.clone()
    k1[2] = torch.tensor([3.0, 4.0])  # cos 0.6 with k0 and 0.8 with k3 -> goes to 3, max 0.8
    k1[4] = torch.tensor([0.0, 2.0])  # cos 1.0 with k3
    keys = torch.stack([KEYS, k1])
    values = torch.stack([VALUES, VALUES])
    kept = [torch.tensor([0, 3]), torch.tensor([0, 3])]
    # max-cos of the evicted slots (positions 1, 2, 4, 5): head 0 = 0.8, 1.0, 0.8, -0.7071 ; head 1 = 0.8, 0.8, 1.0, -0.7071
    # slot means 0.8, 0.9, 0.9, -0.7071 ; global mean 0.475 -> slot of position 5 is dropped
    new_k, new_v, records, dropped = merge_layer(keys, values, kept, "average", similarity_filter=True)
    assert dropped == 2
    for h in range(2):
        assert records[h].source.tolist() == [1, 2, 4]
        rk, rv, _ = ref_merge(keys[h], values[h], [0, 3], "average", merge_only={1, 2, 4})
        torch.testing.assert_close(new_k[h].double(), rk, atol=1e-6, rtol=0)
        torch.testing.assert_close(new_v[h].double(), rv, atol=1e-6, rtol=0)
    # without the filter position 5 is merged too (into 0: cos(-1,-1 ; 1,0) = -0.707 = cos with k3; first max)
    _, _, records, dropped = merge_layer(keys, values, kept, "average")
    assert dropped == 0 and records[0].source.tolist() == [1, 2, 4, 5] and records[0].target.tolist()[-1] == 0
    with pytest.raises(ValueError, match="similarity_filter"):
        merge_layer(keys, values, kept, "pivotal", similarity_filter=True)
    with pytest.raises(ValueError, match="similarity_filter"):
        LookM(merge="pivotal", similarity_filter=True)


# ---- LOOK-M on planted synthetic attention ---------------------------------------------------

# 0-5 text, 6-11 image A, 12-17 image B, 18-23 question text.
CODES = [0] * 6 + [1] * 12 + [0] * 6


def _modality(codes: list[int]) -> ModalityMap:
    items, cells, start = [], [], None
    for i, c in enumerate(codes + [0]):
        if c and start is None:
            start = i
        if not c and start is not None:
            it, cell = grid_item(IMAGE, len(items), 0, 2, (i - start) // 2, start)
            items.append(it)
            cells.append(cell)
            start = None
    return ModalityMap.from_items(len(codes), items, cells)


def _planted_qkv(seed: int, aligned: tuple[range, range], strength: float = 4.0):
    """q/k/v where the question queries of KV-head group h point at the keys of image ``aligned[h]``.

    Every query also looks at token 0 (an attention sink, as in real models), so the attention that
    unplanted queries spread over earlier tokens stays small next to the planted one.
    """
    g = torch.Generator().manual_seed(seed)
    L = len(CODES)
    q = torch.randn(1, H_Q, L, D, generator=g) * 0.3
    k = torch.randn(1, H_KV, L, D, generator=g) * 0.3
    v = torch.randn(1, H_KV, L, D, generator=g)
    q[..., D - 1] += 3.0
    k[:, :, 0, D - 1] += 3.0
    group = H_Q // H_KV
    for h, image in enumerate(aligned):
        direction = torch.zeros(D)
        direction[h] = 1.0
        for j in image:
            k[0, h, j] += strength * direction * (1 + 0.05 * (j % 3))  # distinct scores inside the image
        for i in range(18, 24):
            q[0, h * group : (h + 1) * group, i] += strength * direction
    return q, k, v


def _context(
    q, k, v, capacity: int, request: StatsRequest, codes=CODES, layer: int = 0, layers: int = 1
) -> LayerContext:
    stats = compute_layer_stats(q, k, torch.tensor(codes, dtype=torch.int8), request, D**-0.5)
    return LayerContext(
        layer=layer,
        num_layers=layers,
        num_kv_heads=H_KV,
        num_q_heads=H_Q,
        length=len(codes),
        capacity=capacity,
        modality=_modality(codes),
        stats=stats,
        keys=k[0],
        values=v[0],
    )


A, B = range(6, 12), range(12, 18)


@pytest.mark.parametrize("merge", ["pivotal", "average", "weighted", "none"])
def test_lookm_keeps_the_image_the_question_looks_at_and_matches_reference(merge: str) -> None:
    q, k, v = _planted_qkv(0, (B, A))  # KV head 0's queries look at image B, head 1's at image A
    # capacity 18, recent share 0.25: M = 4 (20-23), N = 14 = 8 non-recent text + 6 visual slots
    method = LookM(recent_share=0.25, merge=merge)
    ctx = _context(q, k, v, 18, method.stats_request())
    plan = method.plan_layer(ctx)
    text = [c == 0 for c in CODES]
    want = ref_text_prior(ctx.stats.column_sums, text, 18, 0.25)
    assert [p.tolist() for p in plan.kept] == want
    assert [j for j in want[0] if not text[j]] == list(B) and [j for j in want[1] if not text[j]] == list(A)
    assert plan.info["retained"] == 18 and plan.info["nominal"] == 18 and plan.info["visual_kept"] == [6, 6]
    if merge == "none":
        assert plan.keys is None and plan.values is None and plan.merges is None
        return
    for h in range(H_KV):
        rk, rv, rec = ref_merge(k[0, h], v[0, h], want[h], merge)
        torch.testing.assert_close(plan.keys[h].double(), rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plan.values[h].double(), rv, atol=1e-5, rtol=1e-5)
        assert list(zip(plan.merges[h].source.tolist(), plan.merges[h].target.tolist())) == [(s, t) for s, t, _ in rec]
    assert plan.info["merged"] == [6, 6]


def test_lookm_long_text_exceeds_the_nominal_budget_and_short_prompts_are_kept() -> None:
    q, k, v = _planted_qkv(1, (B, A))
    method = LookM()
    # capacity 6: M = 3, N = 3 < 9 non-recent text tokens -> every text token + no visual token
    plan = method.plan_layer(_context(q, k, v, 6, method.stats_request()))
    assert plan.info["nominal"] == 6 and plan.info["retained"] == 12
    assert all(p.tolist() == list(range(6)) + list(range(18, 24)) for p in plan.kept)
    # L <= N + M: nothing to compress
    plan = method.plan_layer(_context(q, k, v, 24, method.stats_request()))
    assert all(p.tolist() == list(range(24)) for p in plan.kept) and plan.merges is None


def test_lookm_text_only_prompt_keeps_all_or_falls_back_to_h2o() -> None:
    codes = [0] * 24
    q, k, v = _planted_qkv(2, (B, A))
    plan = LookM().plan_layer(_context(q, k, v, 8, StatsRequest(column_sums=True), codes=codes))
    assert all(p.numel() == 24 for p in plan.kept) and "skipped" in plan.info
    plan = LookM(text_only="h2o", merge="none").plan_layer(
        _context(q, k, v, 8, StatsRequest(column_sums=True), codes=codes)
    )
    ctx = _context(q, k, v, 8, StatsRequest(column_sums=True), codes=codes)
    col = ctx.stats.column_sums
    for h in range(H_KV):  # M = 4 recent (20-23), N = 4 = the 4 sinks (the code forces tokens 0-3 in)
        assert plan.kept[h].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    plan = LookM(text_only="h2o", merge="none").plan_layer(
        _context(q, k, v, 12, StatsRequest(column_sums=True), codes=codes)
    )
    for h in range(H_KV):  # M = 6 (18-23), N = 6: sinks 0-3 + the 2 best of 4..17
        s = [sum(float(col[2 * h + g, j]) for g in range(2)) / 2 for j in range(18)]
        best = sorted(range(4, 18), key=lambda j: (-s[j], j))[:2]
        assert plan.kept[h].tolist() == sorted([0, 1, 2, 3, *best, *range(18, 24)])


# ---- MEDA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entropies, capacity, length",
    [
        ([1.0, 2.0, 3.0], 20, 100),
        ([0.0, 0.0, 9.0, 0.0], 30, 40),  # layer 2 wants > L: capped at L, the rest redistributed
        ([-5.0, 0.0, 0.0], 10, 200),  # layer 0 under the 1 % floor (2 tokens): lifted, others pay
        ([0.3, 0.1, 0.2, 0.9, 0.5], 7, 50),
    ],
)
def test_meda_layer_budgets_sum_to_total_and_match_reference(entropies, capacity, length) -> None:
    weights, budgets = layer_budgets(entropies, [capacity] * len(entropies), length)
    assert sum(budgets) == capacity * len(entropies)
    assert budgets == ref_layer_budgets(entropies, capacity, length)
    assert all(math.ceil(0.01 * length) <= b <= length for b in budgets)
    assert sum(weights) == pytest.approx(1.0)
    # higher entropy never gets less
    n = len(entropies)
    assert all(budgets[i] >= budgets[j] for i in range(n) for j in range(n) if entropies[i] > entropies[j])


def test_meda_budget_options() -> None:
    e = [0.0, 0.0, 9.0, 0.0]
    _, free = layer_budgets(e, [30] * 4, 40, clamp=None)
    assert free == ref_layer_budgets(e, 30, 40, clamp=None) and sum(free) == 120 and max(free) == 40
    # code-faithful: clamp without redistribution -> floor(clip(w * T)), the sum falls short
    w = [math.exp(x - 9) for x in e]
    w = [x / sum(w) for x in w]
    _, code = layer_budgets(e, [30] * 4, 40, redistribute=False)
    assert code == [math.floor(min(40, max(1, x * 120))) for x in w] and sum(code) < 120
    # a floor the total cannot pay for is relaxed: every layer gets the average
    _, low = layer_budgets([0.0, 5.0], [1, 1], 400, clamp=(0.5, 1.0))
    assert low == [1, 1]


def _meda_layers(seed: int = 3):
    """Three layers; layer 1's queries are zero so its cross-modal attention is uniform (max entropy)."""
    layers = []
    for layer in range(3):
        q, k, v = _planted_qkv(seed + layer, (B, A), strength=4.0)
        if layer == 1:
            q = torch.zeros_like(q)
        layers.append((q, k, v))
    return layers


@pytest.mark.parametrize("merge", ["average", "none"])
def test_meda_gives_the_high_entropy_layer_more_and_matches_reference(merge: str) -> None:
    method = MEDA(merge=merge)
    capacity = 12
    contexts = [
        _context(q, k, v, capacity, method.stats_request(), layer=i, layers=3)
        for i, (q, k, v) in enumerate(_meda_layers())
    ]
    plans = method.plan(contexts)
    entropies = [naive_cross_entropy(q, k, CODES, D**-0.5) for q, k, _ in _meda_layers()]
    for plan, e in zip(plans, entropies):
        assert plan.info["entropy"] == pytest.approx(e, abs=1e-4)
    budgets = [p.info["layer_budget"] for p in plans]
    assert budgets == ref_layer_budgets(entropies, capacity, 24)
    assert sum(budgets) == 3 * capacity and budgets[1] == max(budgets) and budgets[1] > capacity
    assert [p.info["layer_ratio"] for p in plans] == [b / 24 for b in budgets]
    text = [c == 0 for c in CODES]
    for (_q, k, v), ctx, plan, budget in zip(_meda_layers(), contexts, plans, budgets):
        want = ref_text_prior(ctx.stats.column_sums, text, budget, 0.75)  # split 3:1
        assert [p.tolist() for p in plan.kept] == want
        assert all(all(j in p for j in range(24) if text[j]) for p in want)
        if merge == "none":
            assert plan.merges is None
            continue
        for h in range(H_KV):
            rk, rv, _ = ref_merge(k[0, h], v[0, h], want[h], "average")
            torch.testing.assert_close(plan.keys[h].double(), rk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(plan.values[h].double(), rv, atol=1e-5, rtol=1e-5)


def test_meda_options_and_text_only_prompt() -> None:
    full = MEDA(entropy="full")
    assert full.stats_request() == StatsRequest(column_sums=True, full_entropy=True)
    assert MEDA(cross_mask="full").stats_request().cross_modal == "full"
    contexts = [
        _context(q, k, v, 12, full.stats_request(), layer=i, layers=3) for i, (q, k, v) in enumerate(_meda_layers())
    ]
    plans = full.plan(contexts)
    for ctx, plan in zip(contexts, plans):
        assert plan.info["entropy"] == pytest.approx(float(ctx.stats.full_entropy.mean()))
    assert sum(p.info["layer_budget"] for p in plans) == 36
    assert MEDA(split=(1, 1)).recent_share == 0.5
    for bad in ({"split": (1,)}, {"clamp": (0.5, 0.1)}, {"entropy": "x"}, {"merge": "max"}):
        with pytest.raises(ValueError):
            MEDA(**bad)
    # text only: zero cross-modal entropy everywhere -> uniform budgets; the text prior keeps everything
    codes = [0] * 24
    method = MEDA()
    contexts = [
        _context(q, k, v, 12, method.stats_request(), codes=codes, layer=i, layers=3)
        for i, (q, k, v) in enumerate(_meda_layers())
    ]
    plans = method.plan(contexts)
    assert [p.info["layer_budget"] for p in plans] == [12, 12, 12]
    assert all(k.numel() == 24 for p in plans for k in p.kept)


# ---- end to end on tiny models ----------------------------------------------------------------


def _chat(n_images: int = 2, question: str = "which image has the red circle ?"):
    content = [{"type": "image", "image": make_image(i, 64)} for i in range(n_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


_PREPARED: dict[str, tuple] = {}


def _prepared(family: str):
    if family not in _PREPARED:
        model, processor = build_tiny(family)
        _PREPARED[family] = (model, processor, mmkv.adapter_for(model).prepare(model, processor, _chat()))
    return _PREPARED[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_every_family(family: str) -> None:
    model, processor, prepared = _prepared(family)
    text = [j for j, c in enumerate(prepared.modality.modality.tolist()) if c == 0]
    L = prepared.length
    for method in ("lookm", "meda"):
        result = mmkv.generate(model, processor, None, method=method, budget=0.2, max_new_tokens=3, prepared=prepared)
        trace = result.trace
        per_token = trace.bytes_per_token_head
        assert trace.bytes_compressed < trace.bytes_full
        for layer in trace.layers:
            assert len(set(layer.budgets)) == 1  # equal counts across heads: a dense layer
            assert layer.bytes_after == sum(layer.budgets) * per_token
            assert layer.info["retained"] == layer.budgets[0]
            for h, kept in enumerate(layer.kept):
                assert set(text) <= set(kept)
                merges = layer.merges[h]
                assert sorted(merges["source"]) == sorted(set(range(L)) - set(kept))  # every evicted token merged
                assert set(merges["target"]) <= set(kept) and len(merges["similarity"]) == len(merges["source"])
        if method == "meda":
            assert sum(layer.info["layer_budget"] for layer in trace.layers) == trace.num_layers * trace.capacity
            assert all({"entropy", "layer_ratio", "layer_budget"} <= set(layer.info) for layer in trace.layers)
        generated = len(result.token_ids) - 1
        assert trace.bytes_end == trace.bytes_compressed + generated * trace.num_layers * trace.num_kv_heads * per_token


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "smolvlm"])
@pytest.mark.parametrize("name", ["lookm", "meda"])
def test_selection_equals_masked_full_cache(family: str, name: str) -> None:
    """Eviction only (merge off): the kept sets replayed as masks on a full cache give the same logits."""
    model, _, prepared = _prepared(family)
    counts = prepared.modality.counts()
    n_text, n_visual = counts["text"], counts["image"] + counts["video"]
    # Absolute budget so that visual tokens compete for slots: 10 % recent, the rest important.
    budget = n_text + n_visual // 2
    method = LookM(recent_share=0.1, merge="none") if name == "lookm" else MEDA(split=(1, 9), merge="none")
    tokens = [11, 4, 6]
    got, session, _ = compressed_logits(model, prepared, method, tokens, budget)
    kept = {layer.layer: [torch.tensor(k) for k in layer.kept] for layer in session.trace.layers}
    visual = prepared.modality.visual
    visual_kept = [int(visual[k].sum()) for heads in kept.values() for k in heads]
    assert max(visual_kept) > 0 and min(n_visual - v for v in visual_kept) > 0  # real competition
    want = masked_reference_logits(model, prepared.inputs, kept, tokens)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_registered_and_validated() -> None:
    assert isinstance(make_method("LOOK-M"), LookM) and isinstance(make_method("meda"), MEDA)
    assert MEDA.is_global and not LookM.is_global
    for bad in ({"recent_share": 1.5}, {"merge": "max"}, {"text_only": "drop"}):
        with pytest.raises(ValueError):
            LookM(**bad)
