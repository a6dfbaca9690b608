"""Decode-time policies: typed parts of a :class:`~mmkv.methods.base.LayerPlan` that build their own cache layer.

A plan whose ``decode`` is set is not stored as a plain Dense/Ragged layer: the cache asks the policy
for its layer (:meth:`DecodePolicy.build_layer`), which then keeps acting at every decode step
(docs/methods.md, "Composing methods"). Two policies exist:

- :class:`H2OEviction` — H2O's decode-time eviction: the cache stays at ``capacity`` tokens, each new
  query's attention is added to the scores and the lowest-scored token outside the recent window goes;
- :class:`ChunkRetrieval` — HybridKV's dynamic heads: full prompt KV in a host store, the best chunks
  for the current query loaded at every step (static heads keep their pruned tokens).

Each policy is also a read-only mapping (``policy["capacity"]``, ``policy["policy"]`` = its name), the
form plans had before; :func:`as_decode_policy` turns such a dict back into the typed policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # the cache imports the method contract: import it lazily at build time
    from ..cache.layers import CompressedLayer
    from .base import LayerPlan


@dataclass(eq=False)
class DecodePolicy(Mapping):
    """Base of the decode-time policies: a dataclass that builds the cache layer of one decoder layer."""

    name: ClassVar[str] = "base"

    def build_layer(
        self, keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan, reserve: int = 0
    ) -> CompressedLayer:
        """The cache layer for full ``keys``/``values`` ``[1, H_kv, L, d]`` and ``plan`` (``reserve`` generated tokens)."""
        raise NotImplementedError

    # ---- read-only mapping view (the former ``{"policy": name, ...}`` dicts) ----------------------
    def _keys(self) -> list[str]:
        return ["policy", *(f.name for f in dataclasses.fields(self))]

    def __getitem__(self, key: str) -> Any:
        if key == "policy":
            return self.name
        if key in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


@dataclass(eq=False)
class H2OEviction(DecodePolicy):
    """H2O decode-time eviction (docs/methods.md, H2O): ``capacity`` tokens, ``recent`` protected, ``scores`` per head."""

    capacity: int
    recent: int
    scores: list[torch.Tensor]  # per KV head, the accumulated attention of its kept tokens

    name = "h2o"

    def build_layer(
        self, keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan, reserve: int = 0
    ) -> CompressedLayer:
        """H2O storage never grows: one slot of room for the incoming token replaces ``reserve``."""
        from ..cache.layers import H2ODecodeLayer, kept_contents

        kept = [k.to(device=keys.device, dtype=torch.long) for k in plan.kept]
        if len({k.numel() for k in kept}) != 1:
            raise ValueError("H2O decode-time eviction needs the same budget in every head")
        head_keys, head_values = kept_contents(keys, values, plan, kept)
        scores = torch.stack([s.float().to(keys.device) for s in self.scores])
        return H2ODecodeLayer(
            torch.stack(head_keys)[None].to(keys.dtype),
            torch.stack(head_values)[None].to(values.dtype),
            torch.stack(kept),
            keys.shape[2],
            self.capacity,
            self.recent,
            scores,
        )


@dataclass(eq=False)
class ChunkRetrieval(DecodePolicy):
    """HybridKV's dynamic heads (docs/methods.md, HybridKV): chunk-wise retrieval at every decode step.

    ``head_types`` per KV head (``"static"``/``"dynamic"``); per dynamic head ``sinks`` first and
    ``recent`` last prompt tokens stay, plus ``top_chunks`` chunks of ``chunk_size`` scored by
    ``scoring`` ("mean" | "bounds"); ``offload`` keeps the full KV on the host; ``initial_chunks`` (per
    dynamic head) fill the buffer before the first step.
    """

    head_types: list[str]
    sinks: int
    recent: int
    chunk_size: int
    top_chunks: int
    scoring: str = "mean"
    offload: bool = True
    initial_chunks: list[list[int]] | None = None

    name = "hybrid"

    def build_layer(
        self, keys: torch.Tensor, values: torch.Tensor, plan: LayerPlan, reserve: int = 0
    ) -> CompressedLayer:
        from ..cache.hybrid import build_hybrid_layer

        return build_hybrid_layer(keys, values, plan, reserve)


#: The decode policies by name, to read the older dict form (fixed here: nothing registers at import time).
DECODE_POLICY_TYPES: dict[str, type[DecodePolicy]] = {cls.name: cls for cls in (H2OEviction, ChunkRetrieval)}


def as_decode_policy(spec: DecodePolicy | Mapping[str, Any]) -> DecodePolicy:
    """``spec`` itself, or the typed policy a ``{"policy": name, ...}`` dict describes."""
    if isinstance(spec, DecodePolicy):
        return spec
    name = spec.get("policy")
    if name not in DECODE_POLICY_TYPES:
        raise ValueError(f"unknown decode policy {name!r}; known: {', '.join(sorted(DECODE_POLICY_TYPES))}")
    cls = DECODE_POLICY_TYPES[name]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in spec.items() if k in names})
