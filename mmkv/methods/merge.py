"""KV merging: fold evicted tokens into their most similar kept token (LOOK-M §3.3, MEDA §3.3).

Not a method: the shared math behind LOOK-M's and MEDA's merges. Everything is per KV head.

Assignment (LOOK-M Eq. 9; MEDA Eq. 11), on **keys only**, and reused for the values:

    S[i, j] = cos(k_i, k_j)         i in E (evicted), j in C (conserved = kept)
    j*(i)   = argmax_j S[i, j]       (ties: the earliest kept position, torch's first maximum)
    N_j     = { i in E : j*(i) = j }

Updates of a kept token ``j`` (docs/methods.md, LOOK-M; the same formula for ``v_j`` with the same ``j*``):

- ``"average"``  (LOOK-M Eq. 10, MEDA Eq. 12):  k_j <- (k_j + sum_{i in N_j} k_i) / (|N_j| + 1)
- ``"pivotal"``  (LOOK-M Eq. 11, default):       k_j <- (k_j + 1/2 sum_{i in N_j} (k_i + k_j)) / (|N_j| + 1)
- ``"weighted"`` (LOOK-M Eq. 12):                k_j <- (k_j + sum_{i in N_j} S[i, j] k_i) / (|N_j| + 1)

Kept tokens nobody merged into (``N_j`` empty) are returned bit-identical. Several evicted tokens
merged into the same target are summed exactly (an accumulating scatter of all contributions, then
one division); this is what the official code's ``scatter_reduce(reduce="mean", include_self=True)``
computes when its ``src`` and ``index`` are aligned. We implement the equations, *not* the A-Merge code path, whose
``src`` (all evicted tokens) and ``index`` (filtered targets) are misaligned (docs/methods.md, LOOK-M).

Code-faithful filter (``similarity_filter=True``, average and weighted only, off by default): the
released code merges only the evicted tokens whose max-similarity, averaged over heads, is at least
the mean max-similarity over all heads and evicted tokens (``max_values.mean(1) >= max_values.mean()``);
the others are dropped without merging. The code indexes evicted tokens by *slot* (the i-th evicted
token of each head, in position order), so we do the same; the heads must therefore evict the same
number of tokens (always true for LOOK-M and MEDA). The code applies no filter to the pivotal merge,
so neither do we (asking for it raises).

Arithmetic is fp32; results are cast back to the input dtype. Cosine similarity uses
``x / max(||x||, 1e-12)``, so an all-zero key has similarity 0 with everything.
"""

from __future__ import annotations

import torch

from .base import MergeRecord

MERGE_MODES = ("pivotal", "average", "weighted", "none")
FILTERABLE = ("average", "weighted")

# Similarity blocks hold at most this many fp32 entries (evicted rows x kept columns): 64 MiB.
_MAX_SIM_ELEMENTS = 1 << 24


