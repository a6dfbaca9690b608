"""HybridKV's decode-time cache layer: pruned static heads + chunk-retrieving dynamic heads.

One :class:`HybridLayer` replaces a decoder layer's cache when the HybridKV plan marks at least one
of its KV heads *dynamic* (``plan.decode["policy"] == "hybrid"``). It holds, for batch size 1:

- **static heads** — the pruned prompt, stored ragged and flattened like :class:`~mmkv.cache.RaggedLayer`
  (``prefix_keys``/``prefix_values`` ``[sum_h n_h, d]``, head ``j`` at ``offsets[j]:offsets[j+1]``);
- **dynamic heads** — on the device: the ``sinks`` first and ``recent`` last prompt tokens
  (``fixed_keys``/``fixed_values`` ``[n_dyn, f, d]``), one chunk *summary* per chunk of the middle span
  (``scoring="mean"``: the mean key ``[n_dyn, n_chunks, d]``; ``"bounds"``: the element-wise min and
  max key, Quest-style), and a retrieval buffer of ``top_chunks * chunk_size`` slots
  (``buffer_keys``/``buffer_values`` ``[n_dyn, k*c, d]``); on the **host**: the full prompt keys/values of
  the dynamic heads (``host_keys``/``host_values`` ``[n_dyn, L, d]``, pinned CPU memory on CUDA);
- a dense **tail** ``[1, H_kv, t, d]`` of generated tokens shared by all heads.

At every forward through :meth:`HybridLayer.attend` (each decode step), each dynamic head scores the
chunks with the current query — ``max`` over the query heads of its GQA group (and over the queries
when several are processed at once) of ``q . mean_key`` or of the Quest bound
``sum_d max(q_d min_d, q_d max_d)`` — loads the ``top_chunks`` best chunks from the host into the
buffer (skipped when the set did not change) and attends, with one softmax, over
``sinks ∪ retrieved chunks ∪ recent ∪ generated tokens``. The chunk ids retrieved at each step are
appended to :attr:`HybridLayer.retrievals` (a list per step, one sorted list per dynamic head).

Chunks tile the middle span ``[sinks, L - recent)`` from its start; the last one may be shorter:
its unused buffer slots are masked out. :meth:`physical_bytes` counts device memory only (static
prefix, fixed tokens, buffers, summaries, tail, plus the store itself when ``offload`` is off);
:meth:`host_bytes` counts the host store. Importing this module registers the ``"hybrid"`` decode
policy in :data:`mmkv.cache.DECODE_POLICIES`.
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import DECODE_POLICIES, CompressedLayer, batch_size_error, grouped_attention, tensor_bytes, bottom_right_causal_mask
from .methods.base import LayerPlan

STATIC, DYNAMIC = "static", "dynamic"


def chunk_grid(length: int, sinks: int, recent: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts and lengths of the chunks tiling ``[sinks, length - recent)`` (the last may be short)."""
    stop = length - recent
    starts = torch.arange(sinks, stop, chunk_size, dtype=torch.long) if stop > sinks else torch.zeros(0, dtype=torch.long)
    lengths = torch.clamp(stop - starts, max=chunk_size)
    return starts, lengths


def chunk_scores(query: torch.Tensor, summaries: tuple[torch.Tensor, ...], scoring: str) -> torch.Tensor:
    """Score of every chunk for every dynamic head: ``query [n_dyn, G, q, d]`` -> ``[n_dyn, n_chunks]``.

    ``"mean"``: ``max_{g,q} q . mean_key``; ``"bounds"``: ``max_{g,q} sum_d max(q_d min_d, q_d max_d)``,
    the Quest upper bound of ``q . k`` over the chunk.
    """
    q = query.float()
    if scoring == "mean":
        (mean,) = summaries
        s = torch.einsum("ngqd,ncd->ngqc", q, mean.float())
    elif scoring == "bounds":
        low, high = summaries
        qe = q.unsqueeze(-2)  # [n, G, q, 1, d]
        s = torch.maximum(qe * low.float()[:, None, None], qe * high.float()[:, None, None]).sum(-1)
    else:
        raise ValueError(f"unknown chunk scoring {scoring!r}: use 'mean' or 'bounds'")
    return s.amax(dim=(1, 2))


def top_chunk_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the ``k`` best chunk ids (ties toward the lower id), sorted ascending: ``[n_dyn, k]``."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


