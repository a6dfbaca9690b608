"""Decode replay (mmkv/trace/replay.py) against what the cache physically held at every step.

The oracle captures, after every forward of a real :func:`mmkv.generate` run on a tiny model, the key
rows each cache layer attends to per KV head and the bytes of its storage, and names every row by its
content: the keys each position got when it entered the cache (recorded at ``Cache.update``). The
trace's ``step_state`` must say exactly those positions are held. HybridKV's retrievals are
recomputed from the captured queries and the full prompt keys (mean-key chunk scores, docs/methods.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer

import mmkv
import mmkv.runtime.session
from mmkv.cache.hybrid import HybridLayer
from mmkv.cache.layers import DenseLayer, RaggedLayer
from mmkv.compat import cache_from_kwargs
from mmkv.runtime.driver import compressed_run
from mmkv.runtime.opcount import OpCounter
from mmkv.runtime.session import Session

HYBRID = {"static_fraction": 0.5, "chunk_size": 4, "sinks": 2, "recent": 4}


def _storage(*tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


def _attended_rows(layer) -> tuple[list[torch.Tensor], int]:
    """Per KV head the key rows attention reads now, and the layer's K/V storage bytes (device side)."""
    if isinstance(layer, (RaggedLayer, HybridLayer)):
        prefix = layer.prefix
        rows = []
        for h in range(prefix.num_heads):
            a, n = prefix.starts[h], prefix.lengths[h]
            visible = ~prefix.hide[h, 0, a : a + n]
            rows.append(torch.cat([prefix.keys[a : a + n][visible], layer.keys[0, h]]))
        size = _storage(prefix.keys, prefix.values, layer.keys, layer.values)
        if isinstance(layer, HybridLayer):
            size += _storage(*layer.summaries) + (
                0 if layer.offloaded else _storage(layer.host_keys, layer.host_values)
            )
        return rows, size
    assert isinstance(layer, (DenseLayer, DynamicLayer)), type(layer)
    return list(layer.keys[0]), _storage(layer.keys, layer.values)


class Capture:
    """Keys entering the cache (by layer and position) and, after each forward, the positions held per head."""

    def __init__(self, model, monkeypatch) -> None:
        self.entered: dict[int, dict[bytes, int]] = {}  # layer -> key row bytes (head tag included) -> position
        self.prompt_keys: dict[int, torch.Tensor] = {}  # layer -> [H, L, d] keys of the first (prefill) forward
        self.queries: dict[int, list[torch.Tensor]] = {}  # layer -> query of each forward through a HybridLayer
        self.states: list[tuple[dict[int, list[list[int]]], int]] = []  # per forward: held positions, bytes
        real_update, real_attend = Cache.update, HybridLayer.attend
        capture = self

        def update(cache, key_states, value_states, layer_idx, *args, **kwargs):
            start = cache.layers[layer_idx].get_seq_length() if layer_idx < len(cache.layers) else 0
            if start == 0:
                capture.entered[layer_idx] = {}
                capture.prompt_keys[layer_idx] = key_states[0].detach().clone()
            table = capture.entered[layer_idx]
            for h in range(key_states.shape[1]):
                for i in range(key_states.shape[2]):
                    table[capture._tag(h, key_states[0, h, i])] = start + i
            return real_update(cache, key_states, value_states, layer_idx, *args, **kwargs)

        def attend(layer, module, query, *args, **kwargs):
            capture.queries.setdefault(module.layer_idx, []).append(query.detach().clone())
            return real_attend(layer, module, query, *args, **kwargs)

        monkeypatch.setattr(Cache, "update", update)
        monkeypatch.setattr(HybridLayer, "attend", attend)
        self.handle = model.register_forward_hook(self._after_forward, with_kwargs=True)

    @staticmethod
    def _tag(h: int, row: torch.Tensor) -> bytes:
        return bytes([h]) + row.detach().float().contiguous().numpy().tobytes()

    def _after_forward(self, module, args, kwargs, output) -> None:
        cache = cache_from_kwargs(kwargs)
        held, total = {}, 0
        for i, layer in enumerate(cache.layers):
            rows, size = _attended_rows(layer)
            total += size
            table = self.entered[i]
            held[i] = [sorted(table[self._tag(h, r)] for r in head_rows) for h, head_rows in enumerate(rows)]
        self.states.append((held, total))

    def close(self) -> None:
        self.handle.remove()


