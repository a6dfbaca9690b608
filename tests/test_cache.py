"""The compressed cache layers on synthetic tensors: layout, bytes, attention, decode eviction."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mmkv.cache.layers import (
    BatchSizeError,
    DenseLayer,
    H2ODecodeLayer,
    RaggedLayer,
    apply_plan,
    build_layer,
    cache_bytes,
    kept_positions,
)
from mmkv.methods.base import LayerPlan

H_KV, GROUP, D, L = 2, 2, 8, 20


class _Module(torch.nn.Module):
    """Stands in for a decoder attention module: sdpa reads ``num_key_value_groups`` and ``is_causal``."""

    num_key_value_groups = GROUP
    is_causal = True


def _full(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H_KV, L, D, generator=g).to(dtype)
    v = torch.randn(1, H_KV, L, D, generator=g).to(dtype)
    return k, v


def _naive_attention(q, k_heads, scale):
    """Reference: per KV head, softmax over that head's visible keys (all prefix + causal tail)."""
    outs = []
    for h in range(H_KV):
        qh = q[0, h * GROUP : (h + 1) * GROUP].double()  # [G, q, d]
        kh, vh, mask = k_heads[h]
        s = qh @ kh.double().T * scale
        s = s.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(s, -1) @ vh.double())
    return torch.cat(outs).transpose(0, 1).unsqueeze(0)  # [1, q, H_q, d]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("q_len", [1, 3])
