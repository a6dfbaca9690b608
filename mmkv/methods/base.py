"""The method contract: statistics in, a plan out.

A method is a small dataclass. It declares the prefill statistics it needs (:meth:`stats_request`)
and turns a :class:`LayerContext` into a :class:`LayerPlan`: per KV head, which *logical* prompt
positions stay in the cache (and, for merging methods, the new keys/values of the kept tokens).

- *Layer-local* methods implement :meth:`Method.plan_layer`; the cache compresses each layer right
  after its prefill attention, so the full KV of all layers never coexists.
- *Global* methods (budget depends on all layers: MEDA, MadaKV's compensation, HybridKV) set
  ``is_global = True`` and implement :meth:`Method.plan`, which runs once after the whole prefill,
  before the first decode step.

``capacity`` is the average number of tokens a (layer, KV head) may keep, resolved by the driver
from the user's budget (a ratio of the compressed span, or an absolute token count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..inputs.modality import ModalityMap
from ..statistics.stats import LayerStats, StatsRequest
from .decode import DecodePolicy, as_decode_policy


@dataclass
class LayerContext:
    """What a method sees for one decoder layer at the end of prefill."""

    layer: int
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    length: int  # L: tokens in the compressed span (positions 0..L-1)
    capacity: int  # average tokens per KV head the budget allows in this layer (window included)
    modality: ModalityMap  # provenance of the L tokens
    stats: LayerStats
    keys: torch.Tensor | None = None  # [H_kv, L, d] post-RoPE, for merging methods
    values: torch.Tensor | None = None  # [H_kv, L, d]

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass
class MergeRecord:
    """One KV head's merges: evicted position ``source[i]`` was folded into kept position ``target[i]``."""

    source: torch.Tensor  # long [m]
    target: torch.Tensor  # long [m]
    similarity: torch.Tensor  # float [m]


@dataclass
class LayerPlan:
    """Decision for one layer.

    - ``kept[h]``: sorted logical positions kept for KV head ``h`` (long tensor).
    - ``keys`` / ``values``: optional replacement contents for the kept tokens, ``[n_h, d]`` per head
      (merging methods); ``None`` means "gather the original keys/values".
    - ``merges``: optional per-head :class:`MergeRecord` for the trace.
    - ``decode``: optional typed decode-time policy (:class:`~mmkv.methods.decode.H2OEviction`,
      :class:`~mmkv.methods.decode.ChunkRetrieval`) that builds this layer's cache layer and acts at
      every decode step; the older ``{"policy": name, ...}`` dict form is still read.
    - ``info``: small per-layer numbers for the trace (budgets, entropies, ...).
    """

    kept: list[torch.Tensor]
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None
    merges: list[MergeRecord] | None = None
    decode: DecodePolicy | dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.decode, dict):  # the older dict form: the cache only sees typed policies
            self.decode = as_decode_policy(self.decode)

    @property
    def budgets(self) -> list[int]:
        return [int(k.numel()) for k in self.kept]

    @classmethod
    def keep_all(cls, num_kv_heads: int, length: int, device: torch.device | str = "cpu") -> LayerPlan:
        full = torch.arange(length, device=device)
        return cls(kept=[full.clone() for _ in range(num_kv_heads)])


@dataclass
class Method:
    """Base of all methods. Subclasses are dataclasses whose fields are the method's hyper-parameters."""

    name: ClassVar[str] = "base"
    is_global: ClassVar[bool] = False
    #: Paper/code reference shown in the app and docs.
    reference: ClassVar[str] = ""

    def stats_request(self) -> StatsRequest:
        return StatsRequest()

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        raise NotImplementedError(f"{type(self).__name__} is global: use plan()")

    def plan(self, contexts: list[LayerContext]) -> list[LayerPlan]:
        """Plan every layer at once (global methods override this)."""
        return [self.plan_layer(ctx) for ctx in contexts]

    @property
    def compresses(self) -> bool:
        """False for the Full baseline: no statistics, no plan, the cache stays as it is."""
        return True


