"""SnapKV: observation-window voting with pooling (Li et al., NeurIPS 2024, arXiv 2404.14469).

Score = attention of the last ``window`` prompt queries summed per key, pooled along positions
(``kernel``, avg or max) so neighbours of a strong key survive together; keep the top
``capacity - window`` keys before the window plus the window itself (docs/methods.md, SnapKV; defaults
of the SnapKV repository: window 32, kernel 5, avg pooling). When the capacity is smaller than the
window, only the last ``capacity`` tokens are kept.

Preset: ``Uniform(SnapKVScorer(window, kernel, pooling, gqa_reduce))`` (docs/methods.md, "Composing methods").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..statistics.stats import StatsRequest
from .base import LayerContext, LayerPlan, Method, check_choice, check_positive
from .compose import SnapKVScorer, select


@dataclass
class SnapKV(Method):
    """Observation window ``window``, pooling ``kernel``/``pooling``, GQA reduction ``gqa_reduce``."""

    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    gqa_reduce: str = "mean"

    name = "snapkv"
    reference = "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation (arXiv 2404.14469)"

    def stats_request(self) -> StatsRequest:
        return StatsRequest(window=self.window)

    def __post_init__(self) -> None:
        check_positive(self, "window", "kernel")
        check_choice(self, "pooling", ("max", "avg"))
        check_choice(self, "gqa_reduce", ("mean", "max"))

    @property
    def scorer(self) -> SnapKVScorer:
        """This preset's scorer: ``Uniform(scorer)`` is the same method."""
        return SnapKVScorer(self.window, self.kernel, self.pooling, self.gqa_reduce)

    def effective_window(self, ctx: LayerContext, capacity: int) -> int:
        """The recent window kept verbatim: never more than the capacity or the prompt."""
        return self.scorer.window(ctx, capacity)

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        """Pooled window scores of the positions before the window, per KV head ``[H_kv, L - window]``.

        The slice comes before the pooling (SnapKV Alg. 1), so the window's own scores do not leak
        into the positions just before it.
        """
        return self.scorer.scores(ctx, window)

    def keep(self, ctx: LayerContext, capacity: int | list[int]) -> LayerPlan:
        """Keep ``capacity`` (per head, or one value for all) tokens: top scores + the window."""
        return select(self.scorer, ctx, capacity)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        return self.keep(ctx, ctx.capacity)