def check_merge(mode: str, similarity_filter: bool) -> None:
    """Validate a merge mode and filter flag (raised as ``ValueError`` with the fix)."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
    if similarity_filter and mode not in FILTERABLE:
        raise ValueError(
            f"similarity_filter applies to the {' and '.join(FILTERABLE)} merges only (the official code "
            f"does not filter the {mode!r} merge); set similarity_filter=False"
        )


def assign(keys: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Most key-similar kept token of each evicted token, for one head.

    ``keys [L, d]``; ``kept [n]`` and ``evicted [m]`` are positions. Returns ``(slot [m], cos [m])``:
    ``slot[i]`` indexes ``kept`` (the argmax ``j*``), ``cos[i]`` is ``S[i, j*]`` (fp32).
    """
    m, n = evicted.numel(), kept.numel()
    slot = torch.zeros(m, dtype=torch.long, device=keys.device)
    best = torch.zeros(m, dtype=torch.float32, device=keys.device)
    if m == 0 or n == 0:
        return slot, best
    kc = torch.nn.functional.normalize(keys[kept].float(), dim=-1, eps=1e-12)
    block = max(1, _MAX_SIM_ELEMENTS // n)
    for start in range(0, m, block):
        rows = evicted[start : start + block]
        ke = torch.nn.functional.normalize(keys[rows].float(), dim=-1, eps=1e-12)
        values, index = (ke @ kc.T).max(dim=-1)  # first maximum on ties
        slot[start : start + rows.numel()] = index
        best[start : start + rows.numel()] = values
    return slot, best


def merge_head(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    mode: str,
    evicted: torch.Tensor | None = None,
    select: torch.Tensor | None = None,
    assignment: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, MergeRecord]:
    """Merge one head's evicted tokens into its kept tokens (equations in the module docstring).

    ``keys``/``values`` ``[L, d]``; ``kept`` sorted positions; ``evicted`` defaults to every other
    position. ``select`` (bool ``[m]``) marks the evicted tokens to merge (the rest are dropped);
    ``assignment`` reuses a precomputed :func:`assign` result. Returns the new kept keys and values
    ``[n, d]`` (input dtype) and the :class:`MergeRecord` of the merged tokens (logical positions).
    """
    if mode not in ("pivotal", "average", "weighted"):
        raise ValueError(f"merge_head: mode must be pivotal, average or weighted, got {mode!r}")
    device = keys.device
    kept = kept.to(device=device, dtype=torch.long)
    if evicted is None:
        mask = torch.ones(keys.shape[0], dtype=torch.bool, device=device)
        mask[kept] = False
        evicted = mask.nonzero().flatten()
    evicted = evicted.to(device=device, dtype=torch.long)
    slot, sim = assignment if assignment is not None else assign(keys, kept, evicted)
    if select is not None:
        select = select.to(device)
        evicted, slot, sim = evicted[select], slot[select], sim[select]
    kc, vc = keys[kept].float(), values[kept].float()
    if evicted.numel():
        ke, ve = keys[evicted].float(), values[evicted].float()
        if mode == "average":
            add_k, add_v = ke, ve
        elif mode == "pivotal":
            add_k, add_v = 0.5 * (ke + kc[slot]), 0.5 * (ve + vc[slot])
        else:  # weighted
            add_k, add_v = sim[:, None] * ke, sim[:, None] * ve
        # Sum every contribution per target (index_put_ with accumulate; index_add_ is equivalent but
        # has a large fixed cost on multi-threaded CPU builds).
        count = torch.zeros(kept.numel(), dtype=torch.float32, device=device)
        count.index_put_((slot,), torch.ones_like(sim), accumulate=True)
        hit = count > 0  # untouched kept tokens stay bit-identical
        sum_k = torch.zeros_like(kc).index_put_((slot,), add_k, accumulate=True)
        sum_v = torch.zeros_like(vc).index_put_((slot,), add_v, accumulate=True)
        kc = torch.where(hit[:, None], (kc + sum_k) / (count[:, None] + 1.0), kc)
        vc = torch.where(hit[:, None], (vc + sum_v) / (count[:, None] + 1.0), vc)
    record = MergeRecord(source=evicted.cpu(), target=kept[slot].cpu(), similarity=sim.float().cpu())
    return kc.to(keys.dtype), vc.to(values.dtype), record


def merge_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: list[torch.Tensor],
    mode: str,
    similarity_filter: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[MergeRecord], int]:
    """Merge every KV head of a layer: ``keys``/``values`` ``[H_kv, L, d]``, ``kept[h]`` sorted positions.

    Returns per-head new kept keys, values, merge records, and the number of evicted tokens the
    code-faithful filter dropped without merging (summed over heads; 0 without the filter).
    Heads that keep the same number of tokens (LOOK-M and MEDA: always) are merged together, in
    batched matmuls and one scatter per layer; otherwise head by head with :func:`merge_head`.
    """
    check_merge(mode, similarity_filter)
    if mode == "none":
        raise ValueError("merge_layer: nothing to do for merge='none'")
    num_heads, length = keys.shape[0], keys.shape[1]
    device = keys.device
    kept = [k.to(device=device, dtype=torch.long) for k in kept]
    if len({k.numel() for k in kept}) == 1 and kept[0].numel():
        return _merge_layer_batched(keys, values, torch.stack(kept), mode, similarity_filter)
    evicted, assignments = [], []
    for h in range(num_heads):
        mask = torch.ones(length, dtype=torch.bool, device=device)
        mask[kept[h]] = False
        ev = mask.nonzero().flatten()
        evicted.append(ev)
        assignments.append(assign(keys[h], kept[h], ev))
    if similarity_filter:
        counts = {ev.numel() for ev in evicted}
        raise ValueError(
            "similarity_filter averages over heads slot by slot (as the official code does), so every "
            f"head must evict the same number of tokens; got {sorted(counts)}"
        )
    new_k, new_v, records = [], [], []
    for h in range(num_heads):
        k, v, rec = merge_head(keys[h], values[h], kept[h], mode, evicted[h], None, assignments[h])
        new_k.append(k)
        new_v.append(v)
        records.append(rec)
    return new_k, new_v, records, 0


