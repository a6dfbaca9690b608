"""Prefill attention statistics, computed from the post-RoPE q/k the attention function receives.

Flash/SDPA kernels never return attention probabilities, so the statistics a method asks for are
recomputed here for just the queries needed:

- ``window``: attention of the last ``W`` queries over all keys (SnapKV, PyramidKV, AdaKV, MadaKV's
  proxy window), summed over those queries -> ``window_scores [H_q, L]``.
- ``column_sums``: attention of *all* queries summed per key (H2O, LOOK-M, MEDA), computed in query
  blocks so the ``L x L`` matrix never exists at once -> ``column_sums [H_q, L]``.
- ``modality_mass``: per head, the mean share of the window queries' attention on text / image /
  video keys -> ``[H_q, 3]``.
- ``entropy``: per head, the mean row entropy (nats) of the window queries -> ``[H_q]``.
- ``full_entropy``: the same over all queries (MEDA's code reading), from the block pass.
- ``question_scores``: attention of the *question* — the text tokens after the last visual token
  (fallback: the last 32 tokens) — summed per key (HybridKV's text-centric attention).
- ``cross_modal``: MEDA's cross-modal entropies (Eq. 5–6): text queries over visual keys only and
  visual queries over text keys only, each renormalised by its own softmax; per head, and of the
  head-averaged distribution. ``"causal"`` lets a query see only earlier keys (rows that see no key of
  the other modality are skipped); ``"full"`` ignores causality, as the paper's formula reads.

All statistics are fp32, per *query* head; methods reduce them to KV heads (see
:func:`mmkv.methods.base.reduce_to_kv_heads`). Every one is computed in query blocks of at most
``MAX_BLOCK_ELEMENTS`` scores, so none is O(L^2) in memory. On CUDA the matmuls run in the model's
half/bf16 dtype with fp32 accumulation and output (tensor cores); on CPU in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..inputs.modality import IMAGE, TEXT, VIDEO

# Upper bound on the elements of one fp32 score block (H_q x block x keys): 2**26 floats = 256 MiB.
MAX_BLOCK_ELEMENTS = 1 << 26
# Preferred block on CPU (16 MiB): the two reused work buffers stay small and cache-friendly.
CPU_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class StatsRequest:
    """What a method needs from prefill attention. ``window`` = 0 means no window statistics."""

    window: int = 0
    column_sums: bool = False
    modality_mass: bool = False
    entropy: bool = False
    full_entropy: bool = False
    question_scores: bool = False
    cross_modal: str | None = None  # None, "causal" or "full"

    def __post_init__(self) -> None:
        if self.cross_modal not in (None, "causal", "full"):
            raise ValueError(f"cross_modal must be None, 'causal' or 'full', got {self.cross_modal!r}")

    def __or__(self, other: StatsRequest) -> StatsRequest:
        return StatsRequest(
            window=max(self.window, other.window),
            column_sums=self.column_sums or other.column_sums,
            modality_mass=self.modality_mass or other.modality_mass,
            entropy=self.entropy or other.entropy,
            full_entropy=self.full_entropy or other.full_entropy,
            question_scores=self.question_scores or other.question_scores,
            cross_modal=self.cross_modal or other.cross_modal,
        )

    @property
    def all_queries(self) -> bool:
        """Statistics over every query row (the pass that can also produce the attention output)."""
        return self.column_sums or self.full_entropy

    @property
    def empty(self) -> bool:
        return not (
            self.window
            or self.column_sums
            or self.full_entropy
            or self.modality_mass
            or self.entropy
            or self.question_scores
            or self.cross_modal
        )


@dataclass
class LayerStats:
    """Statistics of one decoder layer's prefill attention (per query head, fp32)."""

    window: int = 0
    window_scores: torch.Tensor | None = None  # [H_q, L]: sum over the last `window` queries
    column_sums: torch.Tensor | None = None  # [H_q, L]: sum over all queries
    modality_mass: torch.Tensor | None = None  # [H_q, 3]: mean mass on text / image / video
    entropy: torch.Tensor | None = None  # [H_q]
    full_entropy: torch.Tensor | None = None  # [H_q]
    question_scores: torch.Tensor | None = None  # [H_q, L]: sum over the question queries
    question_queries: int = 0  # how many queries question_scores sums over
    cross_tv: torch.Tensor | None = None  # [H_q]: mean entropy, text queries over visual keys
    cross_vt: torch.Tensor | None = None  # [H_q]: mean entropy, visual queries over text keys
    cross_tv_head_mean: float | None = None  # same, of the head-averaged distribution
    cross_vt_head_mean: float | None = None
    # [1, L, H_q, d]: the layer's causal attention output, from an all-query pass given the values
    attention_output: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> LayerStats:
        moved: dict[str, Any] = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)
        }
        return LayerStats(**moved)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Matmul dtype: half/bf16 stays as is on CUDA (tensor cores, fp32 accumulation and output), else fp32."""
    if t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and _fp32_output_matmul(t.device, t.dtype):
        return t.dtype
    return torch.float32


@functools.cache
def _fp32_output_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build writes a ``dtype`` batched matmul straight to fp32 on ``device`` (probed once)."""
    a = torch.ones(1, 2, 2, device=device, dtype=dtype)
    out = torch.empty(1, 2, 2, device=device, dtype=torch.float32)
    try:
        torch.ops.aten.baddbmm.dtype_out(out, a, a, torch.float32, beta=0.0, alpha=0.5, out=out)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.all(out == 1.0))


