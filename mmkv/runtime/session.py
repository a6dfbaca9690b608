"""A compression session: hooks a model, collects statistics at prefill, applies the plan, records the Trace.

Used by :func:`mmkv.generate` and directly as a context manager around a plain ``model.generate``::

    with mmkv.compress(model, "snapkv", budget=0.2) as session:
        out = model.generate(**inputs, max_new_tokens=32)
    session.trace.summary()

Mechanics (no model class is patched):

- the model is switched to the registered ``"mmkv"`` attention for the session's duration;
- a forward pre-hook on the language decoder spots the prefill (an empty cache receiving a prompt)
  and grabs the cache object that ``generate`` (or our driver) passes in;
- during that prefill the attention function computes the method's statistics per layer and, for
  layer-local methods, replaces the layer's cache by its compressed version right away;
- a forward hook on the decoder runs global methods' plan once all layers are prefilled.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..cache.layers import (
    BatchSizeError,
    CompressedLayer,
    H2ODecodeLayer,
    apply_plan,
    bottom_right_causal_mask,
    cache_bytes,
    layer_bytes,
    layer_growth,
)
from ..compat import CACHE_ARGUMENTS, cache_from_kwargs, model_config
from ..inputs.modality import ModalityMap
from ..methods import Method, make_method
from ..methods.base import LayerContext, LayerPlan, reduce_to_kv_heads
from ..models.base import UnsupportedModelError, resolve_text_model
from ..statistics.attention import ACTIVE_SESSION, ATTENTION_NAME, register
from ..statistics.stats import LayerStats, StatsRequest, compute_layer_stats
from ..trace.core import LayerTrace, Packed, Timings, Trace

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def resolve_capacity(budget: float | int, length: int) -> int:
    """Tokens per (layer, KV head): a ratio ``0 < r <= 1`` of ``length``, or an absolute count (int)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a ratio in (0, 1] or a positive int token count, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"an absolute budget must be at least 1 token, got {budget}")
        return min(budget, length)
    if not 0.0 < budget <= 1.0:
        raise ValueError(
            f"a budget ratio must be in (0, 1], got {budget}; for an absolute token count pass an int (e.g. budget=256)"
        )
    return max(1, min(length, round(budget * length)))