def _run(model, processor, prepared, monkeypatch, method, query_aware=True, max_new_tokens=6, **params):
    capture = Capture(model, monkeypatch)
    try:
        result = mmkv.generate(
            model,
            processor,
            None,
            method=method,
            budget=0.3,
            max_new_tokens=max_new_tokens,
            prepared=prepared,
            query_aware=query_aware,
            **params,
        )
    finally:
        capture.close()
    # query-agnostic runs have one more forward before step 0 (the context, compressed, before the question)
    states = capture.states[0 if query_aware else 1 :]
    assert len(states) == result.trace.decode_steps == len(result.token_ids)
    return result, capture, states


def _positions(mask: np.ndarray) -> list[int]:
    assert set(np.unique(mask)) <= {0.0, 1.0}  # one (layer, head): every state is all or nothing
    return np.nonzero(mask == 1.0)[0].tolist()


CASES = [  # (method, params, query_aware); "measure": bytes read from shapes at each step instead of growth models
    ("h2o", {"decode_evict": True}, True),
    ("h2o", {"decode_evict": True}, False),
    ("snapkv", {}, True),
    ("adakv", {}, False),
    ("snapkv", {"preallocate": True}, True),
    ("hybridkv", HYBRID, True),
    ("hybridkv", {**HYBRID, "offload": False}, False),
    ("full", {}, True),
    ("h2o", {"decode_evict": True, "measure": True}, False),
    ("hybridkv", {**HYBRID, "measure": True}, True),
]


@pytest.mark.parametrize("method,params,query_aware", CASES, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(CASES)])
def test_held_positions_and_bytes_equal_the_physical_cache_at_every_step(
    method, params, query_aware, monkeypatch, tiny_prepared
):
    model, processor, prepared = tiny_prepared()
    params = dict(params)
    if params.pop("measure", False):  # a layer without a growth model: the session measures every step
        monkeypatch.setattr(mmkv.runtime.session, "layer_growth", lambda layer: None)
    result, _, states = _run(model, processor, prepared, monkeypatch, method, query_aware, **params)
    trace = result.trace
    evicting = method == "h2o"
    total_evicted_now = 0
    for step, (held, size) in enumerate(states):
        assert trace.step_bytes[step] == size, f"bytes at step {step}"
        assert trace.step_lengths[step] == trace.prompt_length + step
        for lt in trace.layers:
            for h in range(trace.num_kv_heads):
                state = trace.step_state(step, lt.layer, h)
                assert state.pairs == 1 and state.length == trace.prompt_length + step
                assert _positions(state.held) == held[lt.layer][h], (step, lt.layer, h)
                total = state.held + state.evicted_now + state.evicted + state.offloaded
                assert np.all(total[: state.length] == 1.0) and np.all(total[state.length :] == 0.0)
                assert np.all(state.retrieved <= state.held) and np.all(state.fetched <= state.retrieved)
                now = _positions(state.evicted_now)
                total_evicted_now += len(now)
                if step and evicting:
                    before = trace.step_state(step - 1, lt.layer, h)
                    appended = [state.length - 1]
                    # what left at this step: held before (or just appended), not held now
                    assert now == sorted(set(_positions(before.held) + appended) - set(_positions(state.held)))
                    assert len(now) == 1  # one eviction per KV head per step
                elif not evicting:
                    assert now == []
                    if lt.info.get("dynamic_heads") and h in lt.info["dynamic_heads"]:
                        continue
                    # (e) no decode-time policy: step 0's set plus every token fed back since
                    want = sorted(lt.kept[h] + list(range(trace.span_length, state.length)))
                    assert _positions(state.held) == want
    assert trace.step_bytes[-1] == trace.bytes_end
    if evicting:
        assert total_evicted_now > 0
    per_step = trace.num_layers * trace.num_kv_heads * trace.bytes_per_token_head
    growth = 0 if evicting or params.get("preallocate") else per_step
    question = trace.prompt_length - trace.span_length
    if not evicting:
        assert trace.step_bytes[0] == trace.bytes_compressed + question * per_step * (not params.get("preallocate"))
    assert trace.step_bytes[1] == trace.step_bytes[0] + growth
    # all layers and heads at once: the fractions are the means of the single pairs
    for step in (0, trace.decode_steps - 1):
        whole = trace.step_state(step)
        singles = [trace.step_state(step, lt.layer, h) for lt in trace.layers for h in range(trace.num_kv_heads)]
        assert whole.pairs == len(singles)
        np.testing.assert_allclose(whole.held, np.mean([s.held for s in singles], axis=0))
        np.testing.assert_allclose(whole.evicted_now, np.mean([s.evicted_now for s in singles], axis=0))