def test_layer_attention_matches_naive(ragged: bool, q_len: int) -> None:
    k, v = _full()
    kept = [torch.tensor([0, 3, 5, 7, 11, 19]), torch.tensor([1, 2, 3, 18, 19] if ragged else [1, 2, 3, 17, 18, 19])]
    layer = build_layer(k, v, LayerPlan(kept=kept))
    assert isinstance(layer, RaggedLayer if ragged else DenseLayer)
    g = torch.Generator().manual_seed(5)
    new_k, new_v = torch.randn(1, H_KV, q_len, D, generator=g), torch.randn(1, H_KV, q_len, D, generator=g)
    q = torch.randn(1, H_KV * GROUP, q_len, D, generator=g)
    rk, rv = layer.update(new_k, new_v)
    got = layer.attend(_Module(), q, rk, rv, scaling=D**-0.5)
    heads = []
    for h in range(H_KV):
        kh = torch.cat([k[0, h, kept[h]], new_k[0, h]])
        vh = torch.cat([v[0, h, kept[h]], new_v[0, h]])
        n = kept[h].numel()
        mask = torch.ones(q_len, n + q_len, dtype=torch.bool)
        mask[:, n:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        heads.append((kh, vh, mask))
    want = _naive_attention(q, heads, D**-0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert layer.get_seq_length() == L + q_len  # logical length, not the physical one
    assert [p.tolist() for p in layer.kept_positions()] == [
        kept[h].tolist() + list(range(L, L + q_len)) for h in range(H_KV)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_physical_bytes_equal_kept_tokens_times_bytes_per_token(dtype) -> None:
    k, v = _full(dtype=dtype)
    per_token = 2 * D * torch.tensor([], dtype=dtype).element_size()
    cache = DynamicCache()
    cache.update(k, v, 0)
    cache.update(k.clone(), v.clone(), 1)
    assert cache_bytes(cache) == 2 * H_KV * L * per_token
    kept0 = [torch.arange(0, 20, 4), torch.arange(0, 20, 2)]  # 5 and 10 tokens: ragged
    kept1 = [torch.arange(7), torch.arange(7)]
    apply_plan(cache, 0, LayerPlan(kept=kept0))
    apply_plan(cache, 1, LayerPlan(kept=kept1))
    assert cache_bytes(cache) == (5 + 10 + 7 + 7) * per_token
    assert [p.tolist() for p in kept_positions(cache, 0)] == [t.tolist() for t in kept0]
    # The full tensors are really gone: the ragged layer stores one flat block of 15 rows.
    assert cache.layers[0].prefix_keys.shape == (15, D)
    cache.update(torch.zeros(1, H_KV, 1, D, dtype=dtype), torch.zeros(1, H_KV, 1, D, dtype=dtype), 0)
    assert cache_bytes(cache) == (5 + 10 + 7 + 7 + 2) * per_token
    assert cache.get_seq_length(0) == L + 1


def test_keep_all_plan_leaves_layer_untouched() -> None:
    k, v = _full()
    cache = DynamicCache()
    cache.update(k, v, 0)
    before = cache.layers[0]
    apply_plan(cache, 0, LayerPlan.keep_all(H_KV, L))
    assert cache.layers[0] is before


def test_merged_contents_replace_gathered_ones() -> None:
    k, v = _full()
    kept = [torch.tensor([2, 4]), torch.tensor([1, 9])]
    new_keys = [torch.full((2, D), 7.0), torch.full((2, D), 8.0)]
    layer = build_layer(k, v, LayerPlan(kept=kept, keys=new_keys, values=[t + 1 for t in new_keys]))
    assert torch.equal(layer.keys[0, 0], new_keys[0]) and torch.equal(layer.values[0, 1], new_keys[1] + 1)


def test_bad_plans_and_batches_raise_clear_errors() -> None:
    k, v = _full()
    with pytest.raises(ValueError, match="out of range"):
        build_layer(k, v, LayerPlan(kept=[torch.tensor([0, L]), torch.tensor([0, 1])]))
    with pytest.raises(ValueError, match="KV heads"):
        build_layer(k, v, LayerPlan(kept=[torch.tensor([0])]))
    with pytest.raises(BatchSizeError, match="batch size 1"):
        build_layer(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), LayerPlan(kept=[torch.tensor([0])] * H_KV))
    layer = build_layer(k, v, LayerPlan(kept=[torch.tensor([0, 1])] * H_KV))
    with pytest.raises(BatchSizeError, match="num_beams=1"):
        layer.batch_repeat_interleave(2)
    with pytest.raises(BatchSizeError):
        layer.update(torch.zeros(2, H_KV, 1, D), torch.zeros(2, H_KV, 1, D))


def test_h2o_decode_layer_keeps_capacity_and_evicts_lowest_score() -> None:
    k, v = _full()
    kept = [torch.arange(6), torch.arange(6)]
    scores = [torch.tensor([5.0, 0.1, 3.0, 4.0, 2.0, 1.0]), torch.tensor([0.5, 6.0, 5.0, 4.0, 3.0, 2.0])]
    plan = LayerPlan(kept=kept, decode={"policy": "h2o", "capacity": 6, "recent": 2, "scores": scores})
    layer = build_layer(k, v, plan)
    assert isinstance(layer, H2ODecodeLayer)
    g = torch.Generator().manual_seed(3)
    rk, rv = layer.update(torch.randn(1, H_KV, 1, D, generator=g), torch.randn(1, H_KV, 1, D, generator=g))
    q = torch.randn(1, H_KV * GROUP, 1, D, generator=g)
    layer.attend(_Module(), q, rk, rv, scaling=D**-0.5)
    assert layer.keys.shape[-2] == 6  # back to capacity after the step
    # Head 0's lowest old score is position 1 (0.1 + a probability < 1 can't beat 2.0 etc. unless it grew);
    # compute the expectation from the accumulated scores the layer itself saw.
    assert layer.evictions[0][0] == 1 and layer.evictions[0][1] == 0
    assert 1 not in layer.positions[0].tolist() and 0 not in layer.positions[1].tolist()
    assert [p.tolist()[-1] for p in layer.kept_positions()] == [L, L]  # the new token stays (recent window)


@pytest.mark.parametrize("ragged", [False, True])
def test_reserved_room_is_written_in_place_then_grows(ragged: bool) -> None:
    k, v = _full()
    kept = [torch.tensor([0, 3, 5]), torch.tensor([1, 2] if ragged else [1, 2, 4])]
    plain = build_layer(k, v, LayerPlan(kept=kept))
    fast = build_layer(k, v, LayerPlan(kept=kept), reserve=2)
    per_token = 2 * D * 4
    assert fast.physical_bytes() == plain.physical_bytes() + 2 * H_KV * per_token  # room is memory held
    g = torch.Generator().manual_seed(9)
    for _step in range(3):  # two steps fit in the reserved room, the third grows the storage
        nk, nv = torch.randn(1, H_KV, 1, D, generator=g), torch.randn(1, H_KV, 1, D, generator=g)
        q = torch.randn(1, H_KV * GROUP, 1, D, generator=g)
        a = plain.attend(_Module(), q, *plain.update(nk, nv), scaling=D**-0.5)
        b = fast.attend(_Module(), q, *fast.update(nk, nv), scaling=D**-0.5)
        torch.testing.assert_close(a, b)
        assert [p.tolist() for p in fast.kept_positions()] == [p.tolist() for p in plain.kept_positions()]
    assert fast.physical_bytes() == plain.physical_bytes()  # room used up: both hold exactly the tokens
