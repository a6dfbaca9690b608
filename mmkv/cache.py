"""A compressed KV cache on transformers' cache-layer seam: evicted memory is really freed.

A plan replaces a layer of an ordinary ``transformers`` :class:`~transformers.DynamicCache` by one of
the layers below. Every layer keeps two lengths apart:

- the **logical** length (tokens seen: prompt + generated), returned by ``get_seq_length`` so that
  positions stay right (Qwen M-RoPE decode positions are ``logical length + rope_deltas``);
- the **physical** tokens it holds, which is what ``physical_bytes`` counts.

Memory layouts (batch size 1):

- :class:`DenseLayer` — every KV head keeps the same number of tokens: ``keys``/``values`` are
  ``[1, H_kv, n, d]`` like a ``DynamicLayer``; generated tokens are appended. Used by uniform
  methods (StreamingLLM, H2O, SnapKV, PyramidKV, LOOK-M, MEDA).
- :class:`RaggedLayer` — per-head budgets (AdaKV, MadaKV, HybridKV static heads). The compressed
  prompt is stored *flattened*: ``prefix_keys``/``prefix_values`` are ``[sum_h n_h, d]`` with head
  ``h`` at rows ``offsets[h]:offsets[h+1]``; tokens generated afterwards go to a dense tail
  ``[1, H_kv, t, d]`` (``keys``/``values``) that all heads share. Attention is computed per KV head
  over its prefix slice and the tail with one softmax (no padding, no copy of the prefix).
- :class:`H2ODecodeLayer` — a DenseLayer that evicts during decoding (original H2O).

Positions of the kept tokens are tracked per head (logical indices), for the trace and heatmaps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .methods.base import LayerPlan


class BatchSizeError(ValueError):
    """mmkv compresses one sequence at a time."""


def batch_size_error() -> BatchSizeError:
    return BatchSizeError(
        "mmkv supports batch size 1 (one prompt, one beam): loop over prompts, and use "
        "num_beams=1 / num_return_sequences=1 with a compressed cache."
    )


def bottom_right_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask ``[q, kv]`` where query ``i`` sees keys ``<= kv_len - q_len + i`` (None if all visible)."""
    if q_len == 1:
        return None
    q_idx = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= q_idx


