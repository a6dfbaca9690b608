"""Agreement of a compressed run with the Full cache: token overlap and next-token KL.

- **Token overlap**: the share of answer positions where the method's greedy token equals Full's
  (position by position, over the longer of the two answers), and the first position where they differ.
- **Next-token KL** (teacher forcing): Full's answer tokens are fed, one by one, through the model
  with the *method's compressed cache*; at every step ``t`` we take ``KL(P_full(·|y<t) ‖ P_method(·|y<t))``
  and report the mean (and max) over Full's answer. Both distributions are therefore conditioned on the
  same prefix, so the number measures what compression changed, not how far two greedy paths drifted.
  In query-aware mode step 0 is computed before any eviction (KL 0 there), so compression shows from
  the second answer token on; query-agnostic mode compresses the context before the question is read.

The teacher-forced pass costs one extra prefill per method (the answers and timings in the table come
from the ordinary ``mmkv.generate`` runs, untouched by it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..models import PreparedInputs
from ..runtime.driver import forced_logits as driver_forced_logits

__all__ = ["forced_logits", "token_overlap", "first_divergence", "kl_per_step", "agreement"]


def forced_logits(
    model: torch.nn.Module,
    prepared: PreparedInputs,
    method: str,
    budget: float | int,
    forced_ids: Sequence[int],
    *,
    query_aware: bool = True,
    method_params: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``[T, V]`` float32 CPU logits of the next token at each of the ``T = len(forced_ids)`` answer
    steps, with ``method`` compressing the cache exactly as :func:`mmkv.generate` does."""
    return driver_forced_logits(
        model, prepared, method, budget, list(forced_ids), query_aware=query_aware, **(method_params or {})
    )


def token_overlap(reference: Sequence[int], ids: Sequence[int]) -> float:
    n = max(len(reference), len(ids))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(reference, ids)) / n


def first_divergence(reference: Sequence[int], ids: Sequence[int]) -> int | None:
    """Index of the first differing answer token, or None when the answers are identical."""
    for i, (a, b) in enumerate(zip(reference, ids)):
        if a != b:
            return i
    return None if len(reference) == len(ids) else min(len(reference), len(ids))


def kl_per_step(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) ‖ softmax(logits))`` per row, in nats (clamped at 0 for round-off)."""
    p_log = torch.log_softmax(reference_logits.float(), dim=-1)
    q_log = torch.log_softmax(logits.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


def agreement(
    reference_ids: Sequence[int],
    ids: Sequence[int],
    reference_logits: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "overlap": round(token_overlap(reference_ids, ids), 4),
        "first_divergence": first_divergence(reference_ids, ids),
        "kl": None,
        "kl_max": None,
    }
    if (
        reference_logits is not None
        and logits is not None
        and reference_logits.numel()
        and logits.shape == reference_logits.shape
    ):
        kl = kl_per_step(reference_logits, logits)
        out["kl"] = round(float(kl.mean()), 6)
        out["kl_max"] = round(float(kl.max()), 6)
    return out
