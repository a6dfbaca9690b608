"""Full cache: the uncompressed reference every other method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerContext, LayerPlan, Method


@dataclass
class Full(Method):
    """Keep every token. No statistics are computed and the cache is left untouched."""

    name = "full"
    reference = "Uncompressed KV cache."

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        return LayerPlan.keep_all(ctx.num_kv_heads, ctx.length)

    @property
    def compresses(self) -> bool:
        return False