class CompressedLayer(DynamicLayer):
    """Common behaviour: logical length, mask sizes, physical bytes, per-head kept positions."""

    def __init__(self, logical_length: int) -> None:
        super().__init__()
        self.logical_length = logical_length

    # -- transformers cache-layer API -------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only meaningful for uniform layers; mmkv's attention builds its own mask for compressed layers.
        physical = self.stored_length()
        return physical + query_length, self.logical_length - physical

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise batch_size_error()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1:
            raise batch_size_error()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if beam_idx.numel() != 1:
            raise batch_size_error()

    # -- mmkv API ---------------------------------------------------------------------------
    def stored_length(self) -> int:
        """Tokens held by the longest head."""
        return max(int(p.numel()) for p in self.kept_positions())

    def kept_positions(self) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def physical_bytes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def attend(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        scaling: float | None, dropout: float = 0.0,
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """Attention output ``[1, q, H_q, d]`` of ``query`` over what this layer holds."""
        raise NotImplementedError


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class AppendBuffer:
    """A tensor that grows along one dimension, with optional preallocated room (``reserve``).

    With ``reserve = 0`` appending concatenates (what ``DynamicLayer`` does: memory held = tokens
    stored). With ``reserve > 0`` the storage is allocated once for ``n + reserve`` entries and appended
    tokens are written in place — no per-step copy of the whole cache, which is what a decode step
    near the memory-bandwidth floor needs; the reserved room is memory held and is counted as such.
    """

    def __init__(self, data: torch.Tensor, reserve: int = 0, dim: int = -2) -> None:
        self.dim = dim % data.dim()
        self.fill = data.shape[self.dim]
        if reserve > 0:
            shape = list(data.shape)
            shape[self.dim] += reserve
            self.store = data.new_empty(shape)
            self.store.narrow(self.dim, 0, self.fill).copy_(data)
        else:
            self.store = data

    @property
    def data(self) -> torch.Tensor:
        """The filled part (a view when room is reserved)."""
        return self.store if self.fill == self.store.shape[self.dim] else self.store.narrow(self.dim, 0, self.fill)

    def append(self, new: torch.Tensor) -> torch.Tensor:
        n = new.shape[self.dim]
        if self.fill + n <= self.store.shape[self.dim]:
            self.store.narrow(self.dim, self.fill, n).copy_(new)
        else:  # no room left: grow exactly (reserved room, if any, was used up)
            self.store = torch.cat([self.data, new], dim=self.dim)
        self.fill += n
        return self.data

    @property
    def nbytes(self) -> int:
        return self.store.numel() * self.store.element_size()


class DenseLayer(CompressedLayer):
    """Uniform budget across heads: ``keys``/``values`` ``[1, H_kv, n, d]``, positions ``[H_kv, n]``.

    ``reserve`` preallocates room for that many generated tokens (see :class:`AppendBuffer`).
    """

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, logical_length: int, reserve: int = 0
    ) -> None:
        super().__init__(logical_length)
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._keys, self._values = AppendBuffer(keys, reserve), AppendBuffer(values, reserve)
        self._positions = AppendBuffer(positions, reserve, dim=-1)

    # keys / values / positions are the filled views of the buffers; assigning replaces the buffer
    keys = property(lambda self: self._keys.data if getattr(self, "_keys", None) else None,
                    lambda self, v: setattr(self, "_keys", AppendBuffer(v) if v is not None else None))
    values = property(lambda self: self._values.data if getattr(self, "_values", None) else None,
                      lambda self, v: setattr(self, "_values", AppendBuffer(v) if v is not None else None))
    positions = property(lambda self: self._positions.data,
                         lambda self, v: setattr(self, "_positions", AppendBuffer(v, dim=-1)))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[0] != 1:
            raise batch_size_error()
        n_new = key_states.shape[-2]
        new_pos = torch.arange(self.logical_length, self.logical_length + n_new, device=self.device)
        keys, values = self._keys.append(key_states), self._values.append(value_states)
        self._positions.append(new_pos.expand(self._positions.store.shape[0], -1))
        self.logical_length += n_new
        return keys, values

    def kept_positions(self) -> list[torch.Tensor]:
        return list(self.positions.unbind(0))

    def stored_length(self) -> int:
        return self._keys.fill

    def physical_bytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        mask = bottom_right_causal_mask(query.shape[2], key.shape[2], query.device)
        if mask is not None:
            mask = mask[None, None]
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False)
        return out


