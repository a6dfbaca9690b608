"""HybridKV's decode-time cache layer: pruned static heads + chunk-retrieving dynamic heads.

One :class:`HybridLayer` replaces a decoder layer's cache when the HybridKV plan marks at least one
of its KV heads *dynamic* (``plan.decode["policy"] == "hybrid"``). It holds, for batch size 1:

- one flat device store (:class:`~mmkv.cache.layers.FlatPrefix`, no padding): the **static heads'** pruned
  prompt rows (``offsets`` per static head, like :class:`~mmkv.cache.layers.RaggedLayer`), then per **dynamic
  head** its ``sinks`` first and ``recent`` last prompt tokens followed by a retrieval buffer of
  ``top_chunks * chunk_size`` rows;
- per dynamic head and chunk of the middle span, a *summary* on the device (``scoring="mean"``: the
  mean key ``[n_dyn, n_chunks, d]``; ``"bounds"``: the element-wise min and max key, Quest-style);
- on the **host**: the full prompt keys/values of the dynamic heads (``host_keys``/``host_values``
  ``[n_dyn, L, d]``, pinned CPU memory on CUDA), where every chunk is ``chunk_size`` contiguous rows;
- a dense **tail** ``[1, H_kv, t, d]`` of generated tokens shared by all heads.

At every forward through :meth:`HybridLayer.attend` (each decode step), each dynamic head scores the
chunks with the current query — ``max`` over the query heads of its GQA group (and over the queries
when several are processed at once) of ``q . mean_key`` or of the Quest bound
``sum_d max(q_d min_d, q_d max_d)`` — loads the ``top_chunks`` best chunks from the host into the
buffer (only the chunks it does not hold yet) and attends, with one softmax, over
``sinks ∪ retrieved chunks ∪ recent ∪ generated tokens``. The chunk ids retrieved at each step are
appended to :attr:`HybridLayer.retrievals` (a list per step, one sorted list per dynamic head).

Chunks tile the middle span ``[sinks, L - recent)`` from its start; the last one may be shorter:
its unused buffer slots are masked out. :meth:`physical_bytes` counts device memory only (static
prefix, fixed tokens, buffers, summaries, tail, plus the store itself when ``offload`` is off);
:meth:`host_bytes` counts the host store. The plan's typed decode policy
(:class:`mmkv.methods.decode.ChunkRetrieval`) builds this layer.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from .layers import (
    DeviceLog,
    FlatPrefix,
    GrowthModel,
    SharedTailLayer,
    batch_size_error,
    group_rows,
    ragged_attention,
    tensor_bytes,
)

if TYPE_CHECKING:  # the cache applies plans; it never imports the methods that make them
    from ..methods.base import LayerPlan

STATIC, DYNAMIC = "static", "dynamic"


def chunk_grid(length: int, sinks: int, recent: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts and lengths of the chunks tiling ``[sinks, length - recent)`` (the last may be short)."""
    stop = length - recent
    starts = (
        torch.arange(sinks, stop, chunk_size, dtype=torch.long) if stop > sinks else torch.zeros(0, dtype=torch.long)
    )
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


