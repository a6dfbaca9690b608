"""Oracle tests for the text baselines (Full, StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV).

Each reference below is a naive per-head loop written from the formulas of docs/methods.md (the baselines' pages)
and the method docstrings (capacity ``C`` counts the window; GQA reduction = mean over the query
heads ``h*G .. h*G+G-1`` of KV head ``h``; ties break toward the earlier position). No helper of
``mmkv.methods`` is used by the references.

Two readings are taken from the reference code the formulas were transcribed from, because the
formula lines are PyTorch calls whose defaults matter:

- pooling runs over the scores *before* the window only, ``s = a[..., :L-w].sum(queries)`` then
  ``pool1d(s)`` (docs/methods.md, SnapKV; FasterDecoding/SnapKV and KVCache-Factory ``SnapKVCluster``;
  FFY0/AdaKV ``calcul_attn_sore`` slices ``[..., :-window_size]`` before ``F.max_pool1d`` too);
- average pooling is ``F.avg_pool1d(s, k, padding=k//2, stride=1)`` with PyTorch's default
  ``count_include_pad=True``: every output is the window sum divided by ``k`` (zero padding counted).

To make float comparisons exact, synthetic scores are dyadic rationals (``integer / 1024``): every
sum and every mean over a group of 2 or 4 heads is exact in fp32, so the reference and the library
see bit-identical values and ties are real ties.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmkv.inputs.modality import ModalityMap
from mmkv.methods import H2O, AdaKV, Full, PyramidKV, SnapKV, StreamingLLM, make_method
from mmkv.methods.base import LayerContext
from mmkv.statistics.stats import LayerStats, StatsRequest, compute_layer_stats

AVG_POOL_COUNTS_PADDING = True  # F.avg_pool1d default (count_include_pad=True), see module docstring


# ---- naive references -----------------------------------------------------------------------


def ref_reduce(scores_q: torch.Tensor, h_kv: int) -> list[list[float]]:
    """Mean over the query heads of each KV head's group; query head i belongs to KV head i // G."""
    h_q, length = scores_q.shape
    group = h_q // h_kv
    out = []
    for h in range(h_kv):
        row = []
        for j in range(length):
            total = 0.0
            for g in range(group):
                total += float(scores_q[h * group + g, j])
            row.append(total / group)
        out.append(row)
    return out


def ref_pool(row: list[float], kernel: int, how: str) -> list[float]:
    """1-D pooling, stride 1, padding kernel // 2, same length (odd kernels)."""
    if kernel <= 1:
        return list(row)
    n, half = len(row), kernel // 2
    out = []
    for i in range(n):
        inside = [row[j] for j in range(i - half, i + half + 1) if 0 <= j < n]
        if how == "max":
            out.append(max(inside))
        else:
            out.append(sum(inside) / (kernel if AVG_POOL_COUNTS_PADDING else len(inside)))
    return out


