"""Independent references used by the oracle tests.

``masked_reference_logits`` runs the *uncompressed* model with a full DynamicCache and, at every
decode step, masks the evicted keys out of attention for the given layers and KV heads, using a
test-only attention function written from the definition of attention (not mmkv's code path).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mmkv.compat import cache_kwargs
from mmkv.methods.base import LayerContext, LayerPlan, Method

REFERENCE_ATTENTION = "mmkv_test_masked_reference"
_EVICTED: dict[int, list[torch.Tensor]] = {}  # layer -> per KV head bool [L] (True = evicted)
_MASK_FROM: list[int] = []  # [p]: in a multi-token forward, queries at positions >= p also lose the evicted keys


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain softmax attention; at decode (q_len == 1) evicted prompt keys get -inf for their KV head."""
    layer = getattr(module, "layer_idx", None)
    h_q, h_kv = query.shape[1], key.shape[1]
    group = h_q // h_kv
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scale  # [1, H_q, q, kv]
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask[..., -kv_len:], float("-inf"))
    elif attention_mask is not None:
        logits = logits + attention_mask[..., -kv_len:].float()
    elif q_len > 1 and getattr(module, "is_causal", True) and layer is not None:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        logits = logits.masked_fill(~causal, float("-inf"))
    if layer is not None and layer in _EVICTED and (q_len == 1 or _MASK_FROM):
        rows = torch.ones(q_len, dtype=torch.bool)
        if q_len > 1:
            rows = torch.arange(kv_len - q_len, kv_len) >= _MASK_FROM[0]
        for h, evicted in enumerate(_EVICTED[layer]):
            cols = torch.zeros(kv_len, dtype=torch.bool)
            cols[: evicted.numel()] = evicted
            hidden = rows[:, None] & cols[None, :]
            logits[:, h * group : (h + 1) * group] = logits[:, h * group : (h + 1) * group].masked_fill(
                hidden, float("-inf")
            )
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)
AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)


@contextmanager
def _attention(model, name):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _text_inputs_only(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items()}


@torch.inference_mode()
def masked_reference_logits(
    model, inputs: dict, kept: dict[int, list[torch.Tensor]], tokens: list[int]
) -> list[torch.Tensor]:
    """Next-token logits after prefill and after each teacher-forced token in ``tokens``.

    ``kept[layer][h]`` are the positions kept for KV head ``h``; every other prompt position of that
    layer/head is masked out for all decode queries. Layers not in ``kept`` see everything.
    """
    length = inputs["input_ids"].shape[1]
    _EVICTED.clear()
    for layer, heads in kept.items():
        masks = []
        for k in heads:
            evicted = torch.ones(length, dtype=torch.bool)
            evicted[k] = False
            masks.append(evicted)
        _EVICTED[layer] = masks
    _reset_rope(model)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with _attention(model, REFERENCE_ATTENTION):
        out = model(**inputs, **cache_kwargs(model, cache), use_cache=True)
        logits = [out.logits[0, -1].float()]
        for t in tokens:
            out = model(input_ids=torch.tensor([[t]]), **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[0, -1].float())
    _EVICTED.clear()
    return logits


@torch.inference_mode()
def masked_continuation_logits(model, inputs: dict, kept: dict[int, list[torch.Tensor]], span: int) -> torch.Tensor:
    """Last-position logits of one uncompressed forward over ``inputs`` (a whole conversation) in which every
    query at position ``>= span`` cannot see the prompt keys ``< span`` that ``kept`` evicted.

    This is a conversation whose first ``span`` tokens were prefilled and compressed to ``kept``, and whose
    later tokens (answers, later turns) were read against that compressed cache (docs/methods.md, "Multi-turn").
    """
    _EVICTED.clear()
    for layer, heads in kept.items():
        masks = []
        for k in heads:
            evicted = torch.ones(span, dtype=torch.bool)
            evicted[k] = False
            masks.append(evicted)
        _EVICTED[layer] = masks
    _MASK_FROM[:] = [span]
    _reset_rope(model)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    try:
        with _attention(model, REFERENCE_ATTENTION):
            out = model(**inputs, **cache_kwargs(model, cache), use_cache=True)
    finally:
        _EVICTED.clear()
        _MASK_FROM.clear()
    return out.logits[0, -1].float()


@torch.inference_mode()
def compressed_logits(model, prepared, method, tokens: list[int], budget: float | int = 1.0):
    """The path under test: next-token logits with ``method`` compressing the cache through ``mmkv.compress``.

    Returns the logits after prefill and after each teacher-forced token, the session, and the
    logical cache length seen before each decode step.
    """
    import mmkv

    _reset_rope(model)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    lengths = []
    with mmkv.compress(model, method, budget, modality=prepared.modality) as session:
        out = model(**prepared.inputs, **cache_kwargs(model, cache), use_cache=True)
        logits = [out.logits[0, -1].float()]
        for t in tokens:
            lengths.append(cache.get_seq_length())
            out = model(input_ids=torch.tensor([[t]]), **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[0, -1].float())
    return logits, session, lengths


def _reset_rope(model) -> None:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


@dataclass
class FixedPlan(Method):
    """A test method that keeps exactly the given positions (eviction only, no statistics)."""

    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    name = "fixed"

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        if ctx.layer in self.kept:
            return LayerPlan(kept=[k.clone() for k in self.kept[ctx.layer]])
        return LayerPlan.keep_all(ctx.num_kv_heads, ctx.length)


def random_ragged_plan(
    num_layers: int, num_kv_heads: int, length: int, seed: int, ragged: bool = True
) -> dict[int, list[torch.Tensor]]:
    """Random eviction per layer and head (different sizes per head when ``ragged``)."""
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for layer in range(num_layers):
        base = int(torch.randint(max(2, length // 4), max(3, length // 2), (1,), generator=g))
        heads = []
        for h in range(num_kv_heads):
            n = base + (3 * h if ragged else 0)
            heads.append(torch.sort(torch.randperm(length, generator=g)[:n]).values)
        plan[layer] = heads
    return plan