class HybridLayer(SharedTailLayer):
    """A decoder layer's cache with static (pruned, ragged) and dynamic (chunk-retrieving) KV heads.

    Device storage is one :class:`~mmkv.cache.layers.FlatPrefix`: the static heads' kept rows, then per dynamic
    head its ``sinks``/``recent`` rows followed by ``top_chunks`` buffer slots of ``chunk_size`` rows; so
    attention is the same fused :func:`~mmkv.cache.layers.ragged_attention` as :class:`~mmkv.cache.layers.RaggedLayer`
    (unused rows of a short last chunk are hidden in ``prefix.hide``). A decode step selects the chunks
    and diffs them against the loaded ones on the device (a chunk that stays keeps its slot), then copies
    only the changed chunks' contiguous rows from the store (``index_select`` into a pinned staging
    buffer and an asynchronous upload on CUDA; a direct ``index_select`` on the CPU, empty when nothing
    changed). No ``.item()``/``.tolist()``/``torch.equal`` in the step: on the CPU it is sync-free; on
    CUDA the changed rows' host indices are the one small device-to-host transfer left (indexing host
    memory needs host indices). The retrieval log stays on the device (:attr:`retrievals` converts it).
    """

    def __init__(
        self,
        head_types: list[str],
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        prefix_positions: torch.Tensor,
        offsets: list[int],
        full_dynamic_keys: torch.Tensor,
        full_dynamic_values: torch.Tensor,
        sinks: int,
        recent: int,
        chunk_size: int,
        top_chunks: int,
        scoring: str,
        offload: bool,
        initial_chunks: torch.Tensor | None,
        logical_length: int,
        reserve: int = 0,
    ) -> None:
        super().__init__(logical_length)
        device = prefix_keys.device
        n_dyn, length, d = full_dynamic_keys.shape
        num_heads = len(head_types)
        self._init_tail(prefix_keys, num_heads, device, reserve)
        self.head_types = list(head_types)
        self.static_heads = [h for h, t in enumerate(head_types) if t == STATIC]
        self.dynamic_heads = [h for h, t in enumerate(head_types) if t == DYNAMIC]
        self.prefix_positions = prefix_positions
        self.offsets = list(offsets)
        self.sinks, self.recent, self.chunk_size, self.scoring = sinks, recent, chunk_size, scoring
        self.fixed_positions = torch.cat([torch.arange(sinks), torch.arange(length - recent, length)]).to(device)
        starts, lengths = chunk_grid(length, sinks, recent, chunk_size)
        self.chunk_starts, self.chunk_lengths = starts.to(device), lengths.to(device)
        k, c, f = min(int(top_chunks), int(starts.numel())), chunk_size, self.fixed_positions.numel()
        self.top_chunks, self.offloaded = k, bool(offload)
        # one flat device store: static rows, then per dynamic head [fixed rows | k*c buffer rows]
        n_static, span = prefix_keys.shape[0], f + k * c
        dyn_keys = full_dynamic_keys.new_zeros(n_dyn, span, d)
        dyn_values = full_dynamic_values.new_zeros(n_dyn, span, d)
        dyn_keys[:, :f], dyn_values[:, :f] = (
            full_dynamic_keys[:, self.fixed_positions],
            full_dynamic_values[:, self.fixed_positions],
        )
        head_start, head_len = [0] * num_heads, [0] * num_heads
        for j, h in enumerate(self.static_heads):
            head_start[h], head_len[h] = offsets[j], offsets[j + 1] - offsets[j]
        for j, h in enumerate(self.dynamic_heads):
            head_start[h], head_len[h] = n_static + j * span, span
        self.prefix = FlatPrefix(
            torch.cat([prefix_keys, dyn_keys.view(-1, d)]),
            torch.cat([prefix_values, dyn_values.view(-1, d)]),
            head_start,
            head_len,
        )
        self._dyn_index = torch.tensor(self.dynamic_heads, dtype=torch.long, device=device)
        slot_rows = (
            n_static + f + torch.arange(n_dyn, device=device)[:, None] * span + torch.arange(k * c, device=device)
        )
        self._buffer_rows = slot_rows  # [n_dyn, k*c]: flat rows of the buffer slots
        self.slot_chunks = torch.full((n_dyn, k), -1, dtype=torch.long, device=device)  # chunk held by each slot
        self._log = DeviceLog((n_dyn, k), device)
        self.host_keys: torch.Tensor | None = None  # the store, set when there are retrieval slots
        self.host_values: torch.Tensor | None = None
        self._staging: tuple[torch.Tensor, torch.Tensor] | None = None
        self.summaries: tuple[torch.Tensor, ...] = ()
        if k > 0:  # without retrieval slots the dynamic heads never need the rest of the prompt
            self.summaries = self._summarise(full_dynamic_keys)
            # store rows [n_dyn * rows, d]: chunk i of head j is rows j*rows + starts[i] + [0, c) (padded past L)
            rows = max(length, sinks + int(starts.numel()) * c)
            host = "cpu" if offload else device
            self.host_keys = _host_copy(_pad_rows(full_dynamic_keys, rows), host)
            self.host_values = _host_copy(_pad_rows(full_dynamic_values, rows), host)
            self._store_rows = rows
            if self.host_keys.device != device:
                self._staging = (
                    _host_copy(dyn_keys.new_empty(n_dyn * k * c, d), "cpu", pin=True),
                    _host_copy(dyn_values.new_empty(n_dyn * k * c, d), "cpu", pin=True),
                )
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
        """Make the slots hold chunks ``chunk_ids [n_dyn, k]``, copying only the chunks not held yet."""
        k, c = self.top_chunks, self.chunk_size
        held = self.slot_chunks
        keep_slot = (held[:, :, None] == chunk_ids[:, None, :]).any(-1)  # the slot's chunk stays
        needed = ~(chunk_ids[:, :, None] == held[:, None, :]).any(-1)  # the chunk is not held yet
        free = torch.sort(keep_slot.to(torch.int8), dim=-1, stable=True).indices  # freed slots first
        order = torch.sort((~needed).to(torch.int8), dim=-1, stable=True).indices  # needed chunks first
        fill = torch.arange(k, device=held.device) < needed.sum(-1, keepdim=True)
        slots = held.scatter(1, free, torch.where(fill, chunk_ids.gather(1, order), held.gather(1, free)))
        pairs = (slots != held).nonzero()  # [m, 2] (dynamic head, slot); a data-dependent size, no sync on the CPU
        self.slot_chunks = slots
        head, slot = pairs.unbind(1)
        offsets = torch.arange(c, device=held.device)
        src = ((head * self._store_rows + self.chunk_starts[slots[head, slot]])[:, None] + offsets).view(-1)
        dst = self._buffer_rows[head, slot * c][:, None] + offsets
        dst = dst.view(-1)
        host_keys, host_values = self.host_keys, self.host_values
        assert host_keys is not None and host_values is not None  # the store exists whenever there are slots
        if self._staging is None:
            self.prefix.keys.index_copy_(0, dst, host_keys.view(-1, host_keys.shape[-1]).index_select(0, src))
            self.prefix.values.index_copy_(0, dst, host_values.view(-1, host_values.shape[-1]).index_select(0, src))
        else:  # host indices for the pinned store; the blocking transfer also orders reuse of the staging buffers
            src = src.cpu()
            n = src.numel()
            for store, stage, flat in (
                (host_keys, self._staging[0], self.prefix.keys),
                (host_values, self._staging[1], self.prefix.values),
            ):
                torch.index_select(store.view(-1, store.shape[-1]), 0, src, out=stage[:n])
                flat.index_copy_(0, dst, stage[:n].to(flat.device, non_blocking=True))
        valid = offsets < self.chunk_lengths[slots][..., None]  # [n_dyn, k, c]
        self.prefix.hide[self._dyn_index[:, None], 0, self._buffer_rows] = ~valid.view(valid.shape[0], -1)

    # ---- transformers cache-layer API ----------------------------------------------------------
    # ---- mmkv API --------------------------------------------------------------------------------
    @property
    def retrievals(self) -> list[list[list[int]]]:
        """Per forward (decode step), per dynamic head: the sorted chunk ids retrieved (one transfer)."""
        return self._log.tolist()

    def retrieve(self, query: torch.Tensor) -> None:
        """Score the chunks with ``query [1, H_q, q, d]``, load the best into the buffer, record the step."""
        if not self.dynamic_heads:
            return
        k, n_dyn = self.top_chunks, len(self.dynamic_heads)
        if k == 0:
            self._log.append(self.slot_chunks[None])
            return
        if k >= self.chunk_starts.numel():
            ids = torch.arange(k, device=query.device).expand(n_dyn, k)
        else:
            grouped = group_rows(query, len(self.head_types)).index_select(0, self._dyn_index)  # [n_dyn, G*q, d]
            ids = top_chunk_ids(chunk_scores(grouped[:, None], self.summaries, self.scoring), k)
        self._load(ids)
        self._log.append(ids[None])

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        # `key`/`value` are the tail returned by update(): [1, H_kv, t, d], ending with the queries' own tokens.
        self.retrieve(query)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ragged_attention(query, self.prefix, key, value, scale)

    def _retrieved_positions(self, j: int) -> torch.Tensor:
        """Logical positions held in dynamic head ``j``'s buffer (valid rows of its current chunks)."""
        chunks = self.slot_chunks[j]
        offsets = torch.arange(self.chunk_size, device=chunks.device)
        rows = self.chunk_starts[chunks][:, None] + offsets
        return rows[offsets < self.chunk_lengths[chunks][:, None]]

    def kept_positions(self) -> list[torch.Tensor]:
        """Per KV head, the logical positions it attends to now (dynamic: fixed + current chunks)."""
        out = []
        for h, kind in enumerate(self.head_types):
            if kind == STATIC:
                j = self.static_heads.index(h)
                prompt = self.prefix_positions[self.offsets[j] : self.offsets[j + 1]]
            else:
                retrieved = self._retrieved_positions(self.dynamic_heads.index(h))
                prompt = torch.sort(torch.cat([self.fixed_positions, retrieved])).values
            out.append(torch.cat([prompt, self.tail_positions]))
        return out

    def summary_bytes(self) -> int:
        return tensor_bytes(*self.summaries)

    def buffer_bytes(self) -> int:
        per_row = 2 * self.prefix.keys.shape[-1] * self.prefix.keys.element_size()
        return self._buffer_rows.numel() * per_row

    def host_bytes(self) -> int:
        """Bytes of the host (offloaded) store of the dynamic heads' full prompt KV."""
        return tensor_bytes(self.host_keys, self.host_values) if self.offloaded else 0

    def physical_bytes(self) -> int:
        """Device bytes: static prefix, dynamic fixed tokens, buffers, summaries, tail (+ store if not offloaded)."""
        device = self.prefix.nbytes() + self.tail_bytes() + self.summary_bytes()
        if not self.offloaded:
            device += tensor_bytes(self.host_keys, self.host_values)
        return device

    def growth(self) -> GrowthModel:
        """Everything but the generated tail is fixed in size (retrieval rewrites the buffer in place)."""
        return GrowthModel.of_buffer(self._tail_keys, fixed=self.physical_bytes() - self.tail_bytes())

    def overhead_bytes(self) -> int:
        """Device bytes that hold no kept token: summaries + unused (masked) buffer slots (+ a non-offloaded store)."""
        per_row = 2 * self.prefix.keys.shape[-1] * self.prefix.keys.element_size()
        used = sum(int(self._retrieved_positions(j).numel()) for j in range(len(self.dynamic_heads)))
        store = 0 if self.offloaded else tensor_bytes(self.host_keys, self.host_values)
        return self.summary_bytes() + (self._buffer_rows.numel() - used) * per_row + store


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor [n, L, d]`` with zero rows appended up to ``rows`` (the last chunk's slot may reach past ``L``)."""
    if tensor.shape[1] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rows - tensor.shape[1], tensor.shape[2])], dim=1)