def check_positive(method: Any, *names: str) -> None:
    """Raise a clear error when a hyper-parameter that must be a positive integer is not."""
    for name in names:
        value = getattr(method, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{method.name}: {name} must be a positive integer, got {value!r}")


def check_fraction(method: Any, name: str, low: float = 0.0, high: float = 1.0) -> None:
    value = getattr(method, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{method.name}: {name} must be a number in [{low}, {high}], got {value!r}")


def check_choice(method: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(method, name)
    if value not in choices:
        raise ValueError(f"{method.name}: {name} must be one of {', '.join(choices)}, got {value!r}")


# ---- helpers shared by the methods (each is the formula named in its docstring) -------------


def reduce_to_kv_heads(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """GQA: reduce per-query-head scores ``[H_q, L]`` to KV heads ``[H_kv, L]`` (docs/methods.md, Common framework).

    Query heads ``h*G .. h*G+G-1`` share KV head ``h`` (the transformers ``repeat_kv`` layout).
    """
    h_q, length = scores.shape
    grouped = scores.view(num_kv_heads, h_q // num_kv_heads, length)
    if how == "mean":
        return grouped.mean(1)
    if how == "max":
        return grouped.amax(1)
    raise ValueError(f"unknown GQA reduction {how!r}: use 'mean' or 'max'")


def pool1d(scores: torch.Tensor, kernel: int, how: str = "max") -> torch.Tensor:
    """SnapKV's 1-D pooling over positions with padding ``kernel // 2`` and stride 1 (same length)."""
    if kernel <= 1:
        return scores
    x = scores.unsqueeze(1)
    if how == "max":
        y = torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif how == "avg":
        # padding counts as zeros (SnapKV's F.avg_pool1d default): every output is window sum / kernel
        y = torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"unknown pooling {how!r}: use 'max' or 'avg'")
    return y.squeeze(1)[..., : scores.shape[-1]]


def topk_plus_recent(
    scores: torch.Tensor, keep: int | list[int], recent: int, length: int | None = None
) -> list[torch.Tensor]:
    """Per head: the ``keep[h]`` best of ``scores[h, :L-recent]`` plus the last ``recent`` positions.

    ``scores`` is ``[H_kv, L]`` or already sliced to ``[H_kv, L - recent]`` (then pass ``length``);
    ties break toward the earlier position. Returns sorted positions.
    """
    h_kv = scores.shape[0]
    length = scores.shape[1] if length is None else length
    recent = min(recent, length)
    head = length - recent
    counts = [keep] * h_kv if isinstance(keep, int) else list(keep)
    tail = torch.arange(head, length, device=scores.device)
    kept = []
    for h in range(h_kv):
        n = max(0, min(int(counts[h]), head))
        if n:
            # stable descending sort so equal scores keep the earlier position
            order = torch.sort(scores[h, :head], descending=True, stable=True).indices[:n]
            chosen = torch.cat([order, tail])
        else:
            chosen = tail
        kept.append(torch.sort(chosen).values)
    return kept


def largest_remainder(values: Sequence[float], total: int, high: int) -> list[int]:
    """Integers ``floor(v)`` plus one for the largest fractional parts (ties: lower index), summing to ``total``."""
    out = [int(math.floor(v + 1e-9)) for v in values]
    rest = total - sum(out)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - out[i]), i))
    while rest > 0:
        progressed = False
        for i in order:
            if rest == 0:
                break
            if out[i] < high:
                out[i] += 1
                rest -= 1
                progressed = True
        if not progressed:
            break
    return out


def water_fill(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Integers ``<= caps`` summing to at most ``total``, proportional to ``weights`` (water-filling).

    Heads whose proportional share exceeds their cap are fixed at the cap and the rest is shared again;
    shares are rounded down and the leftover units go to the largest fractional parts (ties: lower index).
    """
    n = len(weights)
    out = [0] * n
    free = [i for i in range(n) if caps[i] > 0]
    budget = max(0, int(total))
    while free and budget > 0:
        weight = sum(weights[i] for i in free)
        share = {i: (budget * weights[i] / weight if weight > 0 else budget / len(free)) for i in free}
        capped = [i for i in free if share[i] >= caps[i]]
        if capped:
            for i in capped:
                out[i] = caps[i]
                budget -= caps[i]
            free = [i for i in free if i not in capped]
            continue
        floors = {i: int(math.floor(share[i])) for i in free}
        left = budget - sum(floors.values())
        order = sorted(free, key=lambda i: (-(share[i] - floors[i]), i))
        for i in order[:left]:
            floors[i] += 1
        for i in free:
            out[i] = min(caps[i], floors[i])
        break
    return out
