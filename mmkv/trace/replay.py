"""Decode replay: what the KV cache held at every decode step, read from a saved :class:`~mmkv.trace.core.Trace`.

No model and no Gradio: everything comes from the trace (``Trace.to_dict`` / ``from_dict`` keep it).

**Steps.** Step 0 is the cache right after compression (``LayerTrace.kept``; in query-agnostic mode
after the question is read on top of it) and produces the first generated token. Step ``t >= 1`` is
the cache after the ``t``-th decode forward, which feeds generated token ``t - 1`` (appended at
position ``step_lengths[t] - 1``) and produces token ``t``; ``Trace.decode_steps`` steps in all
(= ``len(generated_ids)`` for :func:`mmkv.generate`). Within a step attention runs first, then H2O
evicts (``docs/methods.md``, H2O ``decode_evict``): a token evicted at step ``t`` was still seen by
that step's attention. HybridKV's dynamic heads retrieve chunks before attending: "retrieved at step
``t``" are the chunks that step's attention used (``docs/methods.md``, HybridKV, formula 4).

**Recorded data** (all Python ints, recorded without a device sync; logs are read once at the end):

- ``Trace.step_bytes[t]``: physical KV bytes on the device after step ``t`` (the last equals
  ``bytes_end``); ``Trace.step_lengths[t]``: logical tokens (prompt + fed-back tokens) after step ``t``;
- ``Trace.generated_tokens[t]``: the text generated token ``t`` added to the answer (special tokens
  such as EOS by their token string; ``""`` while a multi-byte character is incomplete);
- ``LayerTrace.decode_evictions`` with ``decode_eviction_steps`` (the step of each row);
  ``LayerTrace.decode_retrievals`` with ``decode_retrieval_steps``; for HybridKV layers
  ``info["dynamic_heads"]`` (the KV heads of the retrieval rows, in order) and ``info["chunk_spans"]``
  (chunk id -> ``[start, stop)`` prompt positions).

**Per position** (and per selected (layer, KV head) pair) a position that exists at step ``t``
(``p < step_lengths[t]``) is in exactly one of: *held* on the device, *evicted now* (by H2O at this
step), *evicted* (at compression or an earlier step; merged-away tokens count here), *offloaded*
(HybridKV dynamic heads: in the host store, not in the retrieval buffer). *Retrieved* (the chunks
this step's retrieval selected) and *fetched* (those of them not resident before, copied from the
host) are subsets of *held*. Over several pairs each is the fraction of pairs, as
``viz.overlay.token_fractions`` aggregates the prefill kept sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["StepState", "Replay", "replay_of"]

_NEVER = np.iinfo(np.int32).max


@dataclass
class StepState:
    """The cache after one decode step, per logical position ``0 <= p < size`` (``size`` = the last step's length).

    Each array is the fraction of the selected (layer, KV head) pairs in that state; for ``p >= length``
    (not generated yet) all are 0. ``held + evicted_now + evicted + offloaded == 1`` for ``p < length``.
    """

    step: int
    length: int  # positions that exist after this step (prompt + tokens fed back so far)
    held: np.ndarray  # float [size]: on the device after this step
    evicted_now: np.ndarray  # evicted during this step (H2O decode-time eviction)
    evicted: np.ndarray  # evicted earlier: at compression or a previous step
    offloaded: np.ndarray  # HybridKV dynamic heads: only in the host store
    retrieved: np.ndarray  # chunks this step's retrieval selected (subset of held)
    fetched: np.ndarray  # retrieved chunks not resident before this step (copied from the host)
    pairs: int  # (layer, KV head) pairs aggregated
    dynamic_pairs: int  # ... of which HybridKV dynamic heads
    span: int  # positions >= span were not compressed (question in query-agnostic mode, generated tokens)
    prompt_length: int  # positions >= prompt_length are generated tokens (p - prompt_length = index in generated_ids)
    token: str | None  # the text of the token generated at this step
    token_id: int | None
    token_position: int  # the position that token takes when fed back (= length)
    bytes: int | None  # physical KV bytes on the device after this step (whole cache)


class _Dense:
    """A (layer, KV head) pair that only loses tokens by eviction: per position, the step it left the cache
    (-1: at compression; never: held to the end). A position is held from the step it exists on."""

    def __init__(self, leave: np.ndarray) -> None:
        self.leave = leave


class _Dynamic:
    """A HybridKV dynamic head: fixed resident tokens + the chunks of the latest retrieval."""

    def __init__(
        self,
        fixed: np.ndarray,
        chunk_of: np.ndarray,
        rows: list[np.ndarray],
        row_steps: list[int],
        initial: np.ndarray,
        n_chunks: int,
        store: bool,
    ) -> None:
        self.fixed = fixed  # bool [span]: resident whatever the retrieval (sinks, recent)
        self.chunk_of = chunk_of  # int [span]: chunk id of each prompt position (-1: none)
        self.rows, self.row_steps = rows, row_steps  # retrieval rows (chunk ids) and their steps
        self.initial = initial  # chunk ids resident after compression
        self.n_chunks, self.store = (
            n_chunks,
            store,
        )  # store: False when nothing can be retrieved (evicted, not offloaded)

    def chunks_at(self, step: int) -> np.ndarray:
        """Chunk ids resident after ``step``: the latest retrieval at or before it, else the initial ones."""
        i = int(np.searchsorted(self.row_steps, step, side="right")) - 1
        return self.rows[i] if i >= 0 else self.initial

    def retrieved_at(self, step: int) -> np.ndarray | None:
        i = int(np.searchsorted(self.row_steps, step, side="right")) - 1
        return self.rows[i] if i >= 0 and self.row_steps[i] == step else None

    def mask(self, chunks: np.ndarray) -> np.ndarray:
        """Bool [span]: positions inside ``chunks``."""
        pick = np.zeros(self.n_chunks + 1, dtype=bool)  # last slot: chunk_of == -1
        pick[np.asarray(chunks, dtype=np.int64)] = True
        return pick[self.chunk_of]


class Replay:
    """Per-step states of a trace (built once from its lists; :func:`replay_of` caches it on the trace)."""

    def __init__(self, trace: Any) -> None:
        if not trace.step_lengths:
            raise ValueError("the trace has no decode record (step_lengths): run it with mmkv's Session/generate")
        self.trace = trace
        self.lengths = np.asarray(trace.step_lengths, dtype=np.int64)
        self.steps = len(self.lengths)
        self.span = int(trace.span_length)
        self.size = int(max(self.lengths.max(), self.span))
        self.pairs: dict[tuple[int, int], _Dense | _Dynamic] = {}
        self._stack: dict[tuple[int | None, int | None], np.ndarray | None] = {}
        self._rows: dict[int, np.ndarray] = {}
        for lt in trace.layers:
            dynamic = list(lt.info.get("dynamic_heads") or [])
            for h, kept in enumerate(lt.kept):
                kept = np.asarray(kept, dtype=np.int64)
                if h in dynamic:
                    self.pairs[(lt.layer, h)] = self._dynamic(lt, dynamic.index(h), kept)
                else:
                    self.pairs[(lt.layer, h)] = self._dense(lt, h, kept)

    def _dense(self, lt: Any, h: int, kept: np.ndarray) -> _Dense:
        leave = np.full(self.size, _NEVER, dtype=np.int32)
        leave[: self.span] = -1  # not kept: evicted at compression
        leave[kept] = _NEVER
        if lt.decode_evictions:
            rows = np.asarray(lt.decode_evictions, dtype=np.int64)[:, h]
            steps = np.asarray(lt.decode_eviction_steps or [], dtype=np.int32)
            if steps.size != rows.size:
                raise ValueError(f"layer {lt.layer}: {rows.size} evictions but {steps.size} eviction steps")
            inside = rows < self.size
            leave[rows[inside]] = steps[inside]
        return _Dense(leave)

    def _dynamic(self, lt: Any, j: int, kept: np.ndarray) -> _Dynamic:
        spans = np.asarray(lt.info.get("chunk_spans") or [], dtype=np.int64).reshape(-1, 2)
        chunk_of = np.full(self.span, -1, dtype=np.int64)
        for c, (a, b) in enumerate(spans):
            chunk_of[a:b] = c
        in_kept = np.zeros(self.span, dtype=bool)
        in_kept[kept[kept < self.span]] = True
        fixed = in_kept & (chunk_of < 0)
        initial = np.unique(chunk_of[in_kept & (chunk_of >= 0)])
        rows = list(self._retrievals(lt)[:, j])
        row_steps = list(lt.decode_retrieval_steps or [])
        if len(row_steps) != len(rows):
            raise ValueError(f"layer {lt.layer}: {len(rows)} retrievals but {len(row_steps)} retrieval steps")
        chunk_of[chunk_of < 0] = len(spans)
        store = (len(rows[0]) if rows else len(initial)) > 0
        return _Dynamic(fixed, chunk_of, rows, row_steps, initial, len(spans), store)

    def _retrievals(self, lt: Any) -> np.ndarray:
        """``[forwards, dynamic heads, k]`` chunk ids of a layer (converted once per layer)."""
        if lt.layer not in self._rows:
            rows, dyn = lt.decode_retrievals or [], len(lt.info.get("dynamic_heads") or [])
            k = len(rows[0][0]) if rows and rows[0] else 0
            self._rows[lt.layer] = np.asarray(rows, dtype=np.int64).reshape(len(rows), dyn, k)
        return self._rows[lt.layer]

    def _select(self, layer: int | None, head: int | None) -> list[tuple[int, int]]:
        keys = [k for k in self.pairs if (layer is None or k[0] == int(layer)) and (head is None or k[1] == int(head))]
        if not keys:
            raise ValueError(
                f"no (layer, KV head) pair matches layer={layer}, head={head}: the trace has "
                f"{self.trace.num_layers} layers of {self.trace.num_kv_heads} KV heads"
            )
        return keys

    def _stacked(self, layer: int | None, head: int | None, keys: list[tuple[int, int]]) -> np.ndarray | None:
        """Exit steps ``[pairs, size]`` of the selection's dense pairs (several pairs: stacked once, then kept)."""
        dense = [pair for k in keys if isinstance(pair := self.pairs[k], _Dense)]
        if len(dense) <= 1:
            return dense[0].leave[None] if dense else None
        if (layer, head) not in self._stack:
            self._stack[(layer, head)] = np.stack([p.leave for p in dense])
        return self._stack[(layer, head)]

    def state(self, step: int, layer: int | None = None, head: int | None = None) -> StepState:
        """The cache after ``step`` (negative counts from the end), over the chosen layer(s)/head(s) (None = all)."""
        if not -self.steps <= step < self.steps:
            raise ValueError(f"step {step} is out of range: the trace has {self.steps} decode steps")
        step = step % self.steps
        length = int(self.lengths[step])
        exists = np.arange(self.size) < length
        acc = {
            name: np.zeros(self.size)
            for name in ("held", "evicted_now", "evicted", "offloaded", "retrieved", "fetched")
        }
        keys = self._select(layer, head)
        stacked = self._stacked(layer, head, keys)
        if stacked is not None:
            leave = stacked
            acc["held"] += (step < leave).sum(0)  # positions not existing yet are zeroed below
            acc["evicted_now"] += (leave == step).sum(0)
            acc["evicted"] += (leave < step).sum(0)
        n_dyn = 0
        for k in keys:
            pair = self.pairs[k]
            if not isinstance(pair, _Dynamic):
                continue
            n_dyn += 1
            span = self.span
            resident = pair.fixed | pair.mask(pair.chunks_at(step))
            acc["held"][:span] += resident
            acc["held"][span:] += 1.0  # tokens appended after compression stay in HybridKV's tail
            middle = (pair.chunk_of < pair.n_chunks) & ~resident
            acc["offloaded" if pair.store else "evicted"][:span] += middle
            acc["evicted"][:span] += ~resident & ~middle  # outside every chunk and not resident: never the case today
            now = pair.retrieved_at(step)
            if now is not None:
                acc["retrieved"][:span] += pair.mask(now)
                before = pair.chunks_at(step - 1) if step > 0 else pair.initial
                acc["fetched"][:span] += pair.mask(np.setdiff1d(now, before))
        n = len(keys)
        for name in acc:
            acc[name] = np.where(exists, acc[name] / n, 0.0)
        ids, tokens = self.trace.generated_ids, self.trace.generated_tokens
        sizes = self.trace.step_bytes
        return StepState(
            step=step,
            length=length,
            **acc,
            pairs=n,
            dynamic_pairs=n_dyn,
            span=self.span,
            prompt_length=int(self.trace.prompt_length),
            token=tokens[step] if step < len(tokens) else None,
            token_id=int(ids[step]) if step < len(ids) else None,
            token_position=length,
            bytes=int(sizes[step]) if step < len(sizes) else None,
        )


def replay_of(trace: Any) -> Replay:
    """The trace's :class:`Replay`, built on first use and kept on the trace (rebuilt if its decode record grew)."""
    key = (len(trace.step_lengths), len(trace.generated_ids), id(trace.layers))
    cached = trace.__dict__.get("_replay")
    if cached is None or cached[0] != key:
        cached = (key, Replay(trace))
        trace.__dict__["_replay"] = cached
    return cached[1]