def grouped_attention(
    query: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over several key/value blocks for one KV head's query group.

    ``query [G, q, d]``; each part is ``(keys [n, d], values [n, d], mask [q, n] or None)``.
    Returns the output ``[G, q, d]`` and the fp32 probabilities ``[G, q, sum n]``.
    """
    logits = []
    for keys, _, mask in parts:
        s = torch.matmul(query.float(), keys.float().T) * scaling
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        logits.append(s)
    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    out = torch.zeros(query.shape[0], query.shape[1], parts[0][1].shape[-1], dtype=torch.float32, device=query.device)
    start = 0
    for keys, values, _ in parts:
        n = keys.shape[0]
        out += torch.matmul(probs[..., start : start + n], values.float())
        start += n
    return out.to(query.dtype), probs


class RaggedLayer(CompressedLayer):
    """Per-head budgets, flattened prefix + shared dense tail (see the module docstring)."""

    def __init__(
        self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, prefix_positions: torch.Tensor,
        offsets: list[int], logical_length: int, reserve: int = 0,
    ) -> None:
        super().__init__(logical_length)
        num_heads = len(offsets) - 1
        empty = prefix_keys.new_zeros(1, num_heads, 0, prefix_keys.shape[-1])
        self.lazy_initialization(empty, empty)
        # the tail (tokens appended after compression, shared by all heads), with optional reserved room
        self._tail_keys, self._tail_values = AppendBuffer(empty, reserve), AppendBuffer(empty.clone(), reserve)
        self._tail_positions = AppendBuffer(torch.zeros(0, dtype=torch.long, device=prefix_positions.device), reserve, -1)
        self.keys, self.values = self._tail_keys.data, self._tail_values.data
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_positions = prefix_positions
        self.offsets = list(offsets)

    @property
    def tail_positions(self) -> torch.Tensor:
        return self._tail_positions.data

    @property
    def num_heads(self) -> int:
        return len(self.offsets) - 1

    def head_prefix(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.offsets[h], self.offsets[h + 1]
        return self.prefix_keys[a:b], self.prefix_values[a:b]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[0] != 1:
            raise batch_size_error()
        n_new = key_states.shape[-2]
        self.keys = self._tail_keys.append(key_states)
        self.values = self._tail_values.append(value_states)
        self._tail_positions.append(
            torch.arange(self.logical_length, self.logical_length + n_new, device=self.prefix_positions.device)
        )
        self.logical_length += n_new
        return self.keys, self.values

    def kept_positions(self) -> list[torch.Tensor]:
        return [
            torch.cat([self.prefix_positions[self.offsets[h] : self.offsets[h + 1]], self.tail_positions])
            for h in range(self.num_heads)
        ]

    def physical_bytes(self) -> int:
        return tensor_bytes(self.prefix_keys, self.prefix_values) + self._tail_keys.nbytes + self._tail_values.nbytes

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        # `key`/`value` are the tail returned by update(): [1, H_kv, t, d], ending with the queries' own tokens.
        h_q, q_len, d = query.shape[1], query.shape[2], query.shape[3]
        group = h_q // self.num_heads
        scale = scaling if scaling is not None else d**-0.5
        tail_mask = bottom_right_causal_mask(q_len, key.shape[2], query.device)
        outs = []
        for h in range(self.num_heads):
            pk, pv = self.head_prefix(h)
            out, _ = grouped_attention(
                query[0, h * group : (h + 1) * group],
                [(pk, pv, None), (key[0, h], value[0, h], tail_mask)],
                scale,
            )
            outs.append(out)
        return torch.cat(outs, dim=0).transpose(0, 1).unsqueeze(0).contiguous()  # [1, q, H_q, d]


class H2ODecodeLayer(DenseLayer):
    """Original H2O during decoding: accumulate attention, keep ``capacity`` tokens per head.

    After each step's attention, while the cache holds more than ``capacity`` tokens, the
    lowest-scored token older than the last ``recent`` is evicted in every KV head (Zhang et al.
    2023, Alg. 1). Query-head probabilities are averaged over each GQA group.
    """

    def __init__(self, keys, values, positions, logical_length, capacity: int, recent: int, scores: torch.Tensor):
        super().__init__(keys, values, positions, logical_length)
        self.capacity, self.recent = capacity, recent
        self.scores = scores.float()  # [H_kv, n]
        self.evictions: list[list[int]] = []  # per decode step, evicted logical position per head

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states)
        zeros = self.scores.new_zeros(self.scores.shape[0], key_states.shape[-2])
        self.scores = torch.cat([self.scores, zeros], dim=-1)
        return out

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        h_kv, d = key.shape[1], query.shape[-1]
        group = query.shape[1] // h_kv
        scale = scaling if scaling is not None else d**-0.5
        mask = bottom_right_causal_mask(query.shape[2], key.shape[2], query.device)
        outs = []
        for h in range(h_kv):
            out, probs = grouped_attention(query[0, h * group : (h + 1) * group], [(key[0, h], value[0, h], mask)], scale)
            self.scores[h] += probs.sum(1).mean(0)
            outs.append(out)
        self._evict()
        return torch.cat(outs, dim=0).transpose(0, 1).unsqueeze(0).contiguous()

    def _evict(self) -> None:
        while self.keys.shape[-2] > self.capacity:
            n = self.keys.shape[-2]
            candidates = self.scores[:, : max(0, n - self.recent)]
            if candidates.shape[-1] == 0:
                return
            drop = candidates.argmin(dim=-1)  # [H_kv]
            keep = torch.ones(self.scores.shape, dtype=torch.bool, device=self.scores.device)
            keep[torch.arange(keep.shape[0]), drop] = False
            self.evictions.append(self.positions[torch.arange(keep.shape[0]), drop].tolist())
            idx = keep.nonzero()[:, 1].view(keep.shape[0], n - 1)
            self.keys = torch.gather(self.keys, 2, idx[None, :, :, None].expand(1, -1, -1, self.keys.shape[-1]))
            self.values = torch.gather(self.values, 2, idx[None, :, :, None].expand(1, -1, -1, self.values.shape[-1]))
            self.positions = torch.gather(self.positions, 1, idx)
            self.scores = torch.gather(self.scores, 1, idx)


# ---- applying a plan --------------------------------------------------------------------------


def layer_tensors(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncompressed keys/values ``[1, H_kv, L, d]`` of a layer right after prefill."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, CompressedLayer):
        raise RuntimeError(f"layer {layer_idx} is already compressed")
    return layer.keys, layer.values


def kept_contents(
    keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan, kept: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per head, the keys/values ``[n_h, d]`` to store: the plan's merged contents, else gathered from ``[1,H,L,d]``."""
    head_keys = plan.keys if plan.keys is not None else [keys[0, h, k] for h, k in enumerate(kept)]
    head_values = plan.values if plan.values is not None else [values[0, h, k] for h, k in enumerate(kept)]
    return head_keys, head_values


def build_layer(keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan, reserve: int = 0) -> CompressedLayer | None:
    """Gather (or take the merged) kept tokens of ``plan`` from full ``keys``/``values`` ``[1,H,L,d]``.

    ``reserve`` preallocates room for that many generated tokens. Returns ``None`` when the plan keeps
    everything unchanged and nothing is to be reserved (the layer stays as it is).
    """
    if keys.shape[0] != 1:
        raise batch_size_error()
    num_heads, length = keys.shape[1], keys.shape[2]
    if len(plan.kept) != num_heads:
        raise ValueError(f"plan has {len(plan.kept)} heads, the cache has {num_heads} KV heads")
    device = keys.device
    kept = [k.to(device=device, dtype=torch.long) for k in plan.kept]
    for h, k in enumerate(kept):
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= length):
            raise ValueError(f"plan keeps position out of range [0, {length}) in head {h}")
    unchanged = plan.keys is None and plan.decode is None and all(k.numel() == length for k in kept)
    if unchanged and reserve == 0:
        return None
    if plan.decode is not None:
        policy = plan.decode.get("policy")
        if policy not in DECODE_POLICIES:
            raise ValueError(f"unknown decode policy {policy!r}; known: {', '.join(sorted(DECODE_POLICIES))}")
        return DECODE_POLICIES[policy](keys, values, plan)
    head_keys, head_values = kept_contents(keys, values, plan, kept)
    counts = [k.numel() for k in kept]
    if len(set(counts)) == 1:
        k_dense = torch.stack([t.to(keys.dtype) for t in head_keys])[None]
        v_dense = torch.stack([t.to(values.dtype) for t in head_values])[None]
        return DenseLayer(k_dense, v_dense, torch.stack(kept), length, reserve)
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    return RaggedLayer(
        torch.cat([t.to(keys.dtype) for t in head_keys]),
        torch.cat([t.to(values.dtype) for t in head_values]),
        torch.cat(kept),
        offsets,
        length,
        reserve,
    )


