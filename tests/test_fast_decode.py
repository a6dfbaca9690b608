"""The fused decode paths against per-head references: ragged attention, H2O eviction, HybridKV retrieval.

Also checks what makes them fast: no host sync in a decode step, a number of aten ops that does not
grow with the number of KV heads, and HybridKV copying only the chunks it does not hold yet.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmkv.cache.layers as cache_mod
from mmkv.cache.hybrid import build_hybrid_layer
from mmkv.cache.layers import FlatPrefix, H2ODecodeLayer, RaggedLayer, build_layer
from mmkv.methods.base import LayerPlan
from mmkv.runtime.opcount import OpCounter


def per_head_reference(query, head_keys, head_values, tail_keys, tail_values, scale):
    """Per KV head, in float64: softmax over that head's prefix + the bottom-right causal tail."""
    h_kv, q_len, t = tail_keys.shape[1], query.shape[2], tail_keys.shape[2]
    group = query.shape[1] // h_kv
    causal = torch.ones(q_len, t, dtype=torch.bool).tril(t - q_len)
    outs = []
    for h in range(h_kv):
        q = query[0, h * group : (h + 1) * group].double()  # [G, q, d]
        keys = torch.cat([head_keys[h], tail_keys[0, h]]).double()
        values = torch.cat([head_values[h], tail_values[0, h]]).double()
        visible = torch.cat([torch.ones(q_len, head_keys[h].shape[0], dtype=torch.bool), causal], dim=1)
        s = (q @ keys.T * scale).masked_fill(~visible, float("-inf"))
        outs.append(torch.softmax(s, -1) @ values)
    return torch.cat(outs).transpose(0, 1).unsqueeze(0)  # [1, q, H_q, d]


def _ragged_case(budgets, h_q, q_len, d=16, dtype=torch.float32, seed=0, tail=5):
    g = torch.Generator().manual_seed(seed)
    h_kv = len(budgets)
    head_keys = [torch.randn(n, d, generator=g).to(dtype) for n in budgets]
    head_values = [torch.randn(n, d, generator=g).to(dtype) for n in budgets]
    offsets = [0]
    for n in budgets:
        offsets.append(offsets[-1] + n)
    layer = RaggedLayer(torch.cat(head_keys), torch.cat(head_values), torch.arange(offsets[-1]), offsets, 100)
    tail_k = torch.randn(1, h_kv, tail + q_len, d, generator=g).to(dtype)
    tail_v = torch.randn(1, h_kv, tail + q_len, d, generator=g).to(dtype)
    query = torch.randn(1, h_q, q_len, d, generator=g).to(dtype)
    return layer, head_keys, head_values, tail_k, tail_v, query


CASES = [  # (per-head budgets, query heads)
    ([7, 3, 12, 5], 8),
    ([0, 9, 4, 0], 8),  # empty heads
    ([1, 40, 2, 17, 33, 8, 0, 25], 16),  # uneven, 8 KV heads
    ([6, 6, 11], 3),  # MHA
    ([13], 7),  # one KV head, GQA 7
]


