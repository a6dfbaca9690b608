"""Oracle tests for :func:`mmkv.statistics.stats.compute_layer_stats`.

The reference builds the *full* causal attention matrix naively (float64, one query head and one
query row at a time, the KV head of query head ``i`` being ``i // G`` as in transformers'
``repeat_kv``) and derives every statistic from it by the definitions in ``mmkv/statistics/stats.py``'s
docstrings and docs/methods.md (Common framework):

- ``window_scores[h, j]`` = sum over the last ``W`` query rows of ``A[h, t, j]``
- ``column_sums[h, j]``   = sum over all query rows of ``A[h, t, j]``
- ``modality_mass[h, c]`` = mean over the last ``W`` rows of ``sum_{j: code[j] == c} A[h, t, j]``
- ``entropy[h]``          = mean over the last ``W`` rows of ``-sum_j A log A`` (nats, 0 log 0 = 0)
- ``full_entropy[h]``     = the same mean over all ``L`` rows

Nothing from ``mmkv`` is used to build the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import mmkv.statistics.stats as stats_mod
from mmkv.statistics.stats import LayerStats, StatsRequest, compute_layer_stats

TEXT, IMAGE, VIDEO = 0, 1, 2
ATOL = 1e-5
RTOL = 1e-5


# ---- naive reference ------------------------------------------------------------------------


def naive_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Full causal attention probabilities ``[H_q, L, L]`` (float64) from ``q [H_q,L,d]``, ``k [H_kv,L,d]``."""
    h_q, length, _ = q.shape
    h_kv = k.shape[0]
    group = h_q // h_kv
    q64, k64 = q.double(), k.double()
    probs = torch.zeros(h_q, length, length, dtype=torch.float64)
    for head in range(h_q):
        kv = head // group  # query heads kv*G .. kv*G+G-1 share KV head kv
        for t in range(length):
            logits = [float(q64[head, t] @ k64[kv, j]) * scaling for j in range(t + 1)]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            for j in range(t + 1):
                probs[head, t, j] = exps[j] / total
            # keys j > t stay exactly 0 (causal mask)
    return probs


def row_entropy(row: torch.Tensor) -> float:
    return -sum(float(p) * math.log(float(p)) for p in row if float(p) > 0.0)


def reference_stats(q, k, codes, window, scaling):
    """All statistics from the naive attention matrix; ``window`` is the effective window."""
    probs = naive_attention(q, k, scaling)
    h_q, length, _ = probs.shape
    rows = range(length - window, length)
    window_scores = torch.zeros(h_q, length, dtype=torch.float64)
    column_sums = torch.zeros(h_q, length, dtype=torch.float64)
    mass = torch.zeros(h_q, 3, dtype=torch.float64)
    entropy = torch.zeros(h_q, dtype=torch.float64)
    full_entropy = torch.zeros(h_q, dtype=torch.float64)
    for h in range(h_q):
        for t in range(length):
            column_sums[h] += probs[h, t]
            full_entropy[h] += row_entropy(probs[h, t])
        full_entropy[h] /= length
        for t in rows:
            window_scores[h] += probs[h, t]
            entropy[h] += row_entropy(probs[h, t])
            for c in (TEXT, IMAGE, VIDEO):
                mass[h, c] += sum(float(probs[h, t, j]) for j in range(length) if int(codes[j]) == c)
        entropy[h] /= window
        mass[h] /= window
    return {
        "window_scores": window_scores,
        "column_sums": column_sums,
        "modality_mass": mass,
        "entropy": entropy,
        "full_entropy": full_entropy,
        "probs": probs,
    }


def make_inputs(seed: int, h_q: int, h_kv: int, length: int, d: int, spread: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h_q, length, d, generator=g) * spread
    k = torch.randn(1, h_kv, length, d, generator=g) * spread
    codes = torch.randint(0, 3, (length,), generator=g).to(torch.int8)
    return q, k, codes


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual is not None, f"{name} was not computed"
    assert actual.dtype == torch.float32, f"{name} should be fp32, got {actual.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


ALL = StatsRequest(window=0, column_sums=True, modality_mass=True, entropy=True, full_entropy=True)


# ---- tests ----------------------------------------------------------------------------------

