"""H2O: heavy hitters + recent tokens (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

Score of a key = attention it received, summed over *all* prompt queries (Eq. "accumulated
attention"; docs/methods.md, H2O), computed in query blocks. Keep the last ``recent`` tokens and the
``capacity - recent`` best-scored earlier tokens, per KV head (GQA: mean over the group).

``decode_evict=True`` gives the original H2O: the cache stays at ``capacity`` tokens during
decoding, each new query's attention is added to the scores and the lowest-scored token outside
the recent window is evicted at every step. Off by default, as in the multimodal papers' usage.

Preset: ``Uniform(H2OScorer(recent_ratio, gqa_reduce))`` plus, with ``decode_evict``, the typed decode
policy :class:`~mmkv.methods.decode.H2OEviction` (docs/methods.md, "Composing methods").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..statistics.stats import StatsRequest
from .base import LayerContext, LayerPlan, Method, check_choice, check_fraction
from .compose import H2OScorer, select
from .decode import H2OEviction


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

    @property
    def scorer(self) -> H2OScorer:
        """This preset's scorer: ``Uniform(scorer)`` keeps the same tokens."""
        return H2OScorer(self.recent_ratio, self.gqa_reduce)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        scorer = self.scorer
        recent = scorer.window(ctx, ctx.capacity)
        plan = select(scorer, ctx, ctx.capacity)
        if self.decode_evict:
            scores = scorer.full_scores(ctx)
            plan.decode = H2OEviction(ctx.capacity, recent, [scores[h, k] for h, k in enumerate(plan.kept)])
        plan.info["recent"] = recent
        return plan
