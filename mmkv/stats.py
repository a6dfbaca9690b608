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
:func:`mmkv.methods.base.reduce_to_kv_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .modality import IMAGE, TEXT, VIDEO

# Upper bound on the elements of one fp32 score block (H_q x block x L): 2**26 floats = 256 MiB.
MAX_BLOCK_ELEMENTS = 1 << 26


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

    def __or__(self, other: "StatsRequest") -> "StatsRequest":
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
    def empty(self) -> bool:
        return not (
            self.window or self.column_sums or self.full_entropy or self.modality_mass or self.entropy
            or self.question_scores or self.cross_modal
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

    def to(self, device: torch.device | str) -> "LayerStats":
        return LayerStats(
            **{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)}
        )


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """``q [H_q, n, d]``, ``k [H_kv, L, d]`` -> fp32 logits ``[H_q, n, L]`` without repeating k."""
    h_q, n, d = q.shape
    h_kv = k.shape[0]
    group = h_q // h_kv
    logits = torch.matmul(q.reshape(h_kv, group * n, d).float(), k.float().transpose(1, 2))
    return logits.view(h_q, n, -1) * scaling


def _causal_softmax(logits: torch.Tensor, first_query_pos: int) -> torch.Tensor:
    """Softmax over keys with query ``i`` (absolute position ``first_query_pos + i``) seeing keys ``<= pos``."""
    n, length = logits.shape[-2], logits.shape[-1]
    q_pos = torch.arange(first_query_pos, first_query_pos + n, device=logits.device)
    k_pos = torch.arange(length, device=logits.device)
    future = k_pos[None, :] > q_pos[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def _row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of ``probs`` [..., L]."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


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

    Computed in query blocks; with ``causal`` a query sees only keys at earlier-or-equal positions and
    rows that see none are left out of the mean. Empty sets give zeros.
    """
    h_q = q.shape[0]
    per_head = torch.zeros(h_q, dtype=torch.float32, device=q.device)
    averaged, rows = 0.0, 0
    if queries.numel() == 0 or keys.numel() == 0:
        return per_head, 0.0
    k_sel = k[:, keys]
    block = max(1, MAX_BLOCK_ELEMENTS // max(1, h_q * keys.numel()))
    for start in range(0, queries.numel(), block):
        qi = queries[start : start + block]
        logits = _grouped_scores(q[:, qi], k_sel, scaling)  # [H_q, b, |keys|]
        if causal:
            visible = keys[None, :] <= qi[:, None]
            live = visible.any(-1)
            logits, visible = logits[:, live], visible[live]
            logits = logits.masked_fill(~visible, float("-inf"))
        if logits.shape[1] == 0:
            continue
        probs = torch.softmax(logits, dim=-1)
        per_head += _row_entropy(probs).sum(1)
        averaged += float(_row_entropy(probs.mean(0)).sum())
        rows += probs.shape[1]
    if rows == 0:
        return per_head, 0.0
    return per_head / rows, averaged / rows


def compute_layer_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor,
    request: StatsRequest,
    scaling: float,
) -> LayerStats:
    """Compute the requested statistics for one layer's prefill.

    ``query [1, H_q, L, d]`` and ``key [1, H_kv, L, d]`` are post-RoPE; ``modality [L]`` holds the
    TEXT/IMAGE/VIDEO code of each key.
    """
    if query.shape[0] != 1:
        raise ValueError("mmkv statistics support batch size 1")
    q, k = query[0], key[0]
    length = k.shape[1]
    if q.shape[1] != length:
        raise ValueError(f"prefill statistics expect as many queries as keys, got {q.shape[1]} and {length}")
    out = LayerStats()
    want_window = request.window > 0 or request.modality_mass or request.entropy
    if want_window:
        window = min(request.window or 32, length)
        probs = _causal_softmax(_grouped_scores(q[:, -window:], k, scaling), length - window)  # [H_q, W, L]
        out.window = window
        out.window_scores = probs.sum(1)
        if request.modality_mass:
            codes = modality.to(probs.device).long()
            mass = torch.stack([probs[..., codes == c].sum(-1).mean(1) for c in (TEXT, IMAGE, VIDEO)], dim=-1)
            out.modality_mass = mass
        if request.entropy:
            out.entropy = _row_entropy(probs).mean(1)
        del probs
    if request.column_sums or request.full_entropy:
        h_q = q.shape[0]
        block = max(1, min(length, MAX_BLOCK_ELEMENTS // max(1, h_q * length)))
        col = torch.zeros(h_q, length, dtype=torch.float32, device=q.device) if request.column_sums else None
        ent = torch.zeros(h_q, dtype=torch.float32, device=q.device) if request.full_entropy else None
        for start in range(0, length, block):
            stop = min(length, start + block)
            # Queries start..stop-1 see keys < stop only: skip the rest of the row.
            probs = _causal_softmax(_grouped_scores(q[:, start:stop], k[:, :stop], scaling), start)
            if col is not None:
                col[:, :stop] += probs.sum(1)
            if ent is not None:
                ent += _row_entropy(probs).sum(1)
            del probs
        out.column_sums = col
        out.full_entropy = ent / length if ent is not None else None
    if request.question_scores:
        qpos = question_positions(modality.to(q.device))
        probs = _causal_softmax(_grouped_scores(q[:, qpos], k, scaling), int(qpos[0]))
        out.question_scores = probs.sum(1)
        out.question_queries = int(qpos.numel())
        del probs
    if request.cross_modal:
        codes = modality.to(q.device)
        text = (codes == TEXT).nonzero().flatten()
        visual = (codes != TEXT).nonzero().flatten()
        causal = request.cross_modal == "causal"
        out.cross_tv, out.cross_tv_head_mean = _cross_modal_entropy(q, k, text, visual, scaling, causal)
        out.cross_vt, out.cross_vt_head_mean = _cross_modal_entropy(q, k, visual, text, scaling, causal)
    return out