def _h2o_layer(keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan) -> CompressedLayer:
    kept = [k.to(device=keys.device, dtype=torch.long) for k in plan.kept]
    if len({k.numel() for k in kept}) != 1:
        raise ValueError("H2O decode-time eviction needs the same budget in every head")
    head_keys, head_values = kept_contents(keys, values, plan, kept)
    scores = torch.stack([s.float().to(keys.device) for s in plan.decode["scores"]])
    return H2ODecodeLayer(
        torch.stack(head_keys)[None].to(keys.dtype), torch.stack(head_values)[None].to(values.dtype),
        torch.stack(kept), keys.shape[2], plan.decode["capacity"], plan.decode["recent"], scores,
    )


#: Decode-time policies: ``plan.decode["policy"]`` -> builder ``(full keys, full values, plan) -> layer``.
#: A method with its own decode behaviour registers its layer builder here.
DECODE_POLICIES: dict[str, Callable[[torch.Tensor, torch.Tensor, LayerPlan], CompressedLayer]] = {"h2o": _h2o_layer}


def apply_plan(cache: Cache, layer_idx: int, plan: LayerPlan, reserve: int = 0) -> None:
    """Replace layer ``layer_idx`` of ``cache`` by its compressed version; the full tensors are released."""
    keys, values = layer_tensors(cache, layer_idx)
    new_layer = build_layer(keys, values, plan, reserve)
    if new_layer is not None:
        cache.layers[layer_idx] = new_layer


def layer_bytes(layer: Any) -> int:
    """Physical bytes of keys+values held by one cache layer (any transformers layer or ours)."""
    if isinstance(layer, CompressedLayer):
        return layer.physical_bytes()
    return tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None))


def cache_bytes(cache: Cache) -> int:
    """Physical bytes of keys+values held by the whole cache."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def kept_positions(cache: Cache, layer_idx: int) -> list[torch.Tensor]:
    """Logical positions held per KV head in a layer (all positions for an uncompressed layer)."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, CompressedLayer):
        return layer.kept_positions()
    n = layer.get_seq_length()
    heads = layer.keys.shape[1] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
    return [torch.arange(n) for _ in range(heads)]
