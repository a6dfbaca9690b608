"""AdaKV (Ada-SnapKV): adaptive per-head budgets inside a layer (Feng et al., arXiv 2407.11550).

Per layer, the ``H_kv * b`` slots (``b = C - w``) go to the globally best pooled window scores
across heads, so concentrated heads give slots to dispersed ones; a floor ``alpha * b`` per head
keeps every head alive: ``cap_h = n_h * (1 - alpha) + b * alpha`` where ``n_h`` is the number of
head ``h``'s entries in the layer-wide top-k (repo defaults: window 32, kernel 7, max pooling,
alpha 0.2). Since ``sum_h n_h = H_kv b``, the shares add up to exactly ``H_kv b`` (and none exceeds
``L - w``, as ``n_h <= L - w`` and ``b < L - w``): they are made integers by the largest remainder
(``floor``, then +1 for the largest fractional parts, ties to the lower head), so the layer holds
exactly ``H_kv C`` tokens (the repository's ``round(n_h (1 - alpha) + floor(b alpha))``
loses up to one token per head to the floor). Heads then keep different numbers of tokens: the cache
stores them ragged, so the savings are physical.

Preset: ``HeadAdaptive(SnapKVScorer(window, kernel, pooling, gqa_reduce), alpha)`` (docs/methods.md,
"Composing methods"); ``HeadAdaptive(H2OScorer())`` is the same allocation over H2O's scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerContext, LayerPlan, check_fraction
from .compose import HeadAdaptive
from .snapkv import SnapKV


@dataclass
class AdaKV(SnapKV):
    """Ada-SnapKV with floor ``alpha`` (share of the base budget guaranteed to each head)."""

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    alpha: float = 0.2

    name = "adakv"
    reference = (
        "Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (arXiv 2407.11550)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self, "alpha")

    @property
    def policy(self) -> HeadAdaptive:
        """This preset as a composition."""
        return HeadAdaptive(self.scorer, self.alpha)

    def head_capacities(self, ctx: LayerContext) -> list[int]:
        """Per-KV-head capacities (window included)."""
        return self.policy.head_capacities(ctx)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        return self.policy.plan_layer(ctx)