def _chunk_grid(length: int, sinks: int, recent: int, c: int) -> list[list[int]]:
    """docs/methods.md, HybridKV 4: chunks of c tokens tile [sinks, L - recent) from its start."""
    stop = length - recent
    return [list(range(a, min(a + c, stop))) for a in range(sinks, stop, c)]


@pytest.mark.parametrize("query_aware", [True, False])
def test_hybridkv_retrieved_chunks_equal_an_independent_retrieval(query_aware, monkeypatch, tiny_prepared) -> None:
    model, processor, prepared = tiny_prepared()
    result, capture, states = _run(
        model, processor, prepared, monkeypatch, "hybridkv", query_aware, max_new_tokens=8, **HYBRID
    )
    trace = result.trace
    g = trace.num_q_heads // trace.num_kv_heads
    checked = changed = 0
    for lt in trace.layers:
        dynamic = lt.info.get("dynamic_heads") or []
        if not dynamic:
            continue
        chunks = _chunk_grid(trace.span_length, lt.info["sinks"], lt.info["recent"], lt.info["chunk_size"])
        k = len(lt.decode_retrievals[0][0])
        assert 0 < k < len(chunks)
        queries = capture.queries[lt.layer]
        keys = capture.prompt_keys[lt.layer][:, : trace.span_length].float()
        # one retrieval per forward through the layer: query-aware from step 1, query-agnostic from step 0
        assert len(queries) == trace.decode_steps - query_aware
        previous = {h: None for h in dynamic}
        for f, query in enumerate(queries):
            step = f + int(query_aware)
            for h in dynamic:
                q = query[0, h * g : (h + 1) * g].float()  # [G, q, d]: the KV head's query group
                mean = torch.stack([keys[h, c].mean(0) for c in chunks])  # [n_chunks, d]
                score = torch.einsum("gqd,cd->gqc", q, mean).amax(dim=(0, 1))
                order = sorted(range(len(chunks)), key=lambda c: (-float(score[c]), c))[:k]
                want = sorted(p for c in order for p in chunks[c])
                state = trace.step_state(step, lt.layer, h)
                assert _positions(state.retrieved) == want, (lt.layer, h, step)
                held = set(_positions(state.held))
                assert set(want) <= held
                # fetched: the retrieved chunks not resident after the previous step
                resident = set(_positions(trace.step_state(step - 1, lt.layer, h).held)) if step else set(lt.kept[h])
                assert _positions(state.fetched) == sorted(set(want) - resident)
                # what is not resident in the middle span is in the host store, not evicted
                middle = {p for c in chunks for p in c}
                assert _positions(state.offloaded) == sorted(middle - held) and not state.evicted.any()
                changed += previous[h] is not None and previous[h] != want
                previous[h] = want
                checked += 1
    assert checked and changed  # some retrievals moved between steps
    if query_aware:  # step 0 is the initial buffer: nothing retrieved by a decode query yet
        assert not trace.step_state(0).retrieved.any()