def _host_copy(tensor: torch.Tensor, device: torch.device | str, pin: bool = False) -> torch.Tensor:
    """A separate copy of ``tensor`` on ``device`` (pinned when it is the CPU side of a CUDA cache, or ``pin``)."""
    out = tensor.detach().to(device, copy=True).contiguous()
    if out.device.type == "cpu" and (tensor.device.type == "cuda" or pin) and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # pragma: no cover - pinning can fail on constrained hosts
            out = out.pin_memory()
    return out


def build_hybrid_layer(keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan, reserve: int = 0) -> HybridLayer:
    """:class:`mmkv.methods.decode.ChunkRetrieval`'s layer: build a :class:`HybridLayer` from full ``[1, H, L, d]`` tensors and the plan.

    ``plan.decode`` holds ``head_types`` (``"static"``/``"dynamic"`` per KV head), ``sinks``, ``recent``,
    ``chunk_size``, ``top_chunks``, ``scoring``, ``offload`` and ``initial_chunks`` (per dynamic head).
    Static heads keep ``plan.kept[h]``; ``reserve`` preallocates room for generated tokens. Adds ``dynamic_heads``,
    ``chunk_spans`` (``[start, stop)`` prompt positions per chunk id, for the decode replay), ``device_bytes``,
    ``host_bytes``, ``summary_bytes`` and ``overhead_bytes`` to ``plan.info`` for the trace.
    """
    if keys.shape[0] != 1:
        raise batch_size_error()
    spec = plan.decode
    assert spec is not None, "build_hybrid_layer needs the plan's ChunkRetrieval decode policy"
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
        types,
        prefix_keys,
        prefix_values,
        prefix_positions,
        offsets,
        keys[0, dynamic],
        values[0, dynamic],
        int(spec["sinks"]),
        int(spec["recent"]),
        int(spec["chunk_size"]),
        int(spec["top_chunks"]),
        spec.get("scoring", "mean"),
        bool(spec.get("offload", True)),
        initial_t,
        length,
        reserve,
    )
    starts, lengths = chunk_grid(length, int(spec["sinks"]), int(spec["recent"]), int(spec["chunk_size"]))
    plan.info.update(
        {
            "dynamic_heads": dynamic,  # KV heads whose retrievals rows are, in this order
            "chunk_spans": [[a, a + n] for a, n in zip(starts.tolist(), lengths.tolist())],  # chunk id -> [start, stop)
            "device_bytes": layer.physical_bytes(),
            "host_bytes": layer.host_bytes(),
            "summary_bytes": layer.summary_bytes(),
            "overhead_bytes": layer.overhead_bytes(),
        }
    )
    return layer