def ref_top(row: list[float], count: int) -> list[int]:
    """Positions of the ``count`` largest values; ties toward the earlier position."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    return order[: max(0, count)]


def ref_top_plus_window(row: list[float], count: int, window: int, length: int) -> list[int]:
    """``count`` best of positions ``0 .. L-window-1`` plus the last ``window`` positions, sorted."""
    head = length - window
    chosen = ref_top(row[:head], min(count, head))
    return sorted(chosen + list(range(head, length)))


def ref_snapkv(window_scores_q, h_kv, length, capacity, window, kernel, pooling, head_caps=None):
    """SnapKV (docs/methods.md, SnapKV): keep all if L <= C; else top(C - w) of pooled s[:L-w] + last w."""
    caps = head_caps if head_caps is not None else [capacity] * h_kv
    if min(caps) >= length:
        return [list(range(length)) for _ in range(h_kv)]
    w = min(window, length, min(caps))  # capacity smaller than the window: keep the last C tokens
    reduced = ref_reduce(window_scores_q, h_kv)
    kept = []
    for h in range(h_kv):
        pooled = ref_pool(reduced[h][: length - w], kernel, pooling)
        kept.append(ref_top_plus_window(pooled, caps[h] - w, w, length))
    return kept


def ref_h2o(column_sums_q, h_kv, length, capacity, recent_ratio):
    """H2O (docs/methods.md, H2O; KVCache-Factory form): top(C - r) of column sums before the last r, + last r."""
    recent = min(capacity, max(1, round(capacity * recent_ratio)))
    if capacity >= length:
        return [list(range(length)) for _ in range(h_kv)], recent
    reduced = ref_reduce(column_sums_q, h_kv)
    return [ref_top_plus_window(reduced[h], capacity - recent, recent, length) for h in range(h_kv)], recent


def ref_streaming(length, capacity, sinks, h_kv):
    if capacity >= length:
        return [list(range(length)) for _ in range(h_kv)]
    s = min(sinks, capacity)
    kept = list(range(s)) + list(range(length - (capacity - s), length))
    return [kept for _ in range(h_kv)]


def ref_largest_remainder(values, total):
    """Floors, then +1 one at a time to the largest fractional part (ties: the lower index), up to ``total``."""
    ints = [math.floor(v + 1e-9) for v in values]
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - ints[i]), i))
    for i in order[: total - sum(ints)]:
        ints[i] += 1
    return ints


def ref_pyramid_capacity(length, capacity, window, beta, layer, num_layers):
    """PyramidKV per-layer capacity, window included: the linear schedule ``x_l = max - l (max - min) / (N - 1)``
    with ``min = b / beta``, ``max = 2b - min`` (clipped to ``L - w``), made integers summing to ``N b``.

    (The released code floors ``min`` and the step, which overspends by up to ``(N - 1) / 2`` tokens
    per head: the exact schedule holds the budget, see mmkv/methods/pyramidkv.py.)
    """
    w = min(window, capacity, length)
    base = capacity - w
    if length <= capacity or length < 2 * base or num_layers == 1:
        return capacity  # keep all / uniform SnapKV
    low = base / beta
    high = 2 * base - low
    if high >= length - w:
        high = length - w
        low = 2 * base - high
    schedule = [high - l * (high - low) / (num_layers - 1) for l in range(num_layers)]
    return ref_largest_remainder(schedule, num_layers * base)[layer] + w


def ref_adakv_caps(window_scores_q, h_kv, length, capacity, window, kernel, pooling, alpha):
    """AdaKV: layer-wide top-(H*b) over heads, shares ``n_h (1 - a) + b a`` (summing to ``H b``) made integers
    by the largest remainder, plus the window. (The repository's ``round(n_h (1 - a) + floor(b a))``
    loses up to a token per head to the floor: the exact shares hold the budget.)"""
    if capacity >= length:
        return [length] * h_kv
    w = min(window, capacity, length)
    base = capacity - w
    span = length - w
    reduced = ref_reduce(window_scores_q, h_kv)
    pooled = [ref_pool(reduced[h][:span], kernel, pooling) for h in range(h_kv)]
    flat = [(pooled[h][j], h) for h in range(h_kv) for j in range(span)]
    flat.sort(key=lambda e: -e[0])
    counts = [0] * h_kv
    for _, h in flat[: h_kv * base]:
        counts[h] += 1
    shares = [n * (1 - alpha) + base * alpha for n in counts]
    return [c + w for c in ref_largest_remainder(shares, h_kv * base)]


# ---- fixtures -------------------------------------------------------------------------------


def dyadic(generator, *shape, high=4096):
    """Positive scores that are exact multiples of 1/1024 (exact sums and group means in fp32)."""
    return (torch.randint(1, high, shape, generator=generator).float()) / 1024.0


def context(length, capacity, h_q, h_kv, *, layer=0, num_layers=1, window=0, window_scores=None, column_sums=None):
    stats = LayerStats(
        window=min(window, length) if window else 0, window_scores=window_scores, column_sums=column_sums
    )
    return LayerContext(
        layer=layer,
        num_layers=num_layers,
        num_kv_heads=h_kv,
        num_q_heads=h_q,
        length=length,
        capacity=capacity,
        modality=ModalityMap.text_only(length),
        stats=stats,
    )


def assert_kept(plan, expected: list[list[int]], h_kv: int, where: str = "") -> None:
    assert len(plan.kept) == h_kv, where
    for h, (got, want) in enumerate(zip(plan.kept, expected)):
        assert got.dtype == torch.long, f"{where} head {h}: kept dtype {got.dtype}"
        assert got.dim() == 1, where
        assert got.tolist() == want, f"{where} head {h}: kept {got.tolist()} != reference {want}"


def planted_scores(seed, h_q, length):
    """Dyadic scores with planted structure per query head.

    - query head 0: three huge keys (concentrated head)
    - query head 1: flat-ish scores (dispersed head)
    - other heads: random
    - a planted exact tie: positions 4 and 11 share a large value in every head
    """
    g = torch.Generator().manual_seed(seed)
    s = dyadic(g, h_q, length)
    s[0] = dyadic(g, length, high=64)
    s[0, [2, 9, 17 % length]] = 200.0
    s[1] = 2.0 + dyadic(g, length, high=256)
    s[:, 4] = 3.5
    s[:, 11 % length] = 3.5
    return s


# (L, C, H_q, H_kv) combos: C >= L (keep all), C < window, GQA, MHA
COMBOS = [
    (37, 16, 4, 2),
    (37, 5, 4, 2),  # capacity < window (8)
    (37, 37, 4, 2),  # capacity == L: keep all
    (37, 50, 4, 2),  # capacity > L: keep all
    (60, 24, 8, 2),  # G = 4
    (29, 12, 3, 3),  # MHA
    (23, 9, 4, 1),  # MQA
]


# ---- Full -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length,capacity,h_q,h_kv", COMBOS)
def test_full_keeps_everything(length, capacity, h_q, h_kv):
    method = Full()
    assert method.compresses is False
    assert method.stats_request().empty
    plan = method.plan_layer(context(length, capacity, h_q, h_kv))
    assert_kept(plan, [list(range(length))] * h_kv, h_kv)


# ---- StreamingLLM ---------------------------------------------------------------------------


@pytest.mark.parametrize("length,capacity,h_q,h_kv", COMBOS)
def test_streaming_llm_matches_reference(length, capacity, h_q, h_kv):
    for sinks in (4, 0, 1, 7):
        method = StreamingLLM(sinks=sinks)
        assert method.stats_request().empty
        plan = method.plan_layer(context(length, capacity, h_q, h_kv))
        expected = ref_streaming(length, capacity, sinks, h_kv)
        assert_kept(plan, expected, h_kv, f"sinks={sinks}")
        assert all(len(k) == min(capacity, length) for k in expected)


def test_streaming_llm_hand_example():
    plan = StreamingLLM(sinks=4).plan_layer(context(20, 10, 2, 2))
    assert plan.kept[0].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    plan = StreamingLLM(sinks=4).plan_layer(context(20, 3, 2, 2))  # capacity below the sinks
    assert plan.kept[1].tolist() == [0, 1, 2]


# ---- H2O ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,capacity,h_q,h_kv", COMBOS)
@pytest.mark.parametrize("recent_ratio", [0.5, 0.25, 0.3, 1.0, 0.0])
def test_h2o_matches_reference(length, capacity, h_q, h_kv, recent_ratio):
    for seed in (0, 1):
        scores = planted_scores(seed, h_q, length)
        method = H2O(recent_ratio=recent_ratio)
        assert method.stats_request().column_sums
        plan = method.plan_layer(context(length, capacity, h_q, h_kv, column_sums=scores))
        expected, recent = ref_h2o(scores, h_kv, length, capacity, recent_ratio)
        assert_kept(plan, expected, h_kv, f"seed={seed}")
        assert plan.decode is None
        assert plan.info["recent"] == recent


@pytest.mark.parametrize("length,capacity,h_q,h_kv", [c for c in COMBOS if c[1] < c[0]])
@pytest.mark.parametrize("recent_ratio", [0.5, 0.25, 0.3])
def test_h2o_decode_evict_plan(length, capacity, h_q, h_kv, recent_ratio):
    scores = planted_scores(3, h_q, length)
    method = H2O(recent_ratio=recent_ratio, decode_evict=True)
    plan = method.plan_layer(context(length, capacity, h_q, h_kv, column_sums=scores))
    expected, recent = ref_h2o(scores, h_kv, length, capacity, recent_ratio)
    assert_kept(plan, expected, h_kv)  # decode eviction does not change the prefill selection
    decode = plan.decode
    assert decode is not None and decode["policy"] == "h2o"
    assert decode["capacity"] == capacity
    assert decode["recent"] == recent
    assert decode["recent"] <= decode["capacity"]
    reduced = ref_reduce(scores, h_kv)
    assert len(decode["scores"]) == h_kv
    for h in range(h_kv):
        got = decode["scores"][h]
        assert got.shape == (len(expected[h]),), "one score per kept token"
        assert got.tolist() == [reduced[h][j] for j in expected[h]], f"head {h}: scores not aligned with kept"


@pytest.mark.parametrize("length,capacity", [(20, 20), (20, 30), (20, 60)])
def test_h2o_decode_evict_when_prompt_fits(length, capacity):
    """Prompt within budget: nothing is dropped at prefill; the decode policy must stay consistent.

    The docstring: "the cache stays at ``capacity`` tokens during decoding" with the last ``recent``
    protected. A recent window larger than the decode capacity is contradictory, and a prompt that
    fits the budget should be allowed to grow to ``capacity`` before the first eviction.
    """
    scores = planted_scores(4, 4, length)
    plan = H2O(recent_ratio=0.5, decode_evict=True).plan_layer(context(length, capacity, 4, 2, column_sums=scores))
    assert_kept(plan, [list(range(length))] * 2, 2)
    reduced = ref_reduce(scores, 2)
    for h in range(2):
        assert plan.decode["scores"][h].tolist() == reduced[h]
    assert plan.decode["recent"] <= plan.decode["capacity"]
    assert plan.decode["capacity"] == capacity


def test_h2o_planted_tie_and_heavy_hitters():
    """Heavy hitters survive; an exact tie at the boundary keeps the earlier position."""
    length, capacity = 30, 8  # recent = 4, heavy = 4
    s = torch.full((2, length), 1.0 / 1024)
    s[:, [3, 20]] = 50.0  # heavy hitters in both query heads of KV head 0
    s[:, 12] = 7.0
    s[:, 6] = 2.0  # tie between positions 6 and 15 for the last heavy slot
    s[:, 15] = 2.0
    plan = H2O(recent_ratio=0.5).plan_layer(context(length, capacity, 2, 1, column_sums=s))
    assert plan.kept[0].tolist() == [3, 6, 12, 20, 26, 27, 28, 29]


def test_h2o_gqa_uses_group_mean():
    """KV head h averages query heads h*G..h*G+G-1 (not h, h+H_kv, ...)."""
    length, capacity = 12, 4  # recent 2, heavy 2
    s = torch.full((4, length), 1.0 / 1024)
    s[0, 1] = 10.0  # query head 0 -> KV head 0
    s[1, 2] = 10.0  # query head 1 -> KV head 0
    s[2, 5] = 10.0  # query head 2 -> KV head 1
    s[3, 6] = 10.0  # query head 3 -> KV head 1
    plan = H2O(recent_ratio=0.5).plan_layer(context(length, capacity, 4, 2, column_sums=s))
    assert plan.kept[0].tolist() == [1, 2, 10, 11]
    assert plan.kept[1].tolist() == [5, 6, 10, 11]


# ---- SnapKV ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length,capacity,h_q,h_kv", COMBOS)
@pytest.mark.parametrize("kernel,pooling", [(1, "avg"), (5, "avg"), (7, "max"), (3, "max")])
def test_snapkv_matches_reference(length, capacity, h_q, h_kv, kernel, pooling):
    window = 8
    for seed in (0, 1):
        scores = planted_scores(seed, h_q, length)
        method = SnapKV(window=window, kernel=kernel, pooling=pooling)
        assert method.stats_request() == StatsRequest(window=window)
        plan = method.plan_layer(context(length, capacity, h_q, h_kv, window=window, window_scores=scores))
        expected = ref_snapkv(scores, h_kv, length, capacity, window, kernel, pooling)
        assert_kept(plan, expected, h_kv, f"seed={seed}")
        assert [len(k) for k in plan.kept] == [min(capacity, length)] * h_kv


def test_snapkv_capacity_below_window_keeps_last_tokens():
    s = planted_scores(0, 2, 30)
    plan = SnapKV(window=8, kernel=1).plan_layer(context(30, 5, 2, 1, window=8, window_scores=s))
    assert plan.kept[0].tolist() == [25, 26, 27, 28, 29]


@pytest.mark.parametrize(
    "method",
    [
        SnapKV(window=4, kernel=3, pooling="max"),
        AdaKV(window=4, kernel=3, pooling="max"),
        PyramidKV(window=4, kernel=3, pooling="max"),
    ],
    ids=["snapkv", "adakv", "pyramidkv"],
)
def test_pooling_ignores_the_window_scores(method):
    """Formula: ``s = a[..., :L-w].sum(queries)`` is pooled; the window's own scores never enter the pool.

    Position ``L-w-1`` (just before the window) has a tiny score; the first window position has a
    huge one. With max pooling over the full row the tiny position would inherit the huge value
    and win the single slot over the genuinely best earlier key (position 5, whose pooled value
    4, 5, 6 share: the tie goes to 4).
    """
    length, window, capacity = 20, 4, 5  # one slot before the window
    s = torch.full((1, length), 1.0 / 1024)
    s[0, 5] = 1.0  # best key before the window
    s[0, length - window] = 100.0  # first window position (always kept anyway)
    plan = method.plan_layer(context(length, capacity, 1, 1, window=window, window_scores=s))
    assert plan.kept[0].tolist() == [4, 16, 17, 18, 19]


def test_snapkv_avg_pool_divides_by_kernel_at_the_edges():
    """``F.avg_pool1d(s, k, padding=k//2)`` counts the zero padding: edge outputs are window sum / k.

    Position 0 (window sum 3.0, 2 in-range cells -> 3/3 = 1.0) must lose to positions 10 and 11
    (window sum 3.5 -> 3.5/3; the tie goes to 10); excluding the padding would give position 0
    3/2 = 1.5 and keep it instead.
    """
    length, window, capacity = 24, 4, 5
    s = torch.zeros(1, length)
    s[0, 0] = 3.0
    s[0, 10] = 3.25
    s[0, 11] = 0.25
    plan = SnapKV(window=window, kernel=3, pooling="avg").plan_layer(
        context(length, capacity, 1, 1, window=window, window_scores=s)
    )
    assert plan.kept[0].tolist() == [10, 20, 21, 22, 23]


def test_snapkv_tie_breaks_toward_earlier_position():
    length = 20
    s = torch.full((2, length), 1.0 / 1024)
    s[:, 9] = 5.0
    s[:, 2] = 5.0
    s[:, 7] = 5.0
    plan = SnapKV(window=4, kernel=1).plan_layer(context(length, 6, 2, 1, window=4, window_scores=s))
    assert plan.kept[0].tolist() == [2, 7, 16, 17, 18, 19]


# ---- PyramidKV ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,capacity,window,beta,num_layers,first,last",
    [
        # base 100, min 5, max 195: x_0 = 195, x_31 = 5 (the code's floored step 6 gave 17 at the top)
        (1000, 108, 8, 20, 32, 203, 13),
        # clipping: max 195 >= L - w = 192 -> max 192, min 8 (floored step 5: 45 at the top, +37 tokens)
        (200, 108, 8, 20, 32, 200, 16),
        # uniform fallback: L = 150 < 2 * base = 200
        (150, 108, 8, 20, 32, 108, 108),
        # keep all
        (100, 108, 8, 20, 32, 108, 108),
        # base 40, min 2, max 78: x = 78, 52.67, 27.33, 2 -> 78, 53, 27, 2 (sum 160 = 4 x 40)
        (500, 48, 8, 20, 4, 86, 10),
    ],
)
def test_pyramidkv_hand_computed_capacities(length, capacity, window, beta, num_layers, first, last):
    method = PyramidKV(window=window, beta=beta)
    caps = [
        method.layer_capacity(context(length, capacity, 2, 2, layer=l, num_layers=num_layers, window=window))
        for l in range(num_layers)
    ]
    assert caps[0] == first and caps[-1] == last


@pytest.mark.parametrize("num_layers", [1, 2, 7, 32])
@pytest.mark.parametrize("capacity", [5, 8, 20, 64, 108])
def test_pyramidkv_capacity_formula_all_layers(capacity, num_layers):
    for length in (40, 60, 100, 199, 200, 250, 1000, 5000):
        check_pyramid_capacities(length, capacity, num_layers)


def check_pyramid_capacities(length, capacity, num_layers):
    window, beta = 8, 20
    method = PyramidKV(window=window, beta=beta)
    caps = [
        method.layer_capacity(context(length, capacity, 4, 2, layer=l, num_layers=num_layers, window=window))
        for l in range(num_layers)
    ]
    expected = [ref_pyramid_capacity(length, capacity, window, beta, l, num_layers) for l in range(num_layers)]
    where = f"L={length} C={capacity} N={num_layers}"
    assert caps == expected, where
    assert all(a >= b for a, b in zip(caps, caps[1:])), f"{where}: capacities must not increase with depth"
    w = min(window, capacity, length)
    base = capacity - w
    pyramid = not (length <= capacity or length < 2 * base or num_layers == 1)
    if pyramid:
        low = base / beta
        high = 2 * base - low
        if high >= length - w:  # the clipping branch
            high, low = length - w, 2 * base - (length - w)
        step = (high - low) / (num_layers - 1)
        if step >= 1:
            assert all(a > b for a, b in zip(caps, caps[1:])), f"{where}: step >= 1, strictly decreasing"
        for l, c in enumerate(caps):  # each layer within one token of the exact linear schedule
            assert math.floor(high - l * step) <= c - w <= math.ceil(high - l * step), where
        # the layers hold the budget exactly
        assert sum(caps) == num_layers * capacity, where
        assert all(w <= c <= length for c in caps), where
    else:
        assert caps == [capacity] * num_layers, where


@pytest.mark.parametrize(
    "length,capacity,layer,num_layers",
    [(80, 24, 0, 4), (80, 24, 3, 4), (80, 24, 1, 4), (40, 24, 2, 4), (30, 40, 0, 4), (80, 6, 2, 4), (80, 24, 0, 1)],
)
def test_pyramidkv_plan_matches_reference(length, capacity, layer, num_layers):
    window, kernel, pooling, beta = 8, 7, "max", 20
    method = PyramidKV()
    assert (method.window, method.kernel, method.pooling, method.beta) == (window, kernel, pooling, beta)
    assert method.stats_request() == StatsRequest(window=window)
    for seed in (0, 1):
        scores = planted_scores(seed, 4, length)
        ctx = context(length, capacity, 4, 2, layer=layer, num_layers=num_layers, window=window, window_scores=scores)
        plan = method.plan_layer(ctx)
        cap = ref_pyramid_capacity(length, capacity, window, beta, layer, num_layers)
        expected = ref_snapkv(scores, 2, length, cap, window, kernel, pooling)
        assert_kept(plan, expected, 2, f"seed={seed}")
        assert [len(k) for k in plan.kept] == [min(cap, length)] * 2


# ---- AdaKV ----------------------------------------------------------------------------------


def adakv_scores(seed, h_q, h_kv, length):
    """Dyadic per-query-head scores whose KV-head means never tie across KV heads.

    KV head h gets values ``(n * H_kv + h) / 1024``; inside a group the query heads are
    ``mean +- delta`` so the group mean is exactly the designed value.
    """
    g = torch.Generator().manual_seed(seed)
    group = h_q // h_kv
    kv = (torch.randint(64, 4096, (h_kv, length), generator=g) * h_kv + torch.arange(h_kv)[:, None]).float() / 1024.0
    out = torch.empty(h_q, length)
    for h in range(h_kv):
        for i in range(group):
            delta = (torch.randint(0, 32, (length,), generator=g).float() / 1024.0) * (1 if i % 2 == 0 else -1)
            if group % 2 == 1 and i == group - 1:
                delta = torch.zeros(length)
            out[h * group + i] = kv[h] + delta
        if group % 2 == 0:  # pair up +delta / -delta exactly
            for i in range(0, group, 2):
                out[h * group + i + 1] = 2 * kv[h] - out[h * group + i]
    return out


def concentrated_vs_dispersed(h_q, h_kv, length, seed=0):
    """KV head 0: three huge keys then near-zero (concentrated); KV head 1: uniform-ish (dispersed)."""
    s = adakv_scores(seed, h_q, h_kv, length)
    group = h_q // h_kv
    g = torch.Generator().manual_seed(seed + 100)
    for i in range(group):
        s[i] = (torch.randint(0, 8, (length,), generator=g) * h_kv).float() / 1024.0
        s[i, [5, 30, 55]] = 80.0
    for i in range(group, 2 * group):
        s[i] = (1 + torch.randint(1024, 1100, (length,), generator=g) * h_kv).float() / 1024.0
    return s


@pytest.mark.parametrize(
    "length,capacity,h_q,h_kv",
    [(80, 40, 4, 2), (80, 20, 8, 2), (60, 30, 3, 3), (37, 16, 4, 2), (37, 20, 4, 1), (80, 24, 4, 4)],
)
@pytest.mark.parametrize("kernel,pooling", [(7, "max"), (1, "avg"), (5, "avg")])
def test_adakv_matches_reference(length, capacity, h_q, h_kv, kernel, pooling):
    window = 8
    for seed in (0, 1):
        scores = adakv_scores(seed, h_q, h_kv, length)
        for alpha in (0.2, 0.5, 0.0, 1.0):
            where = f"seed={seed} alpha={alpha}"
            method = AdaKV(window=window, kernel=kernel, pooling=pooling, alpha=alpha)
            ctx = context(length, capacity, h_q, h_kv, window=window, window_scores=scores)
            caps = ref_adakv_caps(scores, h_kv, length, capacity, window, kernel, pooling, alpha)
            assert method.head_capacities(ctx) == caps, where
            plan = method.plan_layer(ctx)
            expected = ref_snapkv(scores, h_kv, length, capacity, window, kernel, pooling, head_caps=caps)
            assert_kept(plan, expected, h_kv, where)
            assert [len(k) for k in plan.kept] == caps, where


@pytest.mark.parametrize("h_q,h_kv", [(4, 2), (2, 2), (8, 2)])
@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_adakv_moves_budget_from_concentrated_to_dispersed_head(h_q, h_kv, alpha):
    length, capacity, window = 80, 40, 8
    s = concentrated_vs_dispersed(h_q, h_kv, length)
    method = AdaKV(window=window, kernel=7, pooling="max", alpha=alpha)
    ctx = context(length, capacity, h_q, h_kv, window=window, window_scores=s)
    plan = method.plan_layer(ctx)
    caps = ref_adakv_caps(s, h_kv, length, capacity, window, 7, "max", alpha)
    assert plan.budgets == caps
    assert_kept(plan, ref_snapkv(s, h_kv, length, capacity, window, 7, "max", head_caps=caps), h_kv)
    assert caps[0] < capacity < caps[1], f"concentrated head should give slots to the dispersed one: {caps}"
    # the planted heavy keys of the concentrated head survive
    assert {5, 30, 55} <= set(plan.kept[0].tolist())
    # the floor: every head keeps at least floor(alpha * b) + w tokens
    base = capacity - window
    assert min(caps) >= math.floor(alpha * base) + window
    # total budget is (almost) preserved: rounding and the floor cost at most about one token per head
    assert abs(sum(caps) - h_kv * capacity) <= h_kv


def test_adakv_keep_all_and_capacity_below_window():
    s = adakv_scores(2, 4, 2, 30)
    method = AdaKV(window=8)
    plan = method.plan_layer(context(30, 30, 4, 2, window=8, window_scores=s))
    assert_kept(plan, [list(range(30))] * 2, 2)
    plan = method.plan_layer(context(30, 45, 4, 2, window=8, window_scores=s))
    assert_kept(plan, [list(range(30))] * 2, 2)
    plan = method.plan_layer(context(30, 5, 4, 2, window=8, window_scores=s))
    assert_kept(plan, [list(range(25, 30))] * 2, 2)


# ---- end to end: real q/k -> compute_layer_stats -> plan, vs the naive attention matrix --------


def naive_probs(q, k, scaling):
    h_q, length, _ = q.shape
    group = h_q // k.shape[0]
    probs = torch.zeros(h_q, length, length, dtype=torch.float64)
    for head in range(h_q):
        logits = (q[head].double() @ k[head // group].double().T) * scaling
        for t in range(length):
            row = logits[t, : t + 1]
            e = torch.exp(row - row.max())
            probs[head, t, : t + 1] = e / e.sum()
    return probs


@pytest.mark.parametrize(
    "method,capacity",
    [
        (SnapKV(window=8, kernel=5, pooling="avg"), 16),
        (SnapKV(window=8, kernel=7, pooling="max"), 20),
        (H2O(recent_ratio=0.5), 16),
        (PyramidKV(), 14),
        (AdaKV(window=8, kernel=7, pooling="max", alpha=0.2), 18),
    ],
    ids=["snapkv-avg", "snapkv-max", "h2o", "pyramidkv", "adakv"],
)
def test_end_to_end_against_naive_attention(method, capacity):
    h_q, h_kv, length, d, num_layers, layer = 4, 2, 41, 8, 4, 1
    g = torch.Generator().manual_seed(123)
    q = torch.randn(1, h_q, length, d, generator=g) * 1.5
    k = torch.randn(1, h_kv, length, d, generator=g) * 1.5
    codes = torch.zeros(length, dtype=torch.int8)
    stats = compute_layer_stats(q, k, codes, method.stats_request(), d**-0.5)
    ctx = LayerContext(layer, num_layers, h_kv, h_q, length, capacity, ModalityMap.text_only(length), stats)
    plan = method.plan_layer(ctx)
    probs = naive_probs(q[0], k[0], d**-0.5)
    if isinstance(method, H2O):
        expected, _ = ref_h2o(probs.sum(1), h_kv, length, capacity, method.recent_ratio)
    else:
        w = method.window
        window_scores = probs[:, length - w :].sum(1)
        if isinstance(method, AdaKV):
            caps = ref_adakv_caps(window_scores, h_kv, length, capacity, w, method.kernel, method.pooling, method.alpha)
            expected = ref_snapkv(
                window_scores, h_kv, length, capacity, w, method.kernel, method.pooling, head_caps=caps
            )
        else:
            cap = capacity
            if isinstance(method, PyramidKV):
                cap = ref_pyramid_capacity(length, capacity, w, method.beta, layer, num_layers)
            expected = ref_snapkv(window_scores, h_kv, length, cap, w, method.kernel, method.pooling)
    assert_kept(plan, expected, h_kv)


# ---- make_method ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,cls",
    [
        ("full", Full),
        ("FULL", Full),
        ("streamingllm", StreamingLLM),
        ("StreamingLLM", StreamingLLM),
        ("streaming-llm", StreamingLLM),
        ("streaming_llm", StreamingLLM),
        ("h2o", H2O),
        ("H2O", H2O),
        ("snapkv", SnapKV),
        ("SnapKV", SnapKV),
        ("snap-kv", SnapKV),
        ("pyramidkv", PyramidKV),
        ("PyramidKV", PyramidKV),
        ("pyramid_kv", PyramidKV),
        ("adakv", AdaKV),
        ("AdaKV", AdaKV),
        ("Ada-KV", AdaKV),
    ],
)
def test_make_method_names_are_case_and_separator_insensitive(name, cls):
    method = make_method(name)
    assert type(method) is cls
    assert method == cls()


def test_make_method_passes_hyper_parameters():
    m = make_method("SnapKV", window=16, kernel=7, pooling="max")
    assert m == SnapKV(window=16, kernel=7, pooling="max")
    m = make_method("h2o", decode_evict=True, recent_ratio=0.25)
    assert m.decode_evict is True and m.recent_ratio == 0.25
    instance = AdaKV(alpha=0.5)
    assert make_method(instance) is instance


@pytest.mark.parametrize("name", ["nonexistent", "h3o", "snapkv2", "", "pyramid kv"])
def test_make_method_unknown_name(name):
    with pytest.raises(ValueError) as err:
        make_method(name)
    message = str(err.value)
    assert repr(name) in message, "the message should quote the unknown name"
    for known in ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv"):
        assert known in message, "the message should list the known methods"


@pytest.mark.parametrize(
    "name,params,needle",
    [
        ("snapkv", {"windw": 8}, "windw"),
        ("full", {"window": 8}, "window"),
        ("adakv", {"floor_alpha": 0.2}, "floor_alpha"),
        ("streaming-llm", {"sink": 4}, "sink"),
    ],
)
def test_make_method_bad_hyper_parameter_names(name, params, needle):
    with pytest.raises(ValueError) as err:
        make_method(name, **params)
    message = str(err.value)
    assert needle in message and "hyper-parameter" in message


def test_make_method_instance_plus_params_is_an_error():
    with pytest.raises(ValueError, match="not both"):
        make_method(SnapKV(), window=4)


@pytest.mark.parametrize(
    "cls,params,needle",
    [
        (SnapKV, dict(window=4, pooling="mean"), "pooling"),
        (SnapKV, dict(window=4, gqa_reduce="median"), "gqa_reduce"),
        (SnapKV, dict(window=0), "window"),
        (AdaKV, dict(window=4, pooling="min"), "pooling"),
        (AdaKV, dict(alpha=1.5), "alpha"),
        (PyramidKV, dict(beta=0), "beta"),
        (H2O, dict(gqa_reduce="sum"), "gqa_reduce"),
        (H2O, dict(recent_ratio=2.0), "recent_ratio"),
        (StreamingLLM, dict(sinks=-1), "sinks"),
    ],
)
def test_bad_hyper_parameter_values_raise_value_error_when_built(cls, params, needle):
    with pytest.raises(ValueError, match=needle):
        cls(**params)
    with pytest.raises(ValueError, match=needle):
        make_method(cls.name, **params)
