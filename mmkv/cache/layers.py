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
  ``[1, H_kv, t, d]`` (``keys``/``values``) that all heads share. Attention over each head's prefix
  slice and the tail, with one softmax, is one fused computation for all heads
  (:func:`ragged_attention`: no loop over heads, no padding kept, no up-cast of the cache).
- :class:`H2ODecodeLayer` — a DenseLayer that evicts during decoding (original H2O).

Positions of the kept tokens are tracked per head (logical indices), for the trace and heatmaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

if TYPE_CHECKING:  # the cache applies plans; it never imports the methods that make them
    from ..methods.base import LayerPlan
    from ..methods.decode import DecodePolicy


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

    def growth(self) -> GrowthModel | None:
        """How :meth:`physical_bytes` evolves with appended tokens, from the shapes now (None: unknown)."""
        return None

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        dropout: float = 0.0,
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


class GrowthModel:
    """A cache layer's physical bytes after a sequence of forwards, from shapes and counts only (no device).

    ``fixed`` bytes never change; a growing store (an :class:`AppendBuffer` or a ``DynamicLayer``) holds
    ``fill`` tokens in room for ``store``, ``per_token`` bytes each. Appending ``n`` tokens writes in
    place while there is room, else grows the store to exactly the tokens held; with ``capacity`` set,
    H2O then evicts ``min(fill - capacity, fill - recent)`` tokens and keeps one slot of room
    (:class:`H2ODecodeLayer`). The session records per-step bytes with it (``Trace.step_bytes``).
    """

    def __init__(
        self, fixed: int, per_token: int, fill: int, store: int, capacity: int | None = None, recent: int = 0
    ) -> None:
        self.fixed, self.per_token, self.fill, self.store = fixed, per_token, fill, store
        self.capacity, self.recent = capacity, recent

    @classmethod
    def of_buffer(cls, buffer: AppendBuffer, fixed: int = 0, values: bool = True, **kwargs: Any) -> GrowthModel:
        """A key buffer (and, with ``values``, its value twin of the same shape) growing along its ``dim``."""
        store = buffer.store.shape[buffer.dim]
        per_token = (buffer.store.numel() // store if store else _slice_numel(buffer)) * buffer.store.element_size()
        return cls(fixed, per_token * (2 if values else 1), buffer.fill, store, **kwargs)

    def after(self, counts: list[int]) -> list[int]:
        """Physical bytes after each forward appending ``counts[i]`` tokens."""
        fill, store, out = self.fill, self.store, []
        for n in counts:
            fill += n
            store = max(store, fill)
            if self.capacity is not None:
                m = min(fill - self.capacity, fill - self.recent)
                if m > 0:
                    fill -= m
                    store = min(store, fill + 1)
            out.append(self.fixed + self.per_token * store)
        return out


def _slice_numel(buffer: AppendBuffer) -> int:
    shape = list(buffer.store.shape)
    del shape[buffer.dim]
    n = 1
    for k in shape:
        n *= k
    return n


def layer_growth(layer: Any) -> GrowthModel | None:
    """The :class:`GrowthModel` of any cache layer: ours, or a transformers ``DynamicLayer`` (None: unknown)."""
    if isinstance(layer, CompressedLayer):
        return layer.growth()
    if type(layer) is DynamicLayer and (keys := getattr(layer, "keys", None)) is not None and keys.dim() == 4:
        return GrowthModel(0, 2 * keys.shape[1] * keys.shape[3] * keys.element_size(), keys.shape[2], keys.shape[2])
    return None


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
    keys = property(
        lambda self: self._keys.data if getattr(self, "_keys", None) else None,
        lambda self, v: setattr(self, "_keys", AppendBuffer(v) if v is not None else None),
    )
    values = property(
        lambda self: self._values.data if getattr(self, "_values", None) else None,
        lambda self, v: setattr(self, "_values", AppendBuffer(v) if v is not None else None),
    )
    positions = property(
        lambda self: self._positions.data, lambda self, v: setattr(self, "_positions", AppendBuffer(v, dim=-1))
    )

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

    def growth(self) -> GrowthModel:
        return GrowthModel.of_buffer(self._keys)

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        mask = bottom_right_causal_mask(query.shape[2], key.shape[2], query.device)
        if mask is not None:
            mask = mask[None, None]
        out, _ = sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False
        )
        return out


