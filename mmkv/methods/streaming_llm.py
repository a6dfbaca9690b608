"""StreamingLLM: attention sinks + a recent window (Xiao et al., ICLR 2024, arXiv 2309.17453).

As a prefill compressor (the KVCache-Factory form, docs/methods.md, StreamingLLM): keep the first ``sinks``
tokens and the last ``capacity - sinks`` tokens. Positions are *not* re-encoded: kept tokens keep
their original RoPE positions, and new tokens continue at the logical length.

Preset: ``Uniform(SinkScorer(sinks))`` (docs/methods.md, "Composing methods").
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerContext, LayerPlan, Method
from .compose import SinkScorer, select


@dataclass
class StreamingLLM(Method):
    """Keep ``sinks`` initial tokens and the most recent ``capacity - sinks`` tokens (no scores)."""

    sinks: int = 4

    name = "streamingllm"
    reference = "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks (arXiv 2309.17453)"

    def __post_init__(self) -> None:
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"streamingllm: sinks must be a non-negative integer, got {self.sinks!r}")

    @property
    def scorer(self) -> SinkScorer:
        """This preset's scorer: ``Uniform(scorer)`` is the same method."""
        return SinkScorer(self.sinks)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        return select(self.scorer, ctx, ctx.capacity)
