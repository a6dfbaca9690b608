"""PyramidKV: SnapKV scoring with a linear layer budget (Cai et al., arXiv 2406.02069).

Lower layers keep more, upper layers less (KVCache-Factory defaults: window 8, kernel 7, max
pooling, beta 20). With base ``b = C - w``: ``min = b / beta``, ``max = 2b - min`` (clipped to
``L - w`` with ``min`` re-balanced), and layer ``l`` keeps ``x_l = max - l (max - min) / (N_L - 1)``
plus the window. The schedule's mean is ``b``, so its integer capacities are rounded by the largest
remainder (``floor(x_l)``, then +1 for the largest fractional parts, ties to the lower layer): the
layers hold exactly ``N_L C`` tokens per KV head and stay non-increasing with depth. The released
code floors ``min`` and the step ``(max - min) // (N_L - 1)`` instead, which overspends by up to
``(N_L - 1) / 2`` tokens per head (+14% at C = 108 over 32 layers). Prompts shorter than ``2b`` fall
back to uniform SnapKV.

Preset: ``Pyramid(SnapKVScorer(window, kernel, pooling, gqa_reduce), beta)`` (docs/methods.md, "Composing methods").
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerContext, LayerPlan, check_positive
from .compose import Pyramid
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV with a pyramid of per-layer capacities; ``beta`` sets the top/bottom ratio."""

    window: int = 8
    kernel: int = 7
    pooling: str = "max"
    beta: int = 20

    name = "pyramidkv"
    reference = "Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (arXiv 2406.02069)"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "beta")

    @property
    def policy(self) -> Pyramid:
        """This preset as a composition."""
        return Pyramid(self.scorer, self.beta)

    def layer_capacity(self, ctx: LayerContext) -> int:
        """Capacity (window included) of layer ``ctx.layer``."""
        return self.policy.layer_capacity(ctx)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        return self.policy.plan_layer(ctx)