@pytest.mark.parametrize("method,params", [("h2o", {"decode_evict": True}), ("hybridkv", HYBRID)])
def test_json_round_trip_keeps_the_replay(method, params, tiny_prepared) -> None:
    model, processor, prepared = tiny_prepared()
    result = mmkv.generate(
        model, processor, None, method=method, budget=0.3, max_new_tokens=5, prepared=prepared, **params
    )
    trace = result.trace
    back = mmkv.Trace.from_json(trace.to_json())
    assert back.to_dict() == trace.to_dict()
    for name in ("generated_tokens", "step_bytes", "step_lengths"):
        assert getattr(back, name) == getattr(trace, name) and getattr(trace, name)
    assert back.decode_steps == trace.decode_steps == len(result.token_ids)
    for step in range(trace.decode_steps):
        for layer, head in ((None, None), (trace.num_layers - 1, None), (0, 1)):
            a, b = trace.step_state(step, layer, head), back.step_state(step, layer, head)
            for name, value in vars(a).items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(value, getattr(b, name), err_msg=name)
                else:
                    assert value == getattr(b, name), name


def test_generated_tokens_are_the_answer_pieces(tiny_prepared) -> None:
    model, processor, prepared = tiny_prepared("llava")
    result = mmkv.generate(model, processor, None, method="snapkv", budget=0.3, max_new_tokens=8, prepared=prepared)
    trace = result.trace
    tokenizer = getattr(processor, "tokenizer", processor)
    special = set(tokenizer.all_special_ids)
    assert len(trace.generated_tokens) == len(result.token_ids) == trace.decode_steps
    text = "".join(p for p, i in zip(trace.generated_tokens, result.token_ids) if i not in special)
    assert text == result.text
    for step, (piece, token) in enumerate(zip(trace.generated_tokens, result.token_ids)):
        state = trace.step_state(step)
        assert state.token == piece and state.token_id == token and state.token_position == trace.prompt_length + step
        if token in special:
            assert piece == tokenizer.convert_ids_to_tokens(token)


def test_step_state_errors_and_old_traces(tiny_prepared) -> None:
    model, processor, prepared = tiny_prepared()
    trace = mmkv.generate(
        model, processor, None, method="snapkv", budget=0.3, max_new_tokens=3, prepared=prepared
    ).trace
    with pytest.raises(ValueError, match="out of range"):
        trace.step_state(trace.decode_steps)
    assert trace.step_state(-1).step == trace.decode_steps - 1
    with pytest.raises(ValueError, match="no \\(layer, KV head\\) pair"):
        trace.step_state(0, layer=trace.num_layers)
    old = trace.to_dict()
    for name in ("generated_tokens", "step_bytes", "step_lengths"):
        old.pop(name)
    legacy = mmkv.Trace.from_dict(old)  # a trace saved before the replay fields existed still loads
    assert legacy.decode_steps == 0
    with pytest.raises(ValueError, match="no decode record"):
        legacy.step_state(0)


def test_plain_generate_around_a_session_records_the_steps(tiny_prepared) -> None:
    model, _, prepared = tiny_prepared()
    with mmkv.compress(model, "h2o", 0.3, decode_evict=True) as session:
        out = model.generate(**prepared.inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    trace = session.trace
    assert out.shape[1] - prepared.length == 5 == trace.decode_steps  # the last token is never fed back
    assert trace.step_lengths == [prepared.length + t for t in range(5)] and trace.step_bytes[-1] == trace.bytes_end
    assert all(lt.decode_eviction_steps == [1, 2, 3, 4] for lt in trace.layers)
    assert trace.generated_tokens == []  # no tokenizer around a plain generate
    assert trace.step_state(2).token is None


@pytest.mark.parametrize("method,params", [("h2o", {"decode_evict": True}), ("hybridkv", HYBRID), ("adakv", {})])
def test_recording_adds_no_op_and_no_sync_to_a_decode_step(method, params, tiny_prepared) -> None:
    """The recorded steps are Python ints (shapes, counts): a decode forward dispatches the same aten ops."""
    model, _, prepared = tiny_prepared()
    counts = {}
    for record in (True, False):
        session = Session(model, method, 0.3, modality=prepared.modality, method_params=params, record_steps=record)
        with compressed_run(model, prepared, session, prepared.length) as step:
            step()
            step(5)
            with OpCounter() as counter:
                step(7)
            counts[record] = counter.ops
        assert bool(session.trace.step_bytes) == record and (session._growth is not None) == record
    assert counts[True] == counts[False]