@pytest.mark.parametrize("padded", [False, True], ids=["masked_flat", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("budgets,h_q", CASES)
def test_ragged_attention_matches_per_head_reference(budgets, h_q, q_len, dtype, padded, monkeypatch) -> None:
    monkeypatch.setattr(cache_mod, "MASKED_PREFIX_MAX_WORK", -1 if padded else 10**9)
    layer, hk, hv, tk, tv, q = _ragged_case(budgets, h_q, q_len, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    got = layer.attend(None, q, tk, tv, scaling=scale)
    want = per_head_reference(q, hk, hv, tk, tv, scale)
    assert got.shape == want.shape and got.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got.double(), want, **tol)


def test_the_shape_rule_picks_the_padded_path_for_many_rows() -> None:
    layer, *_, tk, tv, q = _ragged_case([5, 9], 4, 1)
    with OpCounter() as few:
        layer.attend(None, q, tk, tv, scaling=0.25)
    big = torch.randn(1, 4, cache_mod.MASKED_PREFIX_MAX_WORK, q.shape[-1])
    tail = torch.randn(1, 2, big.shape[2], q.shape[-1])
    with OpCounter() as many:
        layer.attend(None, big, tail, tail, scaling=0.25)
    assert few.ops["index_select"] == 0 and many.ops["index_select"] == 2


def _decode_ops(h_kv: int, q_len: int = 1) -> OpCounter:
    budgets = [5 + 3 * h for h in range(h_kv)]
    layer, *_, tk, tv, q = _ragged_case(budgets, 2 * h_kv, q_len)
    layer.attend(None, q, tk, tv, scaling=0.25)  # the padded path builds its index once, on first use
    with OpCounter() as counter:
        layer.attend(None, q, tk, tv, scaling=0.25)
    return counter


@pytest.mark.parametrize("padded", [False, True], ids=["masked_flat", "padded"])
def test_ragged_decode_ops_do_not_grow_with_kv_heads_and_never_sync(padded, monkeypatch) -> None:
    monkeypatch.setattr(cache_mod, "MASKED_PREFIX_MAX_WORK", -1 if padded else 10**9)
    counts = [_decode_ops(h) for h in (2, 4, 8, 32)]
    assert len({c.total for c in counts}) == 1, [c.total for c in counts]
    assert counts[0].total <= 50 and all(c.syncs == 0 for c in counts)  # views and metadata ops included
    assert counts[0].ops["_to_copy"] == 0  # fp32 cache: nothing is cast
    multi = [_decode_ops(h, q_len=3) for h in (2, 8)]
    assert multi[0].total == multi[1].total and multi[0].syncs == 0


def test_bf16_cache_is_not_upcast() -> None:
    layer, *_, tk, tv, q = _ragged_case([30, 10, 20, 5], 8, 1, dtype=torch.bfloat16)
    seen = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("_to_copy"):
                seen.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Casts():
        layer.attend(None, q, tk, tv, scaling=0.25)
    # only the score tensor goes to fp32 and the probabilities back: [H_kv, G*q, n + t], never the [N, d] prefix
    assert seen and all(shape[-1] != q.shape[-1] for shape in seen)


def test_flat_prefix_padded_index_hides_padding_and_other_heads() -> None:
    keys = torch.arange(10.0)[:, None]
    prefix = FlatPrefix(keys, keys, [0, 2, 2], [2, 0, 8])
    index, beyond = prefix.padded_index()
    assert index.view(3, 8)[0, :2].tolist() == [0, 1] and index.view(3, 8)[2].tolist() == list(range(2, 10))
    assert beyond[:, 0].sum(-1).tolist() == [6, 8, 0]
    assert prefix.hide[:, 0].sum(-1).tolist() == [8, 10, 2]


# ---- H2O decode-time eviction -----------------------------------------------------------------


def _h2o_reference(keys, values, positions, scores, steps, capacity, recent, scale):
    """The original per-head H2O loop (Zhang et al. 2023, Alg. 1) on age-ordered storage."""
    keys, values, positions, scores = keys.clone(), values.clone(), positions.clone(), scores.clone()
    h_kv, log, outs = keys.shape[1], [], []
    for q, new_k, new_v, pos in steps:
        keys, values = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
        positions = torch.cat([positions, pos.expand(h_kv, -1)], 1)
        scores = torch.cat([scores, scores.new_zeros(h_kv, new_k.shape[2])], 1)
        group, q_len, n = q.shape[1] // h_kv, q.shape[2], keys.shape[2]
        causal = torch.ones(q_len, n, dtype=torch.bool).tril(n - q_len)
        out = []
        for h in range(h_kv):
            s = (q[0, h * group : (h + 1) * group].double() @ keys[0, h].double().T * scale).masked_fill(
                ~causal, float("-inf")
            )
            p = torch.softmax(s, -1)
            scores[h] += p.sum(1).mean(0).float()
            out.append(p @ values[0, h].double())
        outs.append(torch.cat(out).transpose(0, 1)[None])
        while keys.shape[2] > capacity and keys.shape[2] - recent > 0:
            n = keys.shape[2]
            drop = scores[:, : n - recent].argmin(-1)
            log.append(positions[torch.arange(h_kv), drop].tolist())
            keep = torch.ones_like(scores, dtype=torch.bool)
            keep[torch.arange(h_kv), drop] = False
            idx = keep.nonzero()[:, 1].view(h_kv, n - 1)
            keys = keys.gather(2, idx[None, :, :, None].expand(1, -1, -1, keys.shape[-1]))
            values = values.gather(2, idx[None, :, :, None].expand(1, -1, -1, values.shape[-1]))
            positions, scores = positions.gather(1, idx), scores.gather(1, idx)
    return outs, log, positions


@pytest.mark.parametrize("recent", [0, 2])
def test_h2o_fused_decode_equals_the_per_head_loop(recent: int) -> None:
    g = torch.Generator().manual_seed(1)
    h_kv, group, d, n, length = 3, 2, 8, 7, 30
    keys, values = torch.randn(1, h_kv, n, d, generator=g), torch.randn(1, h_kv, n, d, generator=g)
    positions = torch.stack([torch.randperm(length, generator=g)[:n].sort().values for _ in range(h_kv)])
    scores = torch.rand(h_kv, n, generator=g) * 3
    layer = H2ODecodeLayer(keys, values, positions, length, capacity=n, recent=recent, scores=scores)
    steps, logical = [], length
    for q_len in (1, 1, 3, 1, 2, 1):
        steps.append(
            (
                torch.randn(1, h_kv * group, q_len, d, generator=g),
                torch.randn(1, h_kv, q_len, d, generator=g),
                torch.randn(1, h_kv, q_len, d, generator=g),
                torch.arange(logical, logical + q_len)[None],
            )
        )
        logical += q_len
    want_out, want_log, want_pos = _h2o_reference(keys, values, positions, scores, steps, n, recent, d**-0.5)
    for (q, nk, nv, _), want in zip(steps, want_out):
        got = layer.attend(None, q, *layer.update(nk, nv), scaling=d**-0.5)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert layer.keys.shape[2] == n
    assert layer.evictions == want_log
    assert [p.tolist() for p in layer.kept_positions()] == [sorted(p) for p in want_pos.tolist()]
    assert layer.physical_bytes() == 2 * h_kv * (n + 1) * d * 4  # one slot of room, never more


def test_h2o_decode_step_has_no_sync_and_no_growth() -> None:
    g = torch.Generator().manual_seed(2)
    h_kv, d, n = 4, 8, 6
    layer = build_layer(
        *(torch.randn(1, h_kv, 12, d, generator=g) for _ in range(2)),
        LayerPlan(
            kept=[torch.arange(n)] * h_kv,
            decode={
                "policy": "h2o",
                "capacity": n,
                "recent": 2,
                "scores": [torch.rand(n, generator=g) for _ in range(h_kv)],
            },
        ),
    )
    before = layer.physical_bytes()
    for _ in range(3):
        with OpCounter() as counter:
            layer.attend(
                None,
                torch.randn(1, 2 * h_kv, 1, d, generator=g),
                *layer.update(torch.randn(1, h_kv, 1, d), torch.randn(1, h_kv, 1, d)),
                scaling=d**-0.5,
            )
        assert counter.syncs == 0 and counter.ops["cat"] == 0
    assert layer.physical_bytes() == before and len(layer.evictions) == 3


# ---- HybridKV retrieval ---------------------------------------------------------------------------


def _hybrid(length=80, d=8, chunk=4, top=3, sinks=2, recent=6, seed=0, scoring="mean", pairs=2):
    """KV heads alternate static (uneven budgets) and dynamic: 0, 2, ... static; 2 query heads per KV head."""
    g = torch.Generator().manual_seed(seed)
    h_kv = 2 * pairs
    keys, values = torch.randn(1, h_kv, length, d, generator=g), torch.randn(1, h_kv, length, d, generator=g)
    kept = [torch.arange(0, length, 3 + 4 * (h // 2)) if h % 2 == 0 else torch.arange(length) for h in range(h_kv)]
    plan = LayerPlan(
        kept=kept,
        decode={
            "policy": "hybrid",
            "head_types": ["static", "dynamic"] * pairs,
            "sinks": sinks,
            "recent": recent,
            "chunk_size": chunk,
            "top_chunks": top,
            "scoring": scoring,
            "offload": True,
            "initial_chunks": None,
        },
    )
    return build_hybrid_layer(keys, values, plan), keys, values, kept


def test_hybrid_copies_only_changed_chunks_and_logs_each_step(monkeypatch) -> None:
    layer, keys, values, kept = _hybrid()
    copied = []
    real = torch.Tensor.index_copy_

    def spy(self, dim, index, source):
        copied.append(index.numel())
        return real(self, dim, index, source)

    monkeypatch.setattr(torch.Tensor, "index_copy_", spy)
    d, c = 8, layer.chunk_size
    for step in range(4):
        n_chunks = layer.chunk_starts.numel()
        q = torch.randn(1, 8, 1, d) * 0.01
        tail_k, tail_v = layer.update(torch.randn(1, 4, 1, d), torch.randn(1, 4, 1, d))
        tail_len = step + 1
        before = layer.slot_chunks.clone()
        copied.clear()
        out = layer.attend(None, q, tail_k, tail_v, scaling=d**-0.5)
        chosen = layer.retrievals[-1]
        assert len(layer.retrievals) == step + 1 and all(len(ids) == 3 and ids == sorted(ids) for ids in chosen)
        assert all(0 <= i < n_chunks for ids in chosen for i in ids)
        new = sum(len(set(ids) - set(before[j].tolist())) for j, ids in enumerate(chosen))
        assert copied == [new * c, new * c]  # keys and values: only the chunks not held before
        assert [sorted(r) for r in layer.slot_chunks.tolist()] == chosen
        # attention over exactly the static kept rows / sinks ∪ chosen chunks ∪ recent, + tail
        head_k, head_v = [], []
        for h in range(4):
            if h in layer.dynamic_heads:
                pos = torch.tensor(layer.kept_positions()[h][:-tail_len].tolist())
            else:
                pos = kept[h]
            head_k.append(keys[0, h, pos])
            head_v.append(values[0, h, pos])
        want = per_head_reference(q, head_k, head_v, tail_k, tail_v, d**-0.5)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # the diff itself: the same set copies nothing; one new chunk in one head copies one chunk
    same = torch.tensor(layer.retrievals[-1])
    copied.clear()
    layer._load(same)
    assert copied == [0, 0]
    changed = same.clone()
    changed[1, 0] = next(i for i in range(layer.chunk_starts.numel()) if i not in same[1].tolist())
    copied.clear()
    layer._load(changed.sort(-1).values)
    assert copied == [c, c] and [sorted(r) for r in layer.slot_chunks.tolist()] == changed.sort(-1).values.tolist()


def test_hybrid_retrieval_log_matches_an_independent_top_k() -> None:
    layer, *_ = _hybrid(seed=3)
    (mean,) = layer.summaries
    d, g = 8, torch.Generator().manual_seed(7)
    want = []
    for _ in range(5):
        q = torch.randn(1, 8, 1, d, generator=g)
        step = []
        for j, h in enumerate(layer.dynamic_heads):
            scores = (q[0, 2 * h : 2 * h + 2, 0] @ mean[j].T).amax(0).tolist()
            best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:3]
            step.append(sorted(best))
        want.append(step)
        layer.attend(None, q, *layer.update(torch.randn(1, 4, 1, d), torch.randn(1, 4, 1, d)), scaling=d**-0.5)
    assert layer.retrievals == want


@pytest.mark.parametrize("padded", [False, True], ids=["masked_flat", "padded"])
def test_hybrid_decode_step_never_syncs_and_ops_do_not_grow_with_heads(padded, monkeypatch) -> None:
    monkeypatch.setattr(cache_mod, "MASKED_PREFIX_MAX_WORK", -1 if padded else 10**9)
    d, totals = 8, []
    for pairs in (2, 8):
        layer, *_ = _hybrid(pairs=pairs)
        h_kv = 2 * pairs
        for _step in range(3):
            tail = layer.update(torch.randn(1, h_kv, 1, d), torch.randn(1, h_kv, 1, d))
            q = torch.randn(1, 2 * h_kv, 1, d)
            with OpCounter() as counter:
                layer.attend(None, q, *tail, scaling=d**-0.5)
            assert counter.syncs == 0, counter.ops
            assert counter.ops["cat"] == 1  # the score blocks; the tail is appended in place
        totals.append(counter.total)
        assert len(layer.retrievals) == 3
    assert totals[0] == totals[1] and totals[0] <= 130, totals  # views and metadata ops included


def test_hybrid_partial_last_chunk_rows_are_hidden() -> None:
    # L = 63, sinks 2, recent 6: the middle span [2, 57) ends with a 3-token chunk (id 13)
    layer, keys, values, kept = _hybrid(length=63, top=2)
    assert layer.chunk_lengths.tolist()[-1] == 3
    layer._load(torch.tensor([[0, 13], [5, 13]]))
    d = 8
    q = torch.randn(1, 8, 2, d)
    tail_k, tail_v = layer.update(torch.randn(1, 4, 2, d), torch.randn(1, 4, 2, d))
    layer.retrieve = lambda query: None  # attend over the chunks loaded above
    out = layer.attend(None, q, tail_k, tail_v, scaling=d**-0.5)
    fixed = [0, 1, *range(57, 63)]
    dyn = {1: sorted(fixed + [2, 3, 4, 5, 54, 55, 56]), 3: sorted(fixed + [22, 23, 24, 25, 54, 55, 56])}
    assert [layer.kept_positions()[h].tolist()[:-2] for h in (1, 3)] == [dyn[1], dyn[3]]
    heads = [torch.tensor(dyn[h]) if h in dyn else kept[h] for h in range(4)]
    want = per_head_reference(
        q,
        [keys[0, h, p] for h, p in enumerate(heads)],
        [values[0, h, p] for h, p in enumerate(heads)],
        tail_k,
        tail_v,
        d**-0.5,
    )
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert layer.overhead_bytes() == layer.summary_bytes() + 2 * 1 * (2 * d * 4)  # one unused row per dynamic head


def test_hybrid_reserve_is_written_in_place() -> None:
    from mmkv.cache.hybrid import build_hybrid_layer as build

    layer, keys, values, kept = _hybrid()
    plan = LayerPlan(
        kept=kept,
        decode={
            "policy": "hybrid",
            "head_types": ["static", "dynamic", "static", "dynamic"],
            "sinks": 2,
            "recent": 6,
            "chunk_size": 4,
            "top_chunks": 3,
            "scoring": "mean",
            "offload": True,
            "initial_chunks": None,
        },
    )
    fast = build(keys, values, plan, reserve=4)
    assert fast.physical_bytes() == layer.physical_bytes() + 2 * 4 * 4 * 8 * 4
    for _ in range(3):
        nk, nv, q = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 8, 1, 8)
        a = layer.attend(None, q, *layer.update(nk, nv), scaling=0.3)
        with OpCounter() as counter:
            b = fast.attend(None, q, *fast.update(nk, nv), scaling=0.3)
        assert counter.ops["cat"] <= 1  # the score blocks only: the tail is written in place
        torch.testing.assert_close(a, b)
    assert fast.retrievals == layer.retrievals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host store, staged asynchronous copies")
def test_hybrid_on_cuda_matches_the_cpu_layer() -> None:
    cpu, keys, values, kept = _hybrid(seed=5)
    plan = LayerPlan(
        kept=[k.cuda() for k in kept],
        decode={
            "policy": "hybrid",
            "head_types": ["static", "dynamic"] * 2,
            "sinks": 2,
            "recent": 6,
            "chunk_size": 4,
            "top_chunks": 3,
            "scoring": "mean",
            "offload": True,
            "initial_chunks": None,
        },
    )
    gpu = build_hybrid_layer(keys.cuda(), values.cuda(), plan)
    assert gpu.host_keys.device.type == "cpu" and gpu.host_keys.is_pinned()
    g = torch.Generator().manual_seed(8)
    for _ in range(4):
        nk, nv, q = (
            torch.randn(1, 4, 1, 8, generator=g),
            torch.randn(1, 4, 1, 8, generator=g),
            torch.randn(1, 8, 1, 8, generator=g),
        )
        a = cpu.attend(None, q, *cpu.update(nk, nv), scaling=0.3)
        b = gpu.attend(None, q.cuda(), *gpu.update(nk.cuda(), nv.cuda()), scaling=0.3)
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    assert gpu.retrievals == cpu.retrievals


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize(
    "budgets,h_q,block",
    [
        ([300, 200, 150, 90], 8, 64),  # blocks span two heads; leftover rows
        ([300, 0, 150, 90], 8, 64),  # an empty head
        ([130, 70, 64, 600, 80, 99, 65, 300], 16, 64),  # a head exactly one block long
        ([12, 40, 9], 6, 8),  # small blocks, many straddling
    ],
)
def test_blocked_decode_path_matches_per_head_reference(budgets, h_q, block, q_len, dtype, monkeypatch) -> None:
    """Long prefixes are scored block by block (each block against at most two heads' queries)."""
    monkeypatch.setattr(cache_mod, "BLOCKED_MIN_ROWS", 0)
    monkeypatch.setattr(cache_mod, "BLOCK_ROWS", block)
    layer, hk, hv, tk, tv, q = _ragged_case(budgets, h_q, q_len, dtype=dtype)
    assert layer.prefix.block_plan(block) is not None
    scale = q.shape[-1] ** -0.5
    with OpCounter() as counter:
        got = layer.attend(None, q, tk, tv, scaling=scale)
    assert counter.ops["scatter_reduce_"] == 1 and counter.syncs == 0  # the blocked path ran, without a host sync
    want = per_head_reference(q, hk, hv, tk, tv, scale)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got.double(), want, **tol)


def test_blocked_path_needs_every_head_at_least_a_block_long() -> None:
    layer, *_ = _ragged_case([300, 20, 150], 6, 1)
    assert layer.prefix.block_plan(64) is None and layer.prefix.block_plan(16) is not None