class Clock:
    """Intervals for the trace's :class:`Timings`, without stalling the device.

    On CPU a mark is ``time.perf_counter()`` and an interval is added at once. On CUDA a mark is an
    event recorded on the current stream (no host sync): the interval is the device time between
    the two events, added to its ``Timings`` when :meth:`resolve` runs (one sync, at the end).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[Timings, str, Any, Any]] = []

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, timings: Timings, name: str, start: Any, stop: Any | None = None) -> None:
        """Add ``stop - start`` (``stop`` defaults to now) to ``timings.<name>`` (``decode_s``: appended)."""
        stop = self.mark() if stop is None else stop
        if self.cuda:
            self._pending.append((timings, name, start, stop))
        else:
            _add(timings, name, stop - start)

    def resolve(self) -> None:
        if not self._pending:
            return
        self._pending[-1][3].synchronize()
        for timings, name, start, stop in self._pending:
            _add(timings, name, start.elapsed_time(stop) / 1000.0)
        self._pending = []


def _add(timings: Timings, name: str, seconds: float) -> None:
    if name == "decode_s":
        timings.decode_s.append(seconds)
    else:
        setattr(timings, name, getattr(timings, name) + seconds)


def unsupported_attention(text_model: torch.nn.Module, config: Any) -> str | None:
    """Why mmkv cannot compress this model's attention, or None.

    Sliding-window layers and attention-logit soft-capping change the attention the statistics
    recompute and the compressed layers evaluate (both assume plain causal softmax attention), and a
    replaced cache layer would lose the sliding window's eviction: refused rather than silently wrong.
    """
    layers: Any = text_model.layers  # the decoder layers: their attention modules' fields vary by model
    windowed = [
        i for i, layer in enumerate(layers) if getattr(getattr(layer, "self_attn", None), "sliding_window", None)
    ]
    if windowed:
        window = layers[windowed[0]].self_attn.sliding_window
        return (
            f"layers {windowed} use sliding-window attention (window {window}); mmkv supports full causal "
            "attention only (for Qwen2-VL, set use_sliding_window=False in the text config)"
        )
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is None:
        softcap = next(
            (
                c
                for layer in layers
                if (c := getattr(getattr(layer, "self_attn", None), "attn_logit_softcapping", None))
            ),
            None,
        )
    if softcap:
        return f"the attention logits are soft-capped (attn_logit_softcapping={softcap}); mmkv supports plain softmax attention only"
    return None


def _text_config(model: torch.nn.Module) -> Any:
    config = model_config(model)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


class Session:
    """State of one compressed generation on one model (batch size 1)."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: str | Method = "snapkv",
        budget: float | int = 0.2,
        *,
        modality: ModalityMap | None = None,
        record_attention: bool = True,
        record_scores: bool = False,
        query_aware: bool = True,
        method_params: dict[str, Any] | None = None,
        reserve: int = 0,
        record_steps: bool = True,
    ) -> None:
        register()
        self.record_steps = record_steps  # per decode step: bytes held and logical length (Python ints, no sync)
        self.reserve = reserve  # preallocated room for generated tokens in every layer (0: grow by concatenation)
        self.model = model
        self.method = make_method(method, **(method_params or {}))
        resolve_capacity(budget, 1_000_000)  # validate early, before any forward
        self.budget = budget
        self.modality_override = modality
        self.record_scores = record_scores
        self.query_aware = query_aware
        self.text_model = resolve_text_model(model)
        cfg = _text_config(model)
        reason = unsupported_attention(self.text_model, cfg)
        if reason is not None:
            raise UnsupportedModelError(f"mmkv cannot compress this model: {reason}")
        layers = cast(torch.nn.ModuleList, self.text_model.layers)
        self._layer_of = {id(layer.self_attn): i for i, layer in enumerate(layers)}
        self.num_layers = len(layers)
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_q_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        request = self.method.stats_request() if self.method.compresses else StatsRequest()
        if record_attention:
            request = request | StatsRequest(modality_mass=True, entropy=True)
        self.request = request
        self.cache: Any = None
        self.trace: Trace | None = None
        self.collecting = False
        self._pending: dict[int, LayerStats] = {}
        self._layer_traces: dict[int, LayerTrace] = {}
        self._captured: dict[str, Any] = {}
        self.clock = Clock(self.device)
        self._forward_start: Any = 0.0
        self._forward_is_prefill = False
        self._q_len = 0
        self._forward_steps: list[int] = []  # per forward after compression: the replay step it belongs to
        self._forward_tokens: list[int] = []  # ... and the tokens it appended
        self._growth: list[Any] | None = None  # per cache layer, its GrowthModel at step 0 (None: measure each step)
        self._handles: list[Any] = []

    # ---- lookups used by the attention function ------------------------------------------
    def layer_index(self, module: torch.nn.Module) -> int | None:
        return self._layer_of.get(id(module))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- activation ------------------------------------------------------------------------
    @contextmanager
    def activate(self, bind: bool = True) -> Iterator[Session]:
        """Hook the model; with ``bind`` also make this the active session in the current context.

        The driver binds only around its own forward calls (:meth:`bound`), so a streaming consumer
        running other forwards between tokens is never routed through this session. Hooks act only
        while their session is the active one, so several sessions may share one model.
        """
        _switch_attention(self.model, +1)
        self._handles = [
            self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
            self.model.register_forward_hook(self._model_post_hook, with_kwargs=True),
            self.text_model.register_forward_pre_hook(self._text_pre_hook, with_kwargs=True),
            self.text_model.register_forward_hook(self._text_post_hook, with_kwargs=True),
        ]
        try:
            if bind:
                with self.bound():
                    yield self
            else:
                yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            _switch_attention(self.model, -1)
            self.finish()

    @contextmanager
    def bound(self) -> Iterator[Session]:
        """Make this the active session in the current context for the block."""
        token = ACTIVE_SESSION.set(self)
        try:
            yield self
        finally:
            ACTIVE_SESSION.reset(token)

    def _is_active(self) -> bool:
        return ACTIVE_SESSION.get() is self

    # ---- hooks -----------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        if not self._is_active():
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.dim() == 2 and ids.shape[0] != 1:
            raise BatchSizeError(
                f"mmkv supports batch size 1, got a batch of {ids.shape[0]}: loop over prompts instead"
            )
        self._captured = {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}
        if ids is not None and "input_ids" not in self._captured:
            self._captured["input_ids"] = ids
        self._forward_start = self.clock.mark()

    def _model_post_hook(self, module, args, kwargs, output):
        if not self._is_active() or self.trace is None:
            return output
        self.clock.add(self.trace.timings, "prefill_s" if self._forward_is_prefill else "decode_s", self._forward_start)
        return output

    def _text_pre_hook(self, module, args, kwargs):
        if not self._is_active():
            return None
        cache = cache_from_kwargs(kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = kwargs.get("input_ids", args[0] if args else None)
        q_len = int(embeds.shape[1]) if embeds is not None else 0
        if embeds is not None and embeds.shape[0] != 1:
            raise BatchSizeError(f"mmkv supports batch size 1, got a batch of {embeds.shape[0]}")
        self._forward_is_prefill = q_len > 1
        self._q_len = q_len
        if cache is None or q_len == 0 or cache.get_seq_length() != 0:
            return None
        self._start_prefill(cache, q_len)
        return None

    def _text_post_hook(self, module, args, kwargs, output):
        if not self._is_active():
            return output
        if not self.collecting:
            if self.trace is not None and self.cache is not None and cache_from_kwargs(kwargs) is self.cache:
                self._record_step()
            return output
        t0 = self.clock.mark()
        if self.method.is_global and self.method.compresses:
            order = sorted(self._pending)
            contexts = [self._context(i, self._pending[i]) for i in order]
            plans = self.method.plan(contexts)
            for i, plan in zip(order, plans):
                self._apply(i, plan, self._pending[i])
            self._pending.clear()
        trace = self._live_trace
        self.clock.add(trace.timings, "compress_s", t0)
        self.collecting = False
        trace.layers = [self._layer_traces[i] for i in sorted(self._layer_traces)]
        self._forward_steps, self._forward_tokens = [], []
        if self.record_steps:
            trace.step_lengths = [trace.span_length]
            trace.step_bytes = [cache_bytes(self.cache)]
            growth = [layer_growth(layer) for layer in self.cache.layers]
            self._growth = None if any(g is None for g in growth) else growth
        return output

    def _record_step(self) -> None:
        """A forward on the compressed cache: a new decode step, or (query-agnostic) the question read into step 0.

        Only Python ints are kept; :meth:`finish` turns the token counts into bytes per step with each layer's
        :class:`~mmkv.cache.layers.GrowthModel` (a layer without one is measured here from tensor shapes: no sync).
        """
        trace = self.trace
        step = (
            0 if not self.query_aware and not self._forward_steps else len(self._forward_steps) + int(self.query_aware)
        )
        self._forward_steps.append(step)
        self._forward_tokens.append(self._q_len)
        if not self.record_steps:
            return
        assert trace is not None  # a forward on the compressed cache comes after the prefill that made it
        if not trace.step_lengths:
            return
        if step < len(trace.step_lengths):
            trace.step_lengths[step] += self._q_len
        else:
            trace.step_lengths.append(trace.step_lengths[-1] + self._q_len)
            trace.step_bytes.append(trace.step_bytes[-1])
        if self._growth is None:
            trace.step_bytes[step] = cache_bytes(self.cache)

    def begin_turn(self, trace: Trace) -> None:
        """Record the forwards that follow (a new conversation turn on the kept cache) into ``trace``.

        Step 0 of ``trace`` is the kept cache as it is now; each forward then adds one step, as after a
        prefill (docs/methods.md, "Multi-turn: what each method does at a new turn").
        """
        if self.cache is None:
            raise ValueError("the session holds no cache: a turn can only continue after a first prefill")
        self.trace = trace
        self.collecting = False
        self._forward_steps, self._forward_tokens = [], []
        trace.step_lengths = [int(self.cache.get_seq_length())] if self.record_steps else []
        trace.step_bytes = [cache_bytes(self.cache)] if self.record_steps else []
        growth = [layer_growth(layer) for layer in self.cache.layers]
        self._growth = None if any(g is None for g in growth) else growth

    def _step_bytes(self) -> None:
        """``Trace.step_bytes`` from the layers' growth models and the tokens each forward appended."""
        if self._growth is None or not self._live_trace.step_bytes or not self._forward_tokens:
            return
        per_forward = [sum(column) for column in zip(*(g.after(self._forward_tokens) for g in self._growth))]
        for step, size in zip(self._forward_steps, per_forward):
            self._live_trace.step_bytes[step] = size

    # ---- prefill ---------------------------------------------------------------------------
    def _modality_for(self, length: int) -> ModalityMap:
        if self.modality_override is not None:
            modality = self.modality_override
        else:
            from ..models import adapter_for  # local import: adapters import heavy processor code

            modality = adapter_for(self.model).modality_map(self.model, self._captured)
        if len(modality) != length:
            raise ValueError(
                f"the modality map covers {len(modality)} tokens but the compressed prefill has {length}; "
                "pass the map of exactly the prefilled tokens"
            )
        return modality

    def _start_prefill(self, cache: Any, length: int) -> None:
        self.cache = cache
        self.modality = self._modality_for(length)
        self.codes = self.modality.modality.to(self.device)
        self.capacity = resolve_capacity(self.budget, length)
        self._layer_traces = {}
        self._pending = {}
        self._forward_steps, self._forward_tokens, self._growth = [], [], None
        bytes_per = 2 * self.head_dim * next(self.model.parameters()).element_size()
        self.trace = Trace(
            method=self.method.name,
            params=_jsonable({k: v for k, v in vars(self.method).items() if not k.startswith("_")}),
            budget=self.budget,
            capacity=self.capacity,
            query_aware=self.query_aware,
            prompt_length=length,
            span_length=length,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            num_q_heads=self.num_q_heads,
            head_dim=self.head_dim,
            bytes_per_token_head=bytes_per,
            modality=self.modality,
            timings=Timings(),
            model=getattr(self.model.config, "_name_or_path", ""),
            family=getattr(self.model.config, "model_type", ""),
        )
        self.collecting = True

    def attend(self, layer_idx, module, query, key, value, attention_mask, dropout, scaling, kwargs) -> torch.Tensor:
        """Attention for decoder layer ``layer_idx`` inside the session."""
        cache_layer = (
            self.cache.layers[layer_idx] if self.cache is not None and layer_idx < len(self.cache.layers) else None
        )
        if isinstance(cache_layer, CompressedLayer):
            return cache_layer.attend(module, query, key, value, scaling, dropout)
        q_len, kv_len = query.shape[2], key.shape[2]
        if 1 < q_len != kv_len and self._has_compressed_layer():
            # transformers built the mask from layer 0's (compressed) size; this layer kept all its tokens.
            causal = bottom_right_causal_mask(q_len, kv_len, query.device)
            assert causal is not None  # None only for a single query
            mask = causal[None, None]
            kwargs = {**kwargs, "is_causal": False}
            out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
            return out
        collect = (
            self.collecting and q_len == kv_len == self._live_trace.span_length and layer_idx not in self._layer_traces
        )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if collect and self.request.all_queries and not (module.training and dropout):
            # the all-query statistics pass computes every attention row anyway: it gives the output too
            output = self._on_prefill_layer(layer_idx, query, key, scale, value)
            assert output is not None  # given value, the all-query pass returns the layer's output
            return output
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if collect:
            self._on_prefill_layer(layer_idx, query, key, scale)
        return out

    @property
    def _live_trace(self) -> Trace:
        """:attr:`trace` where it is set (from the prefill on)."""
        assert self.trace is not None, "the session has not started a prefill"
        return self.trace

    def _has_compressed_layer(self) -> bool:
        return any(isinstance(layer, CompressedLayer) for layer in self.cache.layers)

    def _on_prefill_layer(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float, value: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Statistics, then (layer-local methods) the plan applied. With ``value``, the all-query pass also
        returns the layer's attention output (the pass counts as statistics time: what it adds is the prefill
        time beyond Full's)."""
        t0 = self.clock.mark()
        stats = (
            LayerStats()
            if self.request.empty
            else compute_layer_stats(query, key, self.codes, self.request, scaling, value)
        )
        output, stats.attention_output = stats.attention_output, None
        t1 = self.clock.mark()
        self.clock.add(self._live_trace.timings, "stats_s", t0, t1)
        if self.method.compresses and self.method.is_global:
            self._pending[layer_idx] = stats
            self._layer_traces[layer_idx] = self._record(
                layer_idx, LayerPlan.keep_all(self.num_kv_heads, 0), stats, 0, 0
            )
            return output
        plan = (
            self.method.plan_layer(self._context(layer_idx, stats))
            if self.method.compresses
            else LayerPlan.keep_all(self.num_kv_heads, self._live_trace.span_length)
        )
        self._apply(layer_idx, plan, stats)
        self.clock.add(self._live_trace.timings, "compress_s", t1)
        return output

    def _context(self, layer_idx: int, stats: LayerStats) -> LayerContext:
        layer = self.cache.layers[layer_idx]
        return LayerContext(
            layer=layer_idx,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            num_q_heads=self.num_q_heads,
            length=self._live_trace.span_length,
            capacity=self.capacity,
            modality=self.modality,
            stats=stats,
            keys=layer.keys[0],
            values=layer.values[0],
        )

    def _apply(self, layer_idx: int, plan: LayerPlan, stats: LayerStats) -> None:
        before = layer_bytes(self.cache.layers[layer_idx])
        if self.method.compresses or self.reserve:
            apply_plan(self.cache, layer_idx, plan, self.reserve)
        after = layer_bytes(self.cache.layers[layer_idx])
        self._layer_traces[layer_idx] = self._record(layer_idx, plan, stats, before, after)

    def _record(self, layer_idx: int, plan: LayerPlan, stats: LayerStats, before: int, after: int) -> LayerTrace:
        """The layer's trace entry; kept positions, merges and statistics stay compact tensors (:class:`Packed`)."""
        scores = None
        if self.record_scores:
            source = stats.window_scores if stats.window_scores is not None else stats.column_sums
            if source is not None:
                scores = Packed(reduce_to_kv_heads(source, self.num_kv_heads))
        merges = None
        if plan.merges is not None:
            merges = Packed(
                [
                    {"source": m.source, "target": m.target, "similarity": m.similarity} if m is not None else None
                    for m in plan.merges
                ]
            )
        return LayerTrace(
            layer=layer_idx,
            kept=Packed(list(plan.kept)),
            bytes_before=before,
            bytes_after=after,
            merges=merges,
            info=_jsonable(plan.info),
            modality_mass=Packed(stats.modality_mass) if stats.modality_mass is not None else None,
            entropy=Packed(stats.entropy) if stats.entropy is not None else None,
            scores=scores,
        )

    # ---- end -------------------------------------------------------------------------------
    def finish(self) -> Trace | None:
        """Record end-of-generation facts (timings, bytes held, decode-time evictions) into the trace."""
        self.clock.resolve()
        if self.trace is None or self.cache is None:
            return self.trace
        self.trace.bytes_end = cache_bytes(self.cache)
        self._step_bytes()
        steps = self._forward_steps
        for layer_trace in self.trace.layers:
            layer = self.cache.layers[layer_trace.layer]
            # Each log is read once: the layer turns its device log into lists in one transfer.
            if isinstance(layer, H2ODecodeLayer):
                layer_trace.decode_evictions = layer.evictions
                counts = layer.eviction_counts  # one per forward through the layer, i.e. per forward after compression
                layer_trace.decode_eviction_steps = [s for s, m in zip(steps, counts) for _ in range(m)]
            retrievals = getattr(layer, "retrievals", None)
            if retrievals is not None:
                layer_trace.decode_retrievals = retrievals
                layer_trace.decode_retrieval_steps = steps[: len(retrievals)]  # one row per forward
        self.trace.host_bytes_end = sum(
            layer.host_bytes() for layer in self.cache.layers if hasattr(layer, "host_bytes")
        )
        return self.trace


_ATTENTION_USERS: dict[int, tuple[int, Any]] = {}
_ATTENTION_LOCK = threading.Lock()


def _switch_attention(model: torch.nn.Module, delta: int) -> None:
    """Switch ``model`` to the mmkv attention while at least one session uses it; restore it after."""
    pretrained = cast("PreTrainedModel", model)  # set_attn_implementation is transformers'
    with _ATTENTION_LOCK:
        count, previous = _ATTENTION_USERS.get(id(model), (0, None))
        if delta > 0 and count == 0:
            previous = getattr(model_config(model), "_attn_implementation", None)
            if previous != ATTENTION_NAME:
                pretrained.set_attn_implementation(ATTENTION_NAME)
        count += delta
        if count <= 0:
            _ATTENTION_USERS.pop(id(model), None)
            if previous is not None and previous != ATTENTION_NAME:
                pretrained.set_attn_implementation(previous)
        else:
            _ATTENTION_USERS[id(model)] = (count, previous)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a composition's parts (mmkv.methods.compose)
        return {
            "type": type(value).__name__,
            **{f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@contextmanager
def compress(
    model: torch.nn.Module,
    method: str | Method = "snapkv",
    budget: float | int = 0.2,
    *,
    modality: ModalityMap | None = None,
    record_attention: bool = True,
    record_scores: bool = False,
    **method_params: Any,
) -> Iterator[Session]:
    """Compress the KV cache of every ``model.generate`` / forward prefill inside the block.

    The prompt (context + question) is compressed after its prefill, as in the papers
    (query-aware). ``modality`` defaults to the map the model's adapter builds from the inputs.
    """
    session = Session(
        model,
        method,
        budget,
        modality=modality,
        record_attention=record_attention,
        record_scores=record_scores,
        method_params=method_params,
    )
    with session.activate():
        yield session