def _merge_layer_batched(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, mode: str, similarity_filter: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[MergeRecord], int]:
    """:func:`merge_layer` for ``kept [H, n]`` (the same count in every head): the equations of
    :func:`merge_head`, all heads at once."""
    num_heads, length, d = keys.shape
    device = keys.device
    n = kept.shape[1]
    mask = torch.ones(num_heads, length, dtype=torch.bool, device=device)
    mask.scatter_(1, kept, False)
    m = length - n
    evicted = mask.nonzero()[:, 1].view(num_heads, m)  # row-major: each head's evicted positions, sorted
    kc = keys.gather(1, kept[..., None].expand(-1, -1, d)).float()
    vc = values.gather(1, kept[..., None].expand(-1, -1, d)).float()
    slot = torch.zeros(num_heads, m, dtype=torch.long, device=device)
    sim = torch.zeros(num_heads, m, dtype=torch.float32, device=device)
    if m:
        kc_unit = torch.nn.functional.normalize(kc, dim=-1, eps=1e-12).transpose(1, 2)  # [H, d, n]
        block = max(1, _MAX_SIM_ELEMENTS // (num_heads * n))
        for start in range(0, m, block):
            rows = evicted[:, start : start + block]
            ke = keys.gather(1, rows[..., None].expand(-1, -1, d)).float()
            best, index = torch.bmm(torch.nn.functional.normalize(ke, dim=-1, eps=1e-12), kc_unit).max(dim=-1)
            slot[:, start : start + rows.shape[1]] = index
            sim[:, start : start + rows.shape[1]] = best
    dropped = 0
    if similarity_filter and m:
        select = sim.mean(0) >= sim.mean()  # slot by slot over heads, as the code does
        dropped = int((~select).sum()) * num_heads
        evicted, slot, sim = evicted[:, select], slot[:, select], sim[:, select]
    if evicted.shape[1]:
        ke = keys.gather(1, evicted[..., None].expand(-1, -1, d)).float()
        ve = values.gather(1, evicted[..., None].expand(-1, -1, d)).float()
        if mode == "average":
            add_k, add_v = ke, ve
        elif mode == "pivotal":
            target = slot[..., None].expand(-1, -1, d)
            add_k, add_v = 0.5 * (ke + kc.gather(1, target)), 0.5 * (ve + vc.gather(1, target))
        else:  # weighted
            add_k, add_v = sim[..., None] * ke, sim[..., None] * ve
        flat = (slot + n * torch.arange(num_heads, device=device)[:, None]).flatten()
        count = torch.zeros(num_heads * n, dtype=torch.float32, device=device)
        count.index_put_((flat,), torch.ones_like(flat, dtype=torch.float32), accumulate=True)
        sum_k = torch.zeros(num_heads * n, d, dtype=torch.float32, device=device).index_put_(
            (flat,), add_k.reshape(-1, d), accumulate=True
        )
        sum_v = torch.zeros(num_heads * n, d, dtype=torch.float32, device=device).index_put_(
            (flat,), add_v.reshape(-1, d), accumulate=True
        )
        count = count.view(num_heads, n, 1)
        hit = count > 0  # untouched kept tokens stay bit-identical
        kc = torch.where(hit, (kc + sum_k.view(num_heads, n, d)) / (count + 1.0), kc)
        vc = torch.where(hit, (vc + sum_v.view(num_heads, n, d)) / (count + 1.0), vc)
    targets = kept.gather(1, slot)
    evicted, targets, sim = evicted.cpu(), targets.cpu(), sim.cpu()
    records = [MergeRecord(source=evicted[h], target=targets[h], similarity=sim[h]) for h in range(num_heads)]
    new_k = list(kc.to(keys.dtype).unbind(0))
    new_v = list(vc.to(values.dtype).unbind(0))
    return new_k, new_v, records, dropped