#: Above this many ``H_kv * H_q * q_len`` score rows x heads, :func:`ragged_attention` gathers a padded
#: copy instead of scoring every row against the whole flattened prefix (see its docstring).
MASKED_PREFIX_MAX_WORK = 1024
#: Rows per block of the *blocked* decode path, and the flattened prefix length from which it is used
#: (whole-model CPU bench, 8 KV heads, rho 0.2: at 3k tokens = 4.9k rows it lost to the masked pass,
#: 26.7 -> 31.5 ms per step; at 8k = 13k rows it won, 34.5 -> 32.3 ms).
BLOCK_ROWS = 64
BLOCKED_MIN_ROWS = 8192


class FlatPrefix:
    """Per-KV-head token blocks stored flattened: ``keys``/``values`` ``[N, d]``, head ``h`` at rows
    ``starts[h] : starts[h] + lengths[h]`` (no padding). ``hide`` ``[H, 1, N]`` (bool, built once) is
    True where a row is not head ``h``'s; a layer may hide more rows of a head in place (HybridKV's
    unused buffer slots)."""

    _blocks: tuple[int, BlockPlan | None]  # block_plan's layout, built on first use

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, starts: list[int], lengths: list[int]) -> None:
        self.keys, self.values = keys, values
        self.starts, self.lengths = list(starts), list(lengths)
        rows = torch.arange(keys.shape[0], device=keys.device)
        first = torch.tensor(self.starts, dtype=torch.long, device=keys.device)[:, None]
        stop = first + torch.tensor(self.lengths, dtype=torch.long, device=keys.device)[:, None]
        self.hide = ((rows < first) | (rows >= stop))[:, None, :]
        self._padded: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_heads(self) -> int:
        return len(self.starts)

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row index ``[H * n_max]`` of a padded ``[H, n_max]`` view and its padding mask ``[H, 1, n_max]``
        (built on first use, from Python ints: no device sync)."""
        if self._padded is None:
            n_max, last = max(self.lengths), self.keys.shape[0] - 1
            index = [min(a + j, last) for a in self.starts for j in range(n_max)]
            beyond = [[j >= n for j in range(n_max)] for n in self.lengths]
            device = self.keys.device
            self._padded = (
                torch.tensor(index, dtype=torch.long, device=device),
                torch.tensor(beyond, dtype=torch.bool, device=device)[:, None, :],
            )
        return self._padded

    def block_plan(self, rows: int) -> BlockPlan | None:
        """The blocked layout of the first ``rows * (N // rows)`` rows (built once, from Python ints), or
        None when a block could hold rows of more than two heads (a non-empty head shorter than a block)."""
        if getattr(self, "_blocks", None) is None or self._blocks[0] != rows:
            self._blocks = (
                rows,
                BlockPlan.build(self.starts, self.lengths, self.keys.shape[0], rows, self.keys.device),
            )
        return self._blocks[1]

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


class BlockPlan:
    """Which heads the fixed-size row blocks of a flattened prefix belong to (at most two per block)."""

    def __init__(
        self,
        first: torch.Tensor,
        last: torch.Tensor,
        use_last: torch.Tensor,
        head_of_row: torch.Tensor,
        num_blocks: int,
        rows: int,
    ) -> None:
        self.first, self.last = first, last  # [nb]: head of each block's first / last row
        self.use_last = use_last  # [nb, 1, rows]: True where a row belongs to the block's last head
        self.head_of_row = head_of_row  # [N]
        self.row = torch.arange(head_of_row.numel(), device=head_of_row.device)  # [N]
        self.num_blocks, self.rows = num_blocks, rows

    @staticmethod
    def build(starts: list[int], lengths: list[int], total: int, rows: int, device: torch.device) -> BlockPlan | None:
        nonempty = [n for n in lengths if n]
        if not nonempty or min(nonempty) < rows or total < rows:
            return None
        head_of_row = [0] * total
        for h, (a, n) in enumerate(zip(starts, lengths)):
            head_of_row[a : a + n] = [h] * n
        nb = total // rows
        first = [head_of_row[b * rows] for b in range(nb)]
        last = [head_of_row[b * rows + rows - 1] for b in range(nb)]
        use_last = [[head_of_row[b * rows + j] != first[b] for j in range(rows)] for b in range(nb)]
        as_long: dict[str, Any] = dict(dtype=torch.long, device=device)
        return BlockPlan(
            torch.tensor(first, **as_long),
            torch.tensor(last, **as_long),
            torch.tensor(use_last, dtype=torch.bool, device=device)[:, None, :],
            torch.tensor(head_of_row, **as_long),
            nb,
            rows,
        )


def blocked_prefix_attention(
    rows: torch.Tensor,
    prefix: FlatPrefix,
    plan: BlockPlan,
    tail_keys_t: torch.Tensor,
    tail_values: torch.Tensor,
    tail_hide: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``softmax`` over each head's prefix rows and the tail, with the prefix scored block by block.

    The prefix's first ``nb * B`` rows are viewed as ``[nb, B, d]`` blocks; a block holds rows of at most
    two heads (every non-empty head has >= B rows), so it is scored against those two heads' queries only
    — 2x the multiply-adds of exact per-head products instead of ``H_kv``x for the masked pass, with a
    constant number of ops. The < B leftover rows go through the masked pass. ``rows [H_kv, R, d]``,
    ``tail_keys_t [H_kv, d, t]``; returns ``[H_kv, R, d]`` in ``rows``' dtype.
    """
    h_kv, r, d = rows.shape
    nb, b = plan.num_blocks, plan.rows
    m = nb * b
    keys, values = prefix.keys, prefix.values
    kb, vb = keys[:m].view(nb, b, d), values[:m].view(nb, b, d)
    q2 = torch.cat([rows.index_select(0, plan.first), rows.index_select(0, plan.last)], dim=1)  # [nb, 2R, d]
    s2 = torch.bmm(q2, kb.transpose(1, 2)).float()  # [nb, 2R, B]
    own = torch.where(plan.use_last, s2[:, r:], s2[:, :r])  # [nb, R, B]: each row scored by its own head
    own = own.transpose(1, 2).reshape(m, r)  # [M, R]
    if keys.shape[0] > m:  # leftover rows: the masked pass, then each row's own head
        left = torch.matmul(rows, keys[m:].T).float()  # [H_kv, R, n_left]
        left = left.gather(0, plan.head_of_row[m:].view(1, 1, -1).expand(1, r, -1))[0]  # [R, n_left]
        own = torch.cat([own, left.T], dim=0)
    own = own.mul_(scaling)  # [N, R]
    hidden = prefix.hide[plan.head_of_row, 0, plan.row]  # [N]: read each step (HybridKV hides rows in place)
    own.masked_fill_(hidden[:, None], float("-inf"))
    tail = torch.matmul(rows, tail_keys_t).float().mul_(scaling)  # [H_kv, R, t]
    if tail_hide is not None:
        tail.masked_fill_(tail_hide, float("-inf"))
    head = plan.head_of_row
    top = torch.full((h_kv, r), float("-inf"), device=rows.device).scatter_reduce_(
        0, head[:, None].expand(-1, r), own, "amax"
    )
    top = torch.maximum(top, tail.amax(-1))  # [H_kv, R]; the tail always holds the current token
    weights = own.sub_(top[head]).exp_()  # [N, R]
    tail = tail.sub_(top[..., None]).exp_()
    total = torch.zeros(h_kv, r, device=rows.device).index_add_(0, head, weights).add_(tail.sum(-1))
    wb = weights[:m].view(nb, b, r).transpose(1, 2)  # [nb, R, B]
    keep_last = plan.use_last.to(wb.dtype)
    w2 = torch.cat([wb * (1 - keep_last), wb * keep_last], dim=1).to(values.dtype)  # [nb, 2R, B]
    o2 = torch.bmm(w2, vb).float()  # [nb, 2R, d]
    out = torch.zeros(h_kv, r, d, device=rows.device)
    out.index_add_(0, plan.first, o2[:, :r]).index_add_(0, plan.last, o2[:, r:])
    if keys.shape[0] > m:
        out.index_add_(0, head[m:], weights[m:, :, None] * values[m:, None, :].float())
    out.add_(torch.matmul(tail.to(tail_values.dtype), tail_values).float())
    return out.div_(total[..., None]).to(rows.dtype)


def group_rows(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``query [1, H_q, q, d]`` -> ``[H_kv, G*q, d]`` (a view): the rows of each KV head's GQA group."""
    return query[0].reshape(num_kv_heads, -1, query.shape[-1])


def ungroup_rows(out: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """``[H_kv, G*q, d]`` -> the attention output layout ``[1, q, H_q, d]``."""
    return out.reshape(num_q_heads, -1, out.shape[-1]).transpose(0, 1).unsqueeze(0).contiguous()


def tail_causal_hide(q_len: int, group: int, tail_len: int, device: torch.device) -> torch.Tensor | None:
    """True where row ``(g, i)`` of a grouped query must not see tail key ``j`` (``j > tail_len - q_len + i``)."""
    mask = bottom_right_causal_mask(q_len, tail_len, device)
    return None if mask is None else ~mask.repeat(group, 1)


def ragged_attention(
    query: torch.Tensor, prefix: FlatPrefix, tail_keys: torch.Tensor, tail_values: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of ``query [1, H_q, q, d]`` over each KV head's prefix rows + the shared tail ``[1, H_kv, t, d]``.

    One softmax per query row over its head's prefix and the (bottom-right causal) tail, for all heads
    at once: a constant number of ops, whatever ``H_kv``; matmuls in the cache dtype (fp32 accumulation
    inside the kernel), softmax in fp32 on the score tensor only; no host sync. Two ways to score the
    ragged prefix, chosen by shape (``MASKED_PREFIX_MAX_WORK``):

    - *masked flat* (decode): every query row is scored against the whole flattened prefix in one
      matmul and rows of other heads are hidden (``prefix.hide``, built at compression). It costs
      ``H_kv`` times the FLOPs of the per-head product but reads the cache once and copies nothing,
      which is what a decode step (``G*q`` rows per head, memory-bound) wants;
    - *padded* (many rows: multi-token forwards, MHA models with many KV heads): the prefix is gathered
      into a temporary ``[H_kv, n_max, d]`` (padding hidden) and multiplied per head with one ``bmm``;
    - *blocked* (decode on the CPU over a prefix of >= ``BLOCKED_MIN_ROWS`` rows, every non-empty head
      at least ``BLOCK_ROWS`` long): :func:`blocked_prefix_attention` scores fixed-size row blocks against
      the at most two heads each holds — 2x the exact multiply-adds instead of ``H_kv``x, ~45 compute
      ops. The CPU is compute-bound there (masked flat lost to the per-head loop at 8k, below); a GPU
      keeps the 13-op masked pass.

    Measured on one CPU thread (``scripts/measure_decode.py``; 8 KV / 16 query heads, d = 128, fp32,
    0.2 x L tokens per head, budgets 0.5x..1.5x the mean, one query), per layer and decode step:

    ====== ============================ ============ ============ ==========
    L      per-head loop (before)       masked flat  padded       dense SDPA
    ====== ============================ ============ ============ ==========
    512    1.0 ms, 261 ops (93 compute) 0.35 ms, 45  --           0.17 ms
    3072   1.4-1.5 ms                   1.35-1.45 ms 1.4 ms, 58   0.5 ms
    8192   2.4-3.7 ms                   4.2-4.4 ms   6.8 ms       1.1-2.3 ms
    ====== ============================ ============ ============ ==========

    The fused path has 13 compute ops whatever ``H_kv`` (the loop had ~12 per head), which is what a
    launch-bound GPU step needs; on the CPU it wins on short prompts, and at 8k its ``H_kv``-fold matmul
    costs more than the loop's exact per-head products. With 16 queries masked flat is 2-4x slower
    than padded, hence the shape rule. CPU ``scaled_dot_product_attention`` was 5-7x slower than the
    ``matmul`` form for these few-row shapes. FlexAttention (torch 2.13, CPU) runs unfused without
    ``torch.compile`` (0.9 s) and compiled costs 16 s up front, 1.3 s per block mask and 1.9 ms per
    call at 4.8k prefix rows (masked flat: 1.2 ms), with shapes that change every step as the tail
    grows; so neither is used.
    """
    h_kv, h_q, q_len, d = tail_keys.shape[1], query.shape[1], query.shape[2], query.shape[3]
    rows = group_rows(query, h_kv)  # [H_kv, R, d]
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    tail_hide = tail_causal_hide(q_len, h_q // h_kv, tail_keys.shape[2], query.device)
    # On the CPU a long decode prefix is compute-bound: score it block by block (2x, not H_kv x, the
    # multiply-adds); on a GPU the masked pass's 13 launches win (the extra FLOPs are cheap there).
    if (
        h_kv * h_q * q_len <= MASKED_PREFIX_MAX_WORK
        and prefix.keys.shape[0] >= BLOCKED_MIN_ROWS
        and prefix.keys.device.type == "cpu"
    ):
        plan = prefix.block_plan(BLOCK_ROWS)
        if plan is not None:
            out = blocked_prefix_attention(
                rows, prefix, plan, tail_keys[0].transpose(1, 2), tail_values[0], tail_hide, scaling
            )
            return ungroup_rows(out, h_q)
    if prefix.keys.shape[0] and max(prefix.lengths):
        if h_kv * h_q * q_len <= MASKED_PREFIX_MAX_WORK:
            blocks.append((prefix.keys.T, prefix.values, prefix.hide))
        else:
            index, beyond = prefix.padded_index()
            n_max = beyond.shape[-1]
            keys = prefix.keys.index_select(0, index).view(h_kv, n_max, d)
            values = prefix.values.index_select(0, index).view(h_kv, n_max, d)
            hide = prefix.hide.gather(2, index.view(h_kv, 1, n_max)) | beyond
            blocks.append((keys.transpose(1, 2), values, hide))
    blocks.append((tail_keys[0].transpose(1, 2), tail_values[0], tail_hide))
    return ungroup_rows(blockwise_softmax_attention(rows, blocks, scaling), h_q)


def blockwise_softmax_attention(
    rows: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], scaling: float
) -> torch.Tensor:
    """``softmax(rows K^T * scaling) V`` with one softmax across key blocks; ``rows [H, R, d]``.

    Each block is ``(K^T [d, n] or [H, d, n], V [n, d] or [H, n, d], hide)`` with ``hide`` broadcastable
    to ``[H, R, n]`` (True: not attended) or None. Returns ``[H, R, d]`` in ``rows``' dtype.
    """
    scores = torch.cat([torch.matmul(rows, keys_t) for keys_t, _, _ in blocks], dim=-1).float().mul_(scaling)
    start = 0
    for keys_t, _, hide in blocks:
        n = keys_t.shape[-1]
        if hide is not None:
            scores[..., start : start + n].masked_fill_(hide, float("-inf"))
        start += n
    probs = torch.softmax(scores, dim=-1).to(rows.dtype)
    out, start = None, 0
    for keys_t, values, _ in blocks:
        n = keys_t.shape[-1]
        part = torch.matmul(probs[..., start : start + n], values)
        out = part if out is None else out.add_(part)
        start += n
    assert out is not None  # torch.cat above already fails without blocks
    return out


class SharedTailLayer(CompressedLayer):
    """A compressed prefix (stored by the subclass) plus one dense tail shared by all KV heads: the tokens
    appended after compression (decode steps), at logical positions counted on from ``logical_length``.

    :class:`RaggedLayer` and :class:`~mmkv.cache.hybrid.HybridLayer` differ in their prefixes and share this.
    ``reserve`` preallocates room for that many appended tokens (see :class:`AppendBuffer`).
    """

    def _init_tail(self, like: torch.Tensor, num_heads: int, positions_device: torch.device, reserve: int) -> None:
        empty = like.new_zeros(1, num_heads, 0, like.shape[-1])
        self.lazy_initialization(empty, empty)
        self._tail_keys, self._tail_values = AppendBuffer(empty, reserve), AppendBuffer(empty.clone(), reserve)
        self._tail_positions = AppendBuffer(torch.zeros(0, dtype=torch.long, device=positions_device), reserve, -1)
        self.keys, self.values = self._tail_keys.data, self._tail_values.data

    @property
    def tail_positions(self) -> torch.Tensor:
        return self._tail_positions.data

    def tail_bytes(self) -> int:
        return self._tail_keys.nbytes + self._tail_values.nbytes

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[0] != 1:
            raise batch_size_error()
        n_new = key_states.shape[-2]
        self.keys = self._tail_keys.append(key_states)
        self.values = self._tail_values.append(value_states)
        start = self.logical_length
        self._tail_positions.append(torch.arange(start, start + n_new, device=self._tail_positions.store.device))
        self.logical_length += n_new
        return self.keys, self.values


class RaggedLayer(SharedTailLayer):
    """Per-head budgets, flattened prefix + shared dense tail (see the module docstring)."""

    def __init__(
        self,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        prefix_positions: torch.Tensor,
        offsets: list[int],
        logical_length: int,
        reserve: int = 0,
    ) -> None:
        super().__init__(logical_length)
        self._init_tail(prefix_keys, len(offsets) - 1, prefix_positions.device, reserve)
        self.offsets = list(offsets)
        self.prefix = FlatPrefix(
            prefix_keys, prefix_values, self.offsets[:-1], [b - a for a, b in zip(self.offsets, self.offsets[1:])]
        )
        self.prefix_positions = prefix_positions

    prefix_keys = property(lambda self: self.prefix.keys)
    prefix_values = property(lambda self: self.prefix.values)

    @property
    def num_heads(self) -> int:
        return len(self.offsets) - 1

    def kept_positions(self) -> list[torch.Tensor]:
        return [
            torch.cat([self.prefix_positions[self.offsets[h] : self.offsets[h + 1]], self.tail_positions])
            for h in range(self.num_heads)
        ]

    def physical_bytes(self) -> int:
        return self.prefix.nbytes() + self.tail_bytes()

    def growth(self) -> GrowthModel:
        return GrowthModel.of_buffer(self._tail_keys, fixed=self.prefix.nbytes())

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        # `key`/`value` are the tail returned by update(): [1, H_kv, t, d], ending with the queries' own tokens.
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ragged_attention(query, self.prefix, key, value, scale)


class DeviceLog:
    """Rows ``[*row_shape]`` recorded on the device without a host sync, moved to the host once when read.

    Storage grows by doubling (amortised O(1) per row); :meth:`tolist` makes one transfer.
    """

    def __init__(self, row_shape: tuple[int, ...], device: torch.device, capacity: int = 16) -> None:
        self.rows = torch.empty(capacity, *row_shape, dtype=torch.long, device=device)
        self.count = 0

    def append(self, rows: torch.Tensor) -> None:
        """Record ``rows [m, *row_shape]``."""
        m = rows.shape[0]
        if self.count + m > self.rows.shape[0]:
            grown = self.rows.new_empty(max(2 * self.rows.shape[0], self.count + m), *self.rows.shape[1:])
            grown[: self.count] = self.rows[: self.count]
            self.rows = grown
        self.rows[self.count : self.count + m] = rows
        self.count += m

    def __len__(self) -> int:
        return self.count

    def tolist(self) -> list:
        return self.rows[: self.count].tolist()


class H2ODecodeLayer(DenseLayer):
    """Original H2O during decoding: accumulate attention, keep ``capacity`` tokens per head.

    After each step's attention, while the cache holds more than ``capacity`` tokens, the
    lowest-scored token outside the ``recent`` newest is evicted in every KV head (Zhang et al. 2023,
    Alg. 1). Query-head probabilities are averaged over each GQA group.

    Fast path: one grouped attention for all heads; an evicted slot is refilled with a surviving token
    from the end of the storage (order inside the storage does not matter to attention; recency is
    read from the positions), so storage is written in place — one slot of room for the incoming token
    is held (and counted) from the start, and nothing is concatenated or compacted per step. The
    eviction log stays on the device (:attr:`evictions` converts it once).
    """

    def __init__(self, keys, values, positions, logical_length, capacity: int, recent: int, scores: torch.Tensor):
        super().__init__(keys, values, positions, logical_length, reserve=1)
        self.capacity, self.recent = capacity, recent
        self._scores = AppendBuffer(scores.float(), 1, dim=-1)  # [H_kv, n]
        self._log = DeviceLog((keys.shape[1],), keys.device)
        self.eviction_counts: list[int] = []  # per forward through attend: rows it added to the log (Python ints)

    @property
    def scores(self) -> torch.Tensor:
        return self._scores.data

    @property
    def evictions(self) -> list[list[int]]:
        """Per eviction (one per decode step; a multi-token forward may make several), the evicted logical
        position in each KV head; :attr:`eviction_counts` says how many rows each forward added."""
        return self._log.tolist()

    def growth(self) -> GrowthModel:
        return GrowthModel.of_buffer(self._keys, capacity=self.capacity, recent=self.recent)

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states)
        self._scores.append(self.scores.new_zeros(self.scores.shape[0], key_states.shape[-2]))
        return out

    def kept_positions(self) -> list[torch.Tensor]:
        return list(torch.sort(self.positions, dim=-1).values.unbind(0))

    def attend(self, module, query, key, value, scaling, dropout=0.0):
        h_kv, h_q, q_len, n = key.shape[1], query.shape[1], query.shape[2], key.shape[2]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        rows = group_rows(query, h_kv)  # [H_kv, G*q, d]
        scores = torch.matmul(rows, key[0].transpose(1, 2)).float().mul_(scale)
        hide = tail_causal_hide(q_len, h_q // h_kv, n, query.device)
        if hide is not None:
            scores.masked_fill_(hide, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs.to(value.dtype), value[0])
        self.scores.add_(probs.view(h_kv, h_q // h_kv, q_len, n).sum(2).mean(1))
        self._evict()
        return ungroup_rows(out, h_q)

    def _evict(self) -> None:
        """Evict the lowest-scored tokens outside the recent window, refilling their slots from the end."""
        n = self._keys.fill
        m = min(n - self.capacity, n - self.recent)  # Python ints: no sync
        self.eviction_counts.append(max(m, 0))
        if m <= 0:
            return
        positions, scores = self.positions, self.scores
        candidate = torch.ones_like(positions, dtype=torch.bool)
        if self.recent > 0:
            newest = positions.topk(self.recent, dim=-1).values[:, -1:]
            candidate = positions < newest
        drop = (
            scores.masked_fill(~candidate, float("inf")).topk(m, dim=-1, largest=False).indices
        )  # [H, m], lowest first
        self._log.append(positions.gather(1, drop).T)
        # holes below n - m take the surviving tokens of the last m slots (both lists are padded with n, then paired)
        tail = torch.arange(n - m, n, device=drop.device)
        tail_dropped = (drop[:, :, None] == tail).any(1)  # [H, m]
        sources = torch.where(tail_dropped, n, tail).sort(dim=-1).values
        holes = torch.where(drop < n - m, drop, n).sort(dim=-1).values
        sources, holes = sources.clamp(max=n - 1), torch.where(holes < n, holes, sources.clamp(max=n - 1))
        for buf in (self._keys, self._values):
            store = buf.store[0]  # [H, room, d]
            src = store.gather(1, sources[..., None].expand(-1, -1, store.shape[-1]))
            store.scatter_(1, holes[..., None].expand(-1, -1, store.shape[-1]), src)
        for buf in (self._positions, self._scores):
            buf.store.scatter_(1, holes, buf.store.gather(1, sources))
        for buf in (self._keys, self._values, self._positions, self._scores):
            buf.fill -= m
            if (
                buf.store.shape[buf.dim] > buf.fill + 1
            ):  # a multi-token forward grew the storage: back to one slot of room
                buf.store = buf.store.narrow(buf.dim, 0, buf.fill + 1).clone()


# ---- applying a plan --------------------------------------------------------------------------


def layer_tensors(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncompressed keys/values ``[1, H_kv, L, d]`` of a layer right after prefill."""
    layer: Any = cache.layers[
        layer_idx
    ]  # a transformers layer with keys/values (the union lists linear-attention ones)
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
    if plan.decode is not None:  # a decode-time policy builds its own layer (mmkv.methods.decode)
        policy = cast("DecodePolicy", plan.decode)  # LayerPlan.__post_init__ converts the older dict form
        return policy.build_layer(keys, values, plan, reserve)
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
    layer: Any = cache.layers[layer_idx]  # ours, or a transformers layer with keys/values
    if isinstance(layer, CompressedLayer):
        return layer.kept_positions()
    n = layer.get_seq_length()
    heads = layer.keys.shape[1] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
    return [torch.arange(n) for _ in range(heads)]
