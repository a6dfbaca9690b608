"""Regressions of the session: mixed compressed / uncompressed layers, unsupported attention variants, timing."""

from __future__ import annotations

import copy

import pytest
import torch

import mmkv
from mmkv.cache.layers import DenseLayer
from mmkv.methods.meda import MEDA
from mmkv.models.base import UnsupportedModelError, resolve_text_model
from mmkv.runtime.driver import compressed_run
from mmkv.runtime.session import Session, unsupported_attention
from mmkv.testing.tiny import build_tiny
from mmkv.trace.core import Packed, Trace
from oracle import FixedPlan

torch.set_num_threads(2)


def _full_answer(model, processor, prepared, n: int) -> list[int]:
    return mmkv.generate(model, processor, None, method="full", max_new_tokens=n, prepared=prepared).token_ids


def test_question_forward_after_compressing_layer_0_only(tiny_prepared) -> None:
    """B1: layer 0 compressed, layer 1 kept whole (a plain DynamicLayer); the multi-token question
    forward used to build layer 1's mask from layer 0's compressed size and crash."""
    model, processor, prepared = tiny_prepared()
    context = prepared.context_length
    assert context < prepared.length
    kept = torch.arange(context // 2, context)
    method = FixedPlan(kept={0: [kept.clone() for _ in range(model.config.get_text_config().num_key_value_heads)]})
    result = mmkv.generate(
        model, processor, None, method=method, budget=1.0, max_new_tokens=3, query_aware=False, prepared=prepared
    )
    budgets = [layer.budgets for layer in result.trace.layers]
    assert budgets[0] == [kept.numel()] * len(budgets[0]) and budgets[1] == [context] * len(budgets[1])
    # Same logits as when layer 1 is a preallocated DenseLayer (reserve > 0: every layer is wrapped).
    logits = []
    for reserve in (0, 4):
        session = Session(
            model, method, 1.0, modality=prepared.modality.prefix(context), query_aware=False, reserve=reserve
        )
        with compressed_run(model, prepared, session, context) as step:
            logits.append(torch.stack([step(), step(int(step().argmax()))]))
        assert isinstance(session.cache.layers[1], DenseLayer) == (reserve > 0)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_question_forward_with_nothing_compressed_matches_full(tiny_prepared) -> None:
    """A keep-all plan in every layer (no layer compressed): the plain path, token-identical to Full."""
    model, processor, prepared = tiny_prepared()
    result = mmkv.generate(
        model, processor, None, method=FixedPlan(), budget=1.0, max_new_tokens=4, query_aware=False, prepared=prepared
    )
    assert result.token_ids == _full_answer(model, processor, prepared, 4)


def test_meda_query_agnostic_when_a_layer_gets_its_full_length(tiny_prepared) -> None:
    """B1 as MEDA reaches it: a peaked entropy softmax gives one layer S_l = L (kept whole)."""
    model, processor, prepared = tiny_prepared(n_images=3, size=128)
    layers = mmkv.models.base.resolve_text_model(model).layers
    with torch.no_grad():  # layer 0 peaked (entropy ~0), layer 1 uniform (q = 0: maximal entropy)
        layers[0].self_attn.q_proj.weight.mul_(50.0)
        layers[1].self_attn.q_proj.weight.zero_()
        layers[1].self_attn.q_proj.bias.zero_()
    method = MEDA(clamp=None, head_average="entropy")
    result = mmkv.generate(
        model, processor, None, method=method, budget=0.8, max_new_tokens=3, query_aware=False, prepared=prepared
    )
    layers = result.trace.layers
    span = result.trace.span_length
    assert layers[1].info["layer_budget"] == span and layers[1].budgets == [span] * len(layers[1].budgets)
    assert max(layers[0].budgets) < span
    assert len(result.token_ids) >= 1


def _rebuilt(family: str, **text_overrides):
    """The tiny model of ``family`` rebuilt from its config with ``text_overrides`` on the text config."""
    model, _ = build_tiny(family)
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    for name, value in text_overrides.items():
        setattr(text, name, value)
    return type(model)(config).eval()


def test_sliding_window_model_is_refused_at_session_creation() -> None:
    layers = build_tiny("qwen2_vl")[0].config.get_text_config().num_hidden_layers
    model = _rebuilt(
        "qwen2_vl",
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
        layer_types=["full_attention"] + ["sliding_attention"] * (layers - 1),
    )
    with pytest.raises(UnsupportedModelError, match="sliding-window attention.*window 16"):
        Session(model, "snapkv", 0.3)
    with pytest.raises(UnsupportedModelError, match="sliding-window"), mmkv.compress(model, "h2o", 0.3):
        pass
    # The model is left as it was (the attention implementation is switched only after the check).
    assert model.config._attn_implementation != "mmkv"


def test_softcapped_attention_is_refused_at_session_creation() -> None:
    model = _rebuilt("qwen2_vl", attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedModelError, match="soft-capped"):
        Session(model, "full", 1.0)


def test_plain_models_are_accepted() -> None:
    assert unsupported_attention(resolve_text_model(build_tiny("qwen2_vl")[0]), None) is None


def test_trace_keeps_positions_and_merges_packed_until_read(tiny_prepared) -> None:
    """Kept lists and merge records stay compact CPU tensors in the trace and become lists on first read."""
    model, processor, prepared = tiny_prepared()
    result = mmkv.generate(model, processor, None, method="lookm", budget=0.3, max_new_tokens=2, prepared=prepared)
    trace = result.trace
    layer = trace.layers[0]
    raw = layer.__dict__["_kept"]
    assert isinstance(raw, Packed) and all(t.dtype == torch.int32 and t.device.type == "cpu" for t in raw.value)
    assert isinstance(layer.__dict__["_merges"], Packed)
    budgets = layer.budgets
    assert isinstance(layer.__dict__["_kept"], Packed), "budgets must not materialise the kept lists"
    kept = layer.kept
    assert isinstance(kept[0], list) and all(isinstance(p, int) for p in kept[0]) and [len(k) for k in kept] == budgets
    assert layer.kept is kept  # converted once
    merges = layer.merges
    assert set(merges[0]) == {"source", "target", "similarity"} and all(isinstance(p, int) for p in merges[0]["source"])
    again = Trace.from_json(trace.to_json())
    assert [l.kept for l in again.layers] == [l.kept for l in trace.layers]
    assert [l.merges for l in again.layers] == [l.merges for l in trace.layers]
    assert again.layers[1].entropy == pytest.approx(trace.layers[1].entropy)