class HybridLayer(CompressedLayer):
    """A decoder layer's cache with static (pruned, ragged) and dynamic (chunk-retrieving) KV heads."""

    def __init__(
        self,
        head_types: list[str],
        prefix_keys: torch.Tensor, prefix_values: torch.Tensor, prefix_positions: torch.Tensor, offsets: list[int],
        full_dynamic_keys: torch.Tensor, full_dynamic_values: torch.Tensor,
        sinks: int, recent: int, chunk_size: int, top_chunks: int, scoring: str, offload: bool,
        initial_chunks: torch.Tensor | None, logical_length: int,
    ) -> None:
        super().__init__(logical_length)
        device = prefix_keys.device
        d = full_dynamic_keys.shape[-1]
        num_heads = len(head_types)
        empty = prefix_keys.new_zeros(1, num_heads, 0, d)
        self.lazy_initialization(empty, empty)
        self.keys, self.values = empty, empty.clone()  # the generated-token tail
        self.tail_positions = torch.zeros(0, dtype=torch.long, device=device)
        self.head_types = list(head_types)
        self.static_heads = [h for h, t in enumerate(head_types) if t == STATIC]
        self.dynamic_heads = [h for h, t in enumerate(head_types) if t == DYNAMIC]
        # static heads: ragged flattened prefix
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_positions = prefix_positions
        self.offsets = list(offsets)
        # dynamic heads
        length = logical_length
        n_dyn = len(self.dynamic_heads)
        self.sinks, self.recent, self.chunk_size, self.scoring = sinks, recent, chunk_size, scoring
        self.fixed_positions = torch.cat([torch.arange(sinks), torch.arange(length - recent, length)]).to(device)
        self.fixed_keys = full_dynamic_keys[:, self.fixed_positions].contiguous()
        self.fixed_values = full_dynamic_values[:, self.fixed_positions].contiguous()
        starts, lengths = chunk_grid(length, sinks, recent, chunk_size)
        self.chunk_starts, self.chunk_lengths = starts.to(device), lengths.to(device)
        self.top_chunks = min(int(top_chunks), int(starts.numel()))
        self.offloaded = bool(offload)
        self.retrievals: list[list[list[int]]] = []
        self.host_keys = self.host_values = None
        self.summaries: tuple[torch.Tensor, ...] = ()
        k, c = self.top_chunks, chunk_size
        self.buffer_keys = full_dynamic_keys.new_zeros(n_dyn, k * c, d)
        self.buffer_values = full_dynamic_values.new_zeros(n_dyn, k * c, d)
        self.buffer_positions = torch.zeros(n_dyn, k * c, dtype=torch.long, device=device)
        self.buffer_valid = torch.zeros(n_dyn, k * c, dtype=torch.bool, device=device)
        self.current_chunks = torch.full((n_dyn, k), -1, dtype=torch.long, device=device)
        if k > 0:  # without retrieval slots the dynamic heads never need the rest of the prompt
            self.summaries = self._summarise(full_dynamic_keys)
            host = "cpu" if offload else device
            self.host_keys = _host_copy(full_dynamic_keys, host)
            self.host_values = _host_copy(full_dynamic_values, host)
            if initial_chunks is None:
                initial_chunks = torch.arange(k).expand(n_dyn, k)
            self._load(initial_chunks.to(device=device, dtype=torch.long))

    # ---- construction helpers ------------------------------------------------------------------
    def _summarise(self, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per dynamic head and chunk: the mean key, or the (min, max) keys, in the keys' dtype."""
        n_dyn, _, d = keys.shape
        parts = []
        for start, n in zip(self.chunk_starts.tolist(), self.chunk_lengths.tolist()):
            parts.append(keys[:, start : start + n].float())
        if self.scoring == "mean":
            mean = torch.stack([p.mean(1) for p in parts], dim=1) if parts else keys.new_zeros(n_dyn, 0, d).float()
            return (mean.to(keys.dtype),)
        low = torch.stack([p.amin(1) for p in parts], dim=1).to(keys.dtype)
        high = torch.stack([p.amax(1) for p in parts], dim=1).to(keys.dtype)
        return low, high

    def _load(self, chunk_ids: torch.Tensor) -> None:
        """Bring chunks ``chunk_ids [n_dyn, k]`` from the host store into the device buffer."""
        if torch.equal(chunk_ids, self.current_chunks):
            return
        c = self.chunk_size
        offsets = torch.arange(c, device=chunk_ids.device)
        starts = self.chunk_starts[chunk_ids]  # [n_dyn, k]
        valid = offsets[None, None, :] < self.chunk_lengths[chunk_ids][..., None]  # [n_dyn, k, c]
        positions = torch.where(valid, starts[..., None] + offsets, starts[..., None])  # padded slots repeat the start
        positions = positions.reshape(positions.shape[0], -1)
        host_index = positions.to(self.host_keys.device)[..., None].expand(-1, -1, self.host_keys.shape[-1])
        self.buffer_keys.copy_(torch.gather(self.host_keys, 1, host_index), non_blocking=True)
        self.buffer_values.copy_(torch.gather(self.host_values, 1, host_index), non_blocking=True)
        self.buffer_positions = positions
        self.buffer_valid = valid.reshape(valid.shape[0], -1)
        self.current_chunks = chunk_ids.clone()

    # ---- transformers cache-layer API ----------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[0] != 1:
            raise batch_size_error()
        n_new = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new_pos = torch.arange(self.logical_length, self.logical_length + n_new, device=self.tail_positions.device)
        self.tail_positions = torch.cat([self.tail_positions, new_pos])
        self.logical_length += n_new
        return self.keys, self.values

    # ---- mmkv API --------------------------------------------------------------------------------
    def retrieve(self, query: torch.Tensor) -> torch.Tensor | None:
        """Score the chunks with ``query [1, H_q, q, d]``, load the best into the buffer, record the step."""
        if not self.dynamic_heads:
            return None
        k = self.top_chunks
        if k == 0:
            self.retrievals.append([[] for _ in self.dynamic_heads])
            return None
        h_q, q_len, d = query.shape[1], query.shape[2], query.shape[3]
        group = h_q // len(self.head_types)
        grouped = query[0].reshape(len(self.head_types), group, q_len, d)[self.dynamic_heads]  # [n_dyn, G, q, d]
        if k >= self.chunk_starts.numel():
            ids = torch.arange(k, device=query.device).expand(len(self.dynamic_heads), k)
        else:
            ids = top_chunk_ids(chunk_scores(grouped, self.summaries, self.scoring), k)
        self._load(ids)
        self.retrievals.append(self.current_chunks.tolist())
        return self.current_chunks

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        # `key`/`value` are the tail returned by update(): [1, H_kv, t, d], ending with the queries' own tokens.
        h_q, q_len, d = query.shape[1], query.shape[2], query.shape[3]
        group = h_q // len(self.head_types)
        scale = scaling if scaling is not None else d**-0.5
        tail_mask = bottom_right_causal_mask(q_len, key.shape[2], query.device)
        self.retrieve(query)
        outs = []
        for h, kind in enumerate(self.head_types):
            q = query[0, h * group : (h + 1) * group]
            tail = (key[0, h], value[0, h], tail_mask)
            if kind == STATIC:
                j = self.static_heads.index(h)
                a, b = self.offsets[j], self.offsets[j + 1]
                parts = [(self.prefix_keys[a:b], self.prefix_values[a:b], None), tail]
            else:
                j = self.dynamic_heads.index(h)
                buf_mask = self.buffer_valid[j][None, :].expand(q_len, -1)
                parts = [
                    (self.fixed_keys[j], self.fixed_values[j], None),
                    (self.buffer_keys[j], self.buffer_values[j], buf_mask),
                    tail,
                ]
            out, _ = grouped_attention(q, parts, scale)
            outs.append(out)
        return torch.cat(outs, dim=0).transpose(0, 1).unsqueeze(0).contiguous()  # [1, q, H_q, d]

    def kept_positions(self) -> list[torch.Tensor]:
        """Per KV head, the logical positions it attends to now (dynamic: fixed + current chunks)."""
        out = []
        for h, kind in enumerate(self.head_types):
            if kind == STATIC:
                j = self.static_heads.index(h)
                prompt = self.prefix_positions[self.offsets[j] : self.offsets[j + 1]]
            else:
                j = self.dynamic_heads.index(h)
                retrieved = self.buffer_positions[j][self.buffer_valid[j]]
                prompt = torch.sort(torch.cat([self.fixed_positions, retrieved])).values
            out.append(torch.cat([prompt, self.tail_positions]))
        return out

    def summary_bytes(self) -> int:
        return tensor_bytes(*self.summaries)

    def buffer_bytes(self) -> int:
        return tensor_bytes(self.buffer_keys, self.buffer_values)

    def host_bytes(self) -> int:
        """Bytes of the host (offloaded) store of the dynamic heads' full prompt KV."""
        return tensor_bytes(self.host_keys, self.host_values) if self.offloaded else 0

    def physical_bytes(self) -> int:
        """Device bytes: static prefix, dynamic fixed tokens, buffers, summaries, tail (+ store if not offloaded)."""
        device = tensor_bytes(self.prefix_keys, self.prefix_values, self.fixed_keys, self.fixed_values, self.keys, self.values)
        device += self.buffer_bytes() + self.summary_bytes()
        if not self.offloaded:
            device += tensor_bytes(self.host_keys, self.host_values)
        return device

    def overhead_bytes(self) -> int:
        """Device bytes that hold no kept token: summaries + unused (masked) buffer slots (+ a non-offloaded store)."""
        per_slot = 2 * self.buffer_keys.shape[-1] * self.buffer_keys.element_size()
        unused = int((~self.buffer_valid).sum()) * per_slot
        store = 0 if self.offloaded else tensor_bytes(self.host_keys, self.host_values)
        return self.summary_bytes() + unused + store


def _host_copy(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A separate copy of ``tensor`` on ``device`` (pinned when it is the CPU side of a CUDA cache)."""
    out = tensor.detach().to(device, copy=True).contiguous()
    if out.device.type == "cpu" and tensor.device.type == "cuda":
        try:
            out = out.pin_memory()
        except RuntimeError:  # pragma: no cover - pinning can fail on constrained hosts
            pass
    return out


def build_hybrid_layer(keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan) -> HybridLayer:
    """``DECODE_POLICIES["hybrid"]``: build a :class:`HybridLayer` from full ``[1, H, L, d]`` tensors and the plan.

    ``plan.decode`` holds ``head_types`` (``"static"``/``"dynamic"`` per KV head), ``sinks``, ``recent``,
    ``chunk_size``, ``top_chunks``, ``scoring``, ``offload`` and ``initial_chunks`` (per dynamic head).
    Static heads keep ``plan.kept[h]``. Adds ``device_bytes``, ``host_bytes``, ``summary_bytes`` and
    ``overhead_bytes`` to ``plan.info`` for the trace.
    """
    if keys.shape[0] != 1:
        raise batch_size_error()
    spec = plan.decode
    types = list(spec["head_types"])
    device = keys.device
    length = keys.shape[2]
    static = [h for h, t in enumerate(types) if t == STATIC]
    dynamic = [h for h, t in enumerate(types) if t == DYNAMIC]
    if len(static) + len(dynamic) != keys.shape[1]:
        raise ValueError(f"hybrid plan types {types} do not match {keys.shape[1]} KV heads")
    kept = [plan.kept[h].to(device=device, dtype=torch.long) for h in static]
    offsets = [0]
    for k in kept:
        offsets.append(offsets[-1] + k.numel())
    d = keys.shape[-1]
    prefix_keys = torch.cat([keys[0, h, k] for h, k in zip(static, kept)]) if static else keys.new_zeros(0, d)
    prefix_values = torch.cat([values[0, h, k] for h, k in zip(static, kept)]) if static else values.new_zeros(0, d)
    prefix_positions = torch.cat(kept) if static else torch.zeros(0, dtype=torch.long, device=device)
    initial = spec.get("initial_chunks")
    initial_t = torch.as_tensor(initial, dtype=torch.long) if initial is not None and len(dynamic) else None
    if initial_t is not None and initial_t.numel() == 0:
        initial_t = None
    layer = HybridLayer(
        types, prefix_keys, prefix_values, prefix_positions, offsets,
        keys[0, dynamic], values[0, dynamic],
        int(spec["sinks"]), int(spec["recent"]), int(spec["chunk_size"]), int(spec["top_chunks"]),
        spec.get("scoring", "mean"), bool(spec.get("offload", True)), initial_t, length,
    )
    plan.info.update({
        "device_bytes": layer.physical_bytes(),
        "host_bytes": layer.host_bytes(),
        "summary_bytes": layer.summary_bytes(),
        "overhead_bytes": layer.overhead_bytes(),
    })
    return layer


DECODE_POLICIES["hybrid"] = build_hybrid_layer