# (seed, H_q, H_kv, L, d, W)
SHAPES = [
    (0, 4, 2, 37, 8, 8),  # GQA, G = 2
    (1, 4, 2, 37, 8, 50),  # window larger than L
    (2, 6, 2, 23, 8, 5),  # GQA, G = 3
    (3, 3, 3, 19, 4, 19),  # MHA, window == L
    (4, 4, 1, 29, 8, 1),  # MQA, single-query window
    (5, 2, 1, 1, 8, 4),  # a one-token prompt
]


@pytest.mark.parametrize("seed,h_q,h_kv,length,d,window", SHAPES)
@pytest.mark.parametrize("block_queries", [None, 5, 1], ids=["one-block", "blocks-of-5", "blocks-of-1"])
def test_stats_match_naive_attention(monkeypatch, seed, h_q, h_kv, length, d, window, block_queries):
    if block_queries is not None:
        # block = MAX_BLOCK_ELEMENTS // (H_q * L) queries per block
        monkeypatch.setattr(stats_mod, "MAX_BLOCK_ELEMENTS", block_queries * h_q * length)
    q, k, codes = make_inputs(seed, h_q, h_kv, length, d)
    scaling = 0.7 / math.sqrt(d)  # not the default 1/sqrt(d): the scaling argument must be used
    request = StatsRequest(window=window, column_sums=True, modality_mass=True, entropy=True, full_entropy=True)
    out = compute_layer_stats(q, k, codes, request, scaling)
    eff = min(window, length)
    ref = reference_stats(q[0], k[0], codes, eff, scaling)

    assert out.window == eff
    assert_close(out.window_scores, ref["window_scores"], "window_scores")
    assert_close(out.column_sums, ref["column_sums"], "column_sums")
    assert_close(out.modality_mass, ref["modality_mass"], "modality_mass")
    assert_close(out.entropy, ref["entropy"], "entropy")
    assert_close(out.full_entropy, ref["full_entropy"], "full_entropy")

    # sanity of the definitions themselves: each row is a distribution
    torch.testing.assert_close(
        out.window_scores.sum(-1).double(), torch.full((h_q,), float(eff), dtype=torch.float64), atol=ATOL, rtol=RTOL
    )
    torch.testing.assert_close(
        out.column_sums.sum(-1).double(), torch.full((h_q,), float(length), dtype=torch.float64), atol=ATOL, rtol=RTOL
    )
    torch.testing.assert_close(
        out.modality_mass.sum(-1).double(), torch.ones(h_q, dtype=torch.float64), atol=ATOL, rtol=RTOL
    )


