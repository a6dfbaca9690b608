"""Multimodal statistics (question attention, MEDA cross-modal entropies) against naive loops."""

from __future__ import annotations

import math

import pytest
import torch

import mmkv.statistics.stats as stats_module
from mmkv.statistics.stats import StatsRequest, compute_layer_stats, question_positions

H_Q, H_KV, D = 4, 2, 8


def _setup(codes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = len(codes)
    q = torch.randn(1, H_Q, L, D, generator=g, dtype=torch.float64).float()
    k = torch.randn(1, H_KV, L, D, generator=g, dtype=torch.float64).float()
    return q, k, torch.tensor(codes, dtype=torch.int8)


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def _row(q, k, h, i, keys, scale):
    """Softmax of query i (head h) over the given key positions, in float64."""
    kv = h // (H_Q // H_KV)
    logits = [float(q[0, h, i].double() @ k[0, kv, j].double()) * scale for j in keys]
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return [x / sum(e) for x in e]


CODES = [0, 0, 1, 1, 1, 0, 2, 2, 0, 1, 0, 0, 0]  # text, image, text, video, text, image, question


def test_question_positions() -> None:
    assert question_positions(torch.tensor(CODES, dtype=torch.int8)).tolist() == [10, 11, 12]
    assert question_positions(torch.zeros(40, dtype=torch.int8), fallback=5).tolist() == [35, 36, 37, 38, 39]
    assert question_positions(torch.tensor([0, 1, 1], dtype=torch.int8), fallback=2).tolist() == [1, 2]


@pytest.mark.parametrize("block", [None, 2, 1])
def test_question_scores_match_naive(block: int | None, monkeypatch) -> None:
    """Question attention against naive loops, also with forced small query blocks (never more than
    ``MAX_BLOCK_ELEMENTS`` scores at once, whatever the question's length)."""
    sizes = []
    original = stats_module._logits

    def recording(qg, kt, scaling, out):
        sizes.append(out.numel())
        return original(qg, kt, scaling, out)

    monkeypatch.setattr(stats_module, "_logits", recording)
    if block:
        monkeypatch.setattr(stats_module, "MAX_BLOCK_ELEMENTS", H_Q * len(CODES) * block)
    q, k, codes = _setup(CODES)
    out = compute_layer_stats(q, k, codes, StatsRequest(question_scores=True), D**-0.5)
    assert len(sizes) == (-(-3 // block) if block else 1)
    assert max(sizes) <= stats_module.MAX_BLOCK_ELEMENTS
    assert out.question_queries == 3
    for h in range(H_Q):
        want = [0.0] * len(CODES)
        for i in (10, 11, 12):
            for j, p in zip(range(i + 1), _row(q, k, h, i, range(i + 1), D**-0.5)):
                want[j] += p
        assert out.question_scores[h].tolist() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("mode", ["causal", "full"])
@pytest.mark.parametrize("block", [None, 2])
def test_cross_modal_entropy_matches_naive(mode: str, block: int | None, monkeypatch) -> None:
    if block:
        monkeypatch.setattr(stats_module, "MAX_BLOCK_ELEMENTS", H_Q * 7 * block)
    q, k, codes = _setup(CODES, seed=3)
    out = compute_layer_stats(q, k, codes, StatsRequest(cross_modal=mode), D**-0.5)
    text = [i for i, c in enumerate(CODES) if c == 0]
    visual = [i for i, c in enumerate(CODES) if c != 0]
    for queries, keys, per_head, averaged in (
        (text, visual, out.cross_tv, out.cross_tv_head_mean),
        (visual, text, out.cross_vt, out.cross_vt_head_mean),
    ):
        rows = [(i, [j for j in keys if mode == "full" or j <= i]) for i in queries]
        rows = [(i, ks) for i, ks in rows if ks]
        for h in range(H_Q):
            want = sum(_entropy(_row(q, k, h, i, ks, D**-0.5)) for i, ks in rows) / len(rows)
            assert float(per_head[h]) == pytest.approx(want, abs=1e-5)
        mean_rows = []
        for i, ks in rows:
            dists = [_row(q, k, h, i, ks, D**-0.5) for h in range(H_Q)]
            mean_rows.append(_entropy([sum(d[j] for d in dists) / H_Q for j in range(len(ks))]))
        assert averaged == pytest.approx(sum(mean_rows) / len(mean_rows), abs=1e-5)


def test_cross_modal_needs_both_modalities_and_a_valid_mode() -> None:
    q, k, _ = _setup([0] * 6)
    out = compute_layer_stats(q, k, torch.zeros(6, dtype=torch.int8), StatsRequest(cross_modal="causal"), 0.3)
    assert out.cross_tv.abs().sum() == 0 and out.cross_tv_head_mean == 0.0
    with pytest.raises(ValueError, match="cross_modal"):
        StatsRequest(cross_modal="sideways")