def _block_rows(h_q: int, keys: int, device: torch.device) -> int:
    """Query rows per block so that one ``[H_q, rows, keys]`` fp32 block stays within the bound."""
    limit = MAX_BLOCK_ELEMENTS if device.type == "cuda" else min(MAX_BLOCK_ELEMENTS, CPU_BLOCK_ELEMENTS)
    return max(1, limit // max(1, h_q * keys))


def _logits(qg: torch.Tensor, kt: torch.Tensor, scaling: float, out: torch.Tensor) -> torch.Tensor:
    """``scaling * qg @ kt`` into the fp32 buffer ``out``: ``qg [H_kv, m, d]``, ``kt [H_kv, d, n]`` (GQA: no repeat of K).

    The scale is fused into the matmul (``alpha``); half/bf16 inputs (CUDA) accumulate and write fp32.
    """
    if qg.dtype == torch.float32:
        return torch.baddbmm(out, qg, kt, beta=0.0, alpha=scaling, out=out)
    return torch.ops.aten.baddbmm.dtype_out(out, qg, kt, torch.float32, beta=0.0, alpha=scaling, out=out)


def _softmax(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``logits`` written into ``out`` (may be ``logits`` itself: the kernel works row by row)."""
    return torch.ops.aten._softmax.out(logits, -1, False, out=out)


def _row_dot(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sum_j probs[..., j] * logits[..., j]`` per row (a batched dot product, no temporary block)."""
    n = probs.shape[-1]
    return torch.bmm(probs.reshape(-1, 1, n), logits.reshape(-1, n, 1)).view(probs.shape[:-1])


def _entropy_from(logits: torch.Tensor, probs: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Row entropy (nats) from ``-sum p log p = lse - sum_j p_j s_j`` (masked logits are finite: ``p = 0`` there)."""
    return lse - _row_dot(probs, logits)


def _diagonal_lse(logits: torch.Tensor, probs: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp from its own key (always visible): ``lse_i = s_ii - log p_ii``.

    ``own[r]`` is row ``r``'s own key column. Rows whose own probability underflows get the exact
    ``logsumexp`` instead (computed only when some row needs it, or always on CUDA: no host sync).
    """
    rows = torch.arange(own.numel(), device=own.device)
    s_own, p_own = logits[:, rows, own], probs[:, rows, own]
    lse = s_own - torch.log(p_own)
    bad = p_own < 1e-30
    if logits.is_cuda or bool(bad.any()):
        lse = torch.where(bad, torch.logsumexp(logits, dim=-1), lse)
    return lse


def _row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of ``probs`` [..., L] (0 log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def question_positions(modality: torch.Tensor, fallback: int = 32) -> torch.Tensor:
    """Positions of the question: text after the last visual token, else the last ``fallback`` tokens."""
    length = modality.numel()
    visual = (modality != TEXT).nonzero().flatten()
    start = int(visual[-1]) + 1 if visual.numel() else length
    if start >= length:
        start = max(0, length - fallback)
    return torch.arange(start, length, device=modality.device)


def _cross_modal_entropy(
    q: torch.Tensor, k: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, scaling: float, causal: bool
) -> tuple[torch.Tensor, float]:
    """Mean row entropy of ``softmax(q[queries] k[keys]^T)``: per query head ``[H_q]`` and head-averaged.

    ``queries`` and ``keys`` are sorted positions. Computed in query blocks; with ``causal`` a query
    sees only keys at earlier-or-equal positions (masked in the block's band of columns only) and rows
    that see none are left out of the mean. Empty sets give zeros.
    """
    h_q, _, d = q.shape
    h_kv = k.shape[0]
    group = h_q // h_kv
    per_head = torch.zeros(h_q, dtype=torch.float32, device=q.device)
    if causal and keys.numel():
        queries = queries[queries >= keys[0]]  # the rows that see no key of the other modality
    if queries.numel() == 0 or keys.numel() == 0:
        return per_head, 0.0
    dtype = _compute_dtype(q)
    n = keys.numel()
    kt = k[:, keys].to(dtype).transpose(1, 2)  # [H_kv, d, n], gathered and cast once
    block = min(queries.numel(), _block_rows(h_q, n, q.device))
    s_buf = torch.empty(h_q * block * n, dtype=torch.float32, device=q.device)
    p_buf = torch.empty_like(s_buf)
    visible = torch.searchsorted(keys, queries, right=True) if causal else None  # keys seen per query
    averaged = torch.zeros((), dtype=torch.float64, device=q.device)
    for start in range(0, queries.numel(), block):
        qi = queries[start : start + block]
        rows = qi.numel()
        qg = q[:, qi].to(dtype).reshape(h_kv, group * rows, d)
        logits = _logits(qg, kt, scaling, s_buf[: h_q * rows * n].view(h_kv, group * rows, n)).view(h_q, rows, n)
        if visible is not None:  # causal
            lo = int(visible[start])
            if lo < n:  # columns < lo are visible to every row of the block
                band = torch.arange(lo, n, device=q.device)[None, :] >= visible[start : start + rows, None]
                logits[:, :, lo:].masked_fill_(band, torch.finfo(torch.float32).min)
        probs = _softmax(logits, p_buf[: h_q * rows * n].view(h_q, rows, n))
        top, where = logits.max(dim=-1, keepdim=True)
        lse = (top - torch.log(probs.gather(-1, where))).squeeze(-1)  # p at the row max is >= 1 / n
        per_head += _entropy_from(logits, probs, lse).sum(1)
        averaged += _row_entropy(probs.mean(0)).sum(dtype=torch.float64)
    rows = queries.numel()
    return per_head / rows, float(averaged) / rows


def compute_layer_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor,
    request: StatsRequest,
    scaling: float,
    value: torch.Tensor | None = None,
) -> LayerStats:
    """Compute the requested statistics for one layer's prefill.

    ``query [1, H_q, L, d]`` and ``key [1, H_kv, L, d]`` are post-RoPE; ``modality [L]`` holds the
    TEXT/IMAGE/VIDEO code of each key.

    One pass over query blocks serves every row statistic (the window, the question, all queries):
    the block ``[first, stop)`` scores keys ``< stop`` only, in one fused-scale matmul against K cast
    and transposed once; only its diagonal ``[first, stop)`` sub-block needs the causal mask; the
    softmax runs in place. Entropies use ``H = lse - sum_j p_j s_j`` (a batched dot product, no log
    over the block), with ``lse`` read off each row's own key. Memory: two blocks of at most
    ``MAX_BLOCK_ELEMENTS`` floats, never ``L x L``.

    With ``value [1, H_kv, L, d]`` and a pass over *all* queries (column sums, full entropy), the same
    probabilities also give the layer's causal attention output (``LayerStats.attention_output``
    ``[1, L, H_q, d]``, the attention function's layout): the caller then skips its own attention, so
    all-query statistics cost only what they add to an attention pass, not a second one.
    """
    if query.shape[0] != 1:
        raise ValueError("mmkv statistics support batch size 1")
    q, k = query[0], key[0]
    h_q, length, d = q.shape
    h_kv = k.shape[0]
    group = h_q // h_kv
    if k.shape[1] != length:
        raise ValueError(f"prefill statistics expect as many queries as keys, got {length} and {k.shape[1]}")
    device = q.device
    out = LayerStats()
    firsts: list[int] = []
    want_window = request.window > 0 or request.modality_mass or request.entropy
    if want_window:
        out.window = min(request.window or 32, length)
        firsts.append(length - out.window)
        out.window_scores = torch.zeros(h_q, length, dtype=torch.float32, device=device)
        if request.modality_mass:
            codes = modality.to(device).long()
            onehot = torch.stack([codes == c for c in (TEXT, IMAGE, VIDEO)], dim=-1).float()  # [L, 3]
            out.modality_mass = torch.zeros(h_q, 3, dtype=torch.float32, device=device)
        if request.entropy:
            out.entropy = torch.zeros(h_q, dtype=torch.float32, device=device)
    if request.column_sums:
        out.column_sums = torch.zeros(h_q, length, dtype=torch.float32, device=device)
        firsts.append(0)
    if request.full_entropy:
        out.full_entropy = torch.zeros(h_q, dtype=torch.float32, device=device)
        firsts.append(0)
    if request.question_scores:
        qpos = question_positions(modality.to(device))
        out.question_queries = int(qpos.numel())
        out.question_scores = torch.zeros(h_q, length, dtype=torch.float32, device=device)
        firsts.append(int(qpos[0]))
    if firsts:
        dtype = _compute_dtype(q)
        qg = q.to(dtype).view(h_kv, group, length, d)
        kt = k.to(dtype).transpose(1, 2)  # [H_kv, d, L]: cast once, a transposed view for the matmul
        first = min(firsts)
        block = min(length - first, _block_rows(h_q, length, device))
        s_buf = torch.empty(h_q * block * length, dtype=torch.float32, device=device)
        need_logits = out.entropy is not None or out.full_entropy is not None
        p_buf = torch.empty_like(s_buf) if need_logits else s_buf
        ones = torch.ones(h_q, 1, block, dtype=torch.float32, device=device)
        future = torch.ones(block, block, dtype=torch.bool, device=device).triu_(1)
        masked = torch.finfo(torch.float32).min  # finite, so that p * s stays 0 where p = 0
        attend = value is not None and first == 0
        if attend:
            assert value is not None
            vg = value[0].to(dtype)  # [H_kv, L, d]
            attention = torch.empty(h_kv, group, length, d, dtype=query.dtype, device=device)
        for start in range(first, length, block):
            stop = min(length, start + block)
            rows = stop - start
            size = h_q * rows * stop
            logits = _logits(
                qg[:, :, start:stop].reshape(h_kv, group * rows, d),
                kt[:, :, :stop],
                scaling,
                s_buf[:size].view(h_kv, group * rows, stop),
            ).view(h_q, rows, stop)
            # Keys < start are visible to every query of the block: mask the diagonal sub-block only.
            logits[:, :, start:stop].masked_fill_(future[:rows, :rows], masked)
            probs = _softmax(logits, p_buf[:size].view(h_q, rows, stop))
            if attend:
                block_out = torch.matmul(probs.view(h_kv, group * rows, stop).to(dtype), vg[:, :stop])
                attention[:, :, start:stop] = block_out.view(h_kv, group, rows, d)
            entropy = None
            if need_logits and (out.full_entropy is not None or stop > length - out.window):
                lse = _diagonal_lse(logits, probs, torch.arange(start, stop, device=device))
                entropy = _entropy_from(logits, probs, lse)  # [H_q, rows]
            if out.column_sums is not None:
                out.column_sums[:, :stop] += torch.bmm(ones[:, :, :rows], probs).squeeze(1)
            if out.full_entropy is not None:
                assert entropy is not None  # need_logits: computed for every block
                out.full_entropy += entropy.sum(1)
            if out.question_scores is not None and stop > int(qpos[0]):
                r = max(0, int(qpos[0]) - start)
                out.question_scores[:, :stop] += torch.bmm(ones[:, :, : rows - r], probs[:, r:]).squeeze(1)
            if want_window and stop > length - out.window:
                r = max(0, length - out.window - start)
                assert out.window_scores is not None  # allocated when want_window
                out.window_scores[:, :stop] += torch.bmm(ones[:, :, : rows - r], probs[:, r:]).squeeze(1)
                if out.modality_mass is not None:
                    out.modality_mass += torch.matmul(probs[:, r:], onehot[:stop]).sum(1)
                if out.entropy is not None:
                    assert entropy is not None  # need_logits and stop > length - window
                    out.entropy += entropy[:, r:].sum(1)
        if attend:
            out.attention_output = attention.view(h_q, length, d).transpose(0, 1).unsqueeze(0)
        if out.full_entropy is not None:
            out.full_entropy /= length
        if want_window:
            if out.modality_mass is not None:
                out.modality_mass /= out.window
            if out.entropy is not None:
                out.entropy /= out.window
    if request.cross_modal:
        codes = modality.to(device)
        text = (codes == TEXT).nonzero().flatten()
        visual = (codes != TEXT).nonzero().flatten()
        causal = request.cross_modal == "causal"
        out.cross_tv, out.cross_tv_head_mean = _cross_modal_entropy(q, k, text, visual, scaling, causal)
        out.cross_vt, out.cross_vt_head_mean = _cross_modal_entropy(q, k, visual, text, scaling, causal)
    return out