def test_block_path_really_uses_several_blocks(monkeypatch):
    """With a tiny block bound the column sums and full entropy still equal the one-block result."""
    q, k, codes = make_inputs(11, 4, 2, 37, 8)
    request = StatsRequest(column_sums=True, full_entropy=True)
    one = compute_layer_stats(q, k, codes, request, 8**-0.5)
    calls = []
    original = stats_mod._logits

    def counting(qg, kt, scaling, out):
        calls.append((qg.shape[1] // 2, kt.shape[-1]))  # (query rows, visible keys); G = 2
        return original(qg, kt, scaling, out)

    monkeypatch.setattr(stats_mod, "_logits", counting)
    monkeypatch.setattr(stats_mod, "MAX_BLOCK_ELEMENTS", 5 * 4 * 37)
    many = compute_layer_stats(q, k, codes, request, 8**-0.5)
    # query blocks of 5; block [s, s+5) scores only the keys < s+5
    assert calls == [(min(5, 37 - s), min(37, s + 5)) for s in range(0, 37, 5)]
    ref = reference_stats(q[0], k[0], codes, 1, 8**-0.5)
    assert_close(many.column_sums, ref["column_sums"], "column_sums (blocks)")
    assert_close(many.full_entropy, ref["full_entropy"], "full_entropy (blocks)")
    torch.testing.assert_close(many.column_sums, one.column_sums, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(many.full_entropy, one.full_entropy, atol=ATOL, rtol=RTOL)


def test_entropy_when_a_query_gives_its_own_key_no_probability():
    """A huge logit gap underflows a row's own-key probability: the entropy falls back to the exact lse."""
    h_q, h_kv, length, d = 2, 1, 16, 4
    q, k, codes = make_inputs(12, h_q, h_kv, length, d, spread=0.3)
    k[0, 0, 0, 0] = 400.0  # the first key dominates every later row by ~100+ nats
    q[0, :, :, 0] = 1.0
    out = compute_layer_stats(q, k, codes, StatsRequest(window=6, entropy=True, full_entropy=True), 1.0)
    ref = reference_stats(q[0], k[0], codes, 6, 1.0)
    assert_close(out.entropy, ref["entropy"], "entropy")
    assert_close(out.full_entropy, ref["full_entropy"], "full_entropy")


@pytest.mark.parametrize("block_queries", [None, 3, 1])
def test_window_larger_than_a_block(monkeypatch, block_queries):
    """A large user window is computed in query blocks too, with the same result."""
    q, k, codes = make_inputs(13, 4, 2, 41, 8)
    if block_queries is not None:
        monkeypatch.setattr(stats_mod, "MAX_BLOCK_ELEMENTS", block_queries * 4 * 41)
    request = StatsRequest(window=30, modality_mass=True, entropy=True, column_sums=True)
    out = compute_layer_stats(q, k, codes, request, 8**-0.5)
    ref = reference_stats(q[0], k[0], codes, 30, 8**-0.5)
    for name in ("window_scores", "modality_mass", "entropy", "column_sums"):
        assert_close(getattr(out, name), ref[name], name)


def test_gqa_head_mapping_is_contiguous_groups():
    """Query head i must use KV head i // G (not i % H_kv): make the two KV heads very different."""
    h_q, h_kv, length, d = 4, 2, 17, 8
    g = torch.Generator().manual_seed(21)
    q = torch.randn(1, h_q, length, d, generator=g)
    k = torch.randn(1, h_kv, length, d, generator=g)
    k[0, 1] *= 6.0  # KV head 1 gives much sharper attention than KV head 0
    codes = torch.zeros(length, dtype=torch.int8)
    out = compute_layer_stats(q, k, codes, StatsRequest(window=4, entropy=True, column_sums=True), 1.0 / math.sqrt(d))
    ref = reference_stats(q[0], k[0], codes, 4, 1.0 / math.sqrt(d))
    assert_close(out.window_scores, ref["window_scores"], "window_scores")
    assert_close(out.column_sums, ref["column_sums"], "column_sums")
    assert_close(out.entropy, ref["entropy"], "entropy")


def test_modality_mass_with_missing_modality_and_planted_image_attention():
    """A code that never occurs gets mass 0; a query that only looks at image keys gets image mass ~1."""
    h_q, h_kv, length, d = 2, 1, 20, 4
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, h_q, length, d, generator=g) * 0.1
    k = torch.randn(1, h_kv, length, d, generator=g) * 0.1
    codes = torch.zeros(length, dtype=torch.int8)
    codes[3:9] = IMAGE  # no VIDEO token at all
    k[0, 0, 3:9, 0] = 10.0
    q[0, 0, :, 0] = 10.0  # head 0 attends (almost) only to the image keys
    out = compute_layer_stats(q, k, codes, StatsRequest(window=6, modality_mass=True), 1.0)
    ref = reference_stats(q[0], k[0], codes, 6, 1.0)
    assert_close(out.modality_mass, ref["modality_mass"], "modality_mass")
    assert float(out.modality_mass[:, VIDEO].abs().max()) == 0.0
    assert float(out.modality_mass[0, IMAGE]) > 0.999
    assert float(out.modality_mass[1, IMAGE]) < 0.9


@pytest.mark.parametrize(
    "request_,present,absent",
    [
        (StatsRequest(window=8), ["window_scores"], ["column_sums", "modality_mass", "entropy", "full_entropy"]),
        (
            StatsRequest(column_sums=True),
            ["column_sums"],
            ["window_scores", "modality_mass", "entropy", "full_entropy"],
        ),
        (
            StatsRequest(full_entropy=True),
            ["full_entropy"],
            ["window_scores", "column_sums", "modality_mass", "entropy"],
        ),
        (
            StatsRequest(window=8, entropy=True),
            ["window_scores", "entropy"],
            ["column_sums", "modality_mass", "full_entropy"],
        ),
    ],
)
def test_only_requested_statistics_are_computed(request_, present, absent):
    q, k, codes = make_inputs(7, 4, 2, 37, 8)
    out = compute_layer_stats(q, k, codes, request_, 8**-0.5)
    ref = reference_stats(q[0], k[0], codes, max(1, min(out.window, 37)), 8**-0.5)
    for name in present:
        assert_close(getattr(out, name), ref[name], name)
    for name in absent:
        assert getattr(out, name) is None, f"{name} was not requested"


def test_window_statistics_use_the_reported_window_when_request_window_is_zero():
    """entropy / modality_mass without a window: whatever window is used must be reported and consistent."""
    q, k, codes = make_inputs(8, 4, 2, 37, 8)
    out = compute_layer_stats(q, k, codes, StatsRequest(entropy=True, modality_mass=True), 8**-0.5)
    assert 1 <= out.window <= 37
    ref = reference_stats(q[0], k[0], codes, out.window, 8**-0.5)
    assert_close(out.entropy, ref["entropy"], "entropy")
    assert_close(out.modality_mass, ref["modality_mass"], "modality_mass")
    assert_close(out.window_scores, ref["window_scores"], "window_scores")


def test_request_union_and_stats_to():
    a = StatsRequest(window=8, entropy=True)
    b = StatsRequest(window=32, column_sums=True)
    c = a | b
    assert c == StatsRequest(window=32, column_sums=True, entropy=True)
    assert (b | a) == c
    assert StatsRequest().empty and not StatsRequest(window=1).empty and not StatsRequest(column_sums=True).empty
    s = LayerStats(window=3, window_scores=torch.ones(2, 4))
    moved = s.to("cpu")
    assert moved.window == 3 and torch.equal(moved.window_scores, s.window_scores) and moved.column_sums is None


def test_rejects_batch_and_length_mismatch():
    q, k, codes = make_inputs(9, 4, 2, 10, 8)
    with pytest.raises(ValueError):
        compute_layer_stats(torch.cat([q, q]), torch.cat([k, k]), codes, StatsRequest(window=4), 1.0)
    with pytest.raises(ValueError):
        compute_layer_stats(q[:, :, :5], k, codes, StatsRequest(window=4), 1.0)


@pytest.mark.parametrize(
    "request_",
    [
        StatsRequest(),
        StatsRequest(window=4),
        StatsRequest(column_sums=True),
        StatsRequest(full_entropy=True),
        StatsRequest(entropy=True),
        StatsRequest(modality_mass=True),
    ],
    ids=["nothing", "window", "column_sums", "full_entropy", "entropy", "modality_mass"],
)
def test_empty_means_nothing_to_compute(request_):
    """``request.empty`` (the driver skips the statistics pass when it is true) must be false for any
    request that makes :func:`compute_layer_stats` produce a statistic."""
    q, k, codes = make_inputs(10, 4, 2, 12, 8)
    out = compute_layer_stats(q, k, codes, request_, 8**-0.5)
    produced = [
        name
        for name in ("window_scores", "column_sums", "modality_mass", "entropy", "full_entropy")
        if getattr(out, name) is not None
    ]
    assert request_.empty == (not produced), f"empty={request_.empty} but computed {produced}"


@pytest.mark.parametrize("h_q,h_kv,block", [(4, 2, None), (6, 3, 5), (4, 4, 7)])
def test_all_query_pass_gives_the_causal_attention_output(monkeypatch, h_q, h_kv, block):
    """Given the values, the all-query pass returns the layer's attention output: it equals SDPA's causal
    attention (GQA by contiguous groups), in the attention function's ``[1, L, H_q, d]`` layout."""
    q, k, codes = make_inputs(5, h_q, h_kv, 37, 8)
    v = torch.randn(1, h_kv, 37, 8, generator=torch.Generator().manual_seed(6))
    if block is not None:
        monkeypatch.setattr(stats_mod, "MAX_BLOCK_ELEMENTS", block * h_q * 37)
    stats = compute_layer_stats(q, k, codes, StatsRequest(column_sums=True), 8**-0.5, value=v)
    group = h_q // h_kv
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True, scale=8**-0.5
    )
    torch.testing.assert_close(stats.attention_output, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # window-only statistics do not run over every query: no output, the caller runs its own attention
    assert compute_layer_stats(q, k, codes, StatsRequest(window=8), 8**-0.5, value=v).attention_output is None
