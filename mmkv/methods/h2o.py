"""H2O: heavy hitters + recent tokens (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

Score of a key = attention it received, summed over *all* prompt queries (Eq. "accumulated
attention"; algorithms.md §6.2), computed in query blocks. Keep the last ``recent`` tokens and the
``capacity - recent`` best-scored earlier tokens, per KV head (GQA: mean over the group).

``decode_evict=True`` gives the original H2O: the cache stays at ``capacity`` tokens during
decoding, each new query's attention is added to the scores and the lowest-scored token outside
the recent window is evicted at every step. Off by default, as in the multimodal papers' usage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stats import StatsRequest
from .base import LayerContext, LayerPlan, Method, check_choice, check_fraction, reduce_to_kv_heads, topk_plus_recent


@dataclass
class H2O(Method):
    """Heavy-hitter oracle. ``recent_ratio`` is the recent share of the capacity (0.5 = hh:recent 1:1)."""

    recent_ratio: float = 0.5
    decode_evict: bool = False
    gqa_reduce: str = "mean"

    name = "h2o"
    reference = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle (arXiv 2306.14048)"

    def __post_init__(self) -> None:
        check_fraction(self, "recent_ratio")
        check_choice(self, "gqa_reduce", ("mean", "max"))

    def stats_request(self) -> StatsRequest:
        return StatsRequest(column_sums=True)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        length, capacity = ctx.length, ctx.capacity
        scores = reduce_to_kv_heads(ctx.stats.column_sums, ctx.num_kv_heads, self.gqa_reduce)
        recent = min(capacity, max(1, round(capacity * self.recent_ratio)))
        if capacity >= length:
            plan = LayerPlan.keep_all(ctx.num_kv_heads, length)
        else:
            plan = LayerPlan(kept=topk_plus_recent(scores, capacity - recent, recent))
        if self.decode_evict:
            plan.decode = {
                "policy": "h2o",
                "capacity": capacity,
                "recent": recent,
                "scores": [scores[h, k] for h, k in enumerate(plan.kept)],
            }
        plan.info["recent"] = recent
        return plan
