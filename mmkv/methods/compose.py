"""Composable parts of the methods: scorers and budget policies (docs/methods.md, "Composing methods").

A **scorer** turns the statistics it requests into per-(layer, KV head) token scores and names the
recent window it keeps verbatim; a **budget policy** decides how many tokens each (layer, KV head)
keeps and takes a scorer (or an inner policy), so ``HeadAdaptive(H2OScorer())`` is AdaKV's
head-adaptive allocation over H2O's accumulated attention. The named methods are presets of these
parts (``SnapKV = Uniform(SnapKVScorer())``, ``AdaKV = HeadAdaptive(SnapKVScorer(...))``, ...).

Scorers: :class:`SinkScorer` (StreamingLLM), :class:`H2OScorer`, :class:`SnapKVScorer`, and the
wrapper :class:`TextPrior` (LOOK-M's text-first order over any scorer).
Policies: :class:`Uniform`, :class:`Pyramid` (PyramidKV), :class:`HeadAdaptive` (AdaKV),
:class:`LayerEntropy` (MEDA), :class:`ModalityAdaptive` (MadaKV).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch

from ..inputs.modality import TEXT
from ..statistics.stats import LayerStats, StatsRequest
from .base import (
    LayerContext,
    LayerPlan,
    Method,
    check_choice,
    check_fraction,
    check_positive,
    largest_remainder,
    pool1d,
    reduce_to_kv_heads,
    topk_plus_recent,
    water_fill,
)

# ---- scorers ------------------------------------------------------------------------------------


def _stat(value: torch.Tensor | None, name: str) -> torch.Tensor:
    """A statistic the scorer requested (present unless the caller skipped its ``stats_request``)."""
    if value is None:
        raise ValueError(f"stats.{name} is missing: compute the statistics of the method's stats_request()")
    return value


@runtime_checkable
class Scorer(Protocol):
    """Per-(layer, KV head) token scores from the requested statistics.

    ``window(ctx, capacity)``: the last tokens kept verbatim when a head keeps ``capacity`` tokens;
    ``scores(ctx, window)``: ``[H_kv, L - window]`` scores of the positions before that window
    (higher = keep); ``info(capacity, window)``: what the trace records about the window.
    """

    @property
    def name(self) -> str: ...

    def stats_request(self) -> StatsRequest: ...

    def window(self, ctx: LayerContext, capacity: int) -> int: ...

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor: ...

    def info(self, capacity: int, window: int) -> dict[str, Any]: ...


@dataclass
class SinkScorer:
    """StreamingLLM (docs/methods.md): ``sinks`` first tokens + a recent window of ``capacity - sinks``.

    Scores are ``-position`` (attention sinks: earlier is better), so the top ``sinks`` are the first tokens.
    """

    sinks: int = 4

    name = "streamingllm"

    def __post_init__(self) -> None:
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"{self.name}: sinks must be a non-negative integer, got {self.sinks!r}")

    def stats_request(self) -> StatsRequest:
        return StatsRequest()

    def window(self, ctx: LayerContext, capacity: int) -> int:
        return capacity - min(self.sinks, capacity)

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        span = ctx.length - window
        return -torch.arange(span, dtype=torch.float32).expand(ctx.num_kv_heads, span)

    def info(self, capacity: int, window: int) -> dict[str, Any]:
        return {"sinks": capacity - window}


@dataclass
class H2OScorer:
    """H2O (docs/methods.md): attention received summed over all prompt queries; recent ``recent_ratio`` of the capacity."""

    recent_ratio: float = 0.5
    gqa_reduce: str = "mean"

    name = "h2o"

    def __post_init__(self) -> None:
        check_fraction(self, "recent_ratio")
        check_choice(self, "gqa_reduce", ("mean", "max"))

    def stats_request(self) -> StatsRequest:
        return StatsRequest(column_sums=True)

    def window(self, ctx: LayerContext, capacity: int) -> int:
        return min(capacity, max(1, round(capacity * self.recent_ratio)))

    def full_scores(self, ctx: LayerContext) -> torch.Tensor:
        """Accumulated attention of every position ``[H_kv, L]`` (GQA reduced)."""
        return reduce_to_kv_heads(_stat(ctx.stats.column_sums, "column_sums"), ctx.num_kv_heads, self.gqa_reduce)

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        return self.full_scores(ctx)[:, : ctx.length - window]

    def info(self, capacity: int, window: int) -> dict[str, Any]:
        return {"recent": window}


@dataclass
class SnapKVScorer:
    """SnapKV (docs/methods.md): the last ``window`` queries' attention, pooled along positions (``kernel``, ``pooling``)."""

    window_size: int = 32
    kernel: int = 5
    pooling: str = "avg"
    gqa_reduce: str = "mean"

    name = "snapkv"

    def __post_init__(self) -> None:
        check_positive(self, "window_size", "kernel")
        check_choice(self, "pooling", ("max", "avg"))
        check_choice(self, "gqa_reduce", ("mean", "max"))

    def stats_request(self) -> StatsRequest:
        return StatsRequest(window=self.window_size)

    def window(self, ctx: LayerContext, capacity: int) -> int:
        """The recent window kept verbatim: never more than the capacity or the prompt."""
        return min(self.window_size, capacity, ctx.length)

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        """Pooled window scores before the window ``[H_kv, L - window]``; the slice comes before the pooling (SnapKV Alg. 1)."""
        scores = reduce_to_kv_heads(_stat(ctx.stats.window_scores, "window_scores"), ctx.num_kv_heads, self.gqa_reduce)
        return pool1d(scores[:, : ctx.length - window], self.kernel, self.pooling)

    def info(self, capacity: int, window: int) -> dict[str, Any]:
        return {"window": window}


@dataclass
class TextPrior:
    """LOOK-M's text prior (Eq. 5; docs/methods.md, LOOK-M) over any scorer: text outranks visual.

    Within each modality the inner scorer's order stands (ties: the earlier position). The scores are
    ranks (``-rank``), so a budget policy takes text first; unlike LOOK-M's preset, the budget holds
    (text beyond it is cut, lowest-scored first).
    """

    inner: Any  # Scorer

    @property
    def name(self) -> str:
        return f"textprior({self.inner.name})"

    def stats_request(self) -> StatsRequest:
        return self.inner.stats_request()

    def window(self, ctx: LayerContext, capacity: int) -> int:
        return self.inner.window(ctx, capacity)

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        scores = self.inner.scores(ctx, window)
        span = scores.shape[1]
        visual = (ctx.modality.modality[:span].to(scores.device) != TEXT).to(torch.uint8)
        out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        ranks = -torch.arange(span, dtype=torch.float32, device=scores.device)
        for h in range(scores.shape[0]):
            order = torch.sort(scores[h], descending=True, stable=True).indices
            order = order[torch.sort(visual[order], stable=True).indices]
            out[h, order] = ranks
        return out

    def info(self, capacity: int, window: int) -> dict[str, Any]:
        return self.inner.info(capacity, window)


def select(scorer: Scorer, ctx: LayerContext, capacity: int | list[int], window: int | None = None) -> LayerPlan:
    """Keep ``capacity`` tokens per head (one value, or one per head): the scorer's top scores + its window.

    ``window`` defaults to the scorer's window for the smallest capacity.
    """
    length = ctx.length
    caps = [capacity] * ctx.num_kv_heads if isinstance(capacity, int) else list(capacity)
    if min(caps) >= length:
        return LayerPlan.keep_all(ctx.num_kv_heads, length)
    if window is None:
        window = scorer.window(ctx, min(caps))
    kept = topk_plus_recent(scorer.scores(ctx, window), [c - window for c in caps], window, length)
    return LayerPlan(kept=kept, info=scorer.info(min(caps), window))


# ---- budget policies ----------------------------------------------------------------------------


class Policy(Method):
    """A budget policy: a :class:`Method` built from a scorer or an inner policy (not registered by name)."""

    def window(self, ctx: LayerContext, capacity: int) -> int:
        """Tokens kept verbatim when a head keeps ``capacity`` tokens (outer policies budget the rest)."""
        return 0


def as_policy(part: Scorer | Method) -> Method:
    """A policy as it is, a scorer as :class:`Uniform` over it."""
    return part if isinstance(part, Method) else Uniform(part)


def window_of(policy: Method, ctx: LayerContext, capacity: int) -> int:
    """A policy's window, a preset's through its ``scorer`` (``SnapKV().window`` is a hyper-parameter), else 0."""
    if callable(getattr(type(policy), "window", None)):
        return policy.window(ctx, capacity)  # type: ignore[attr-defined]
    scorer = getattr(policy, "scorer", None)
    return scorer.window(ctx, capacity) if scorer is not None else 0


@dataclass
class Uniform(Policy):
    """Every (layer, KV head) keeps the capacity: the scorer's top tokens plus its window."""

    scorer: Scorer

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"uniform({self.scorer.name})"

    def stats_request(self) -> StatsRequest:
        return self.scorer.stats_request()

    def window(self, ctx: LayerContext, capacity: int) -> int:
        return self.scorer.window(ctx, capacity)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        return select(self.scorer, ctx, ctx.capacity)


@dataclass
class Pyramid(Policy):
    """PyramidKV's linear layer schedule (docs/methods.md, PyramidKV) over ``inner`` (a scorer or a policy).

    With base ``b = C - w`` (``w`` the inner window): ``min = b / beta``, ``max = 2b - min`` (clipped to
    ``L - w``), layer ``l`` keeps ``x_l = max - l (max - min) / (N_L - 1)`` + ``w``, integers by the
    largest remainder; prompts shorter than ``2b`` stay uniform.
    """

    inner: Any  # Scorer | Method
    beta: int = 20

    def __post_init__(self) -> None:
        self.inner = as_policy(self.inner)
        check_positive(self, "beta")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"pyramid({self.inner.name})"

    def stats_request(self) -> StatsRequest:
        return self.inner.stats_request()

    def window(self, ctx: LayerContext, capacity: int) -> int:
        return window_of(self.inner, ctx, capacity)

    def layer_capacity(self, ctx: LayerContext) -> int:
        """Capacity (window included) of layer ``ctx.layer``."""
        length, capacity = ctx.length, ctx.capacity
        window = self.window(ctx, capacity)
        base = capacity - window
        if capacity >= length or length < 2 * base or ctx.num_layers == 1:
            return capacity
        low = base / self.beta
        high = 2 * base - low
        if high >= length - window:
            high = length - window
            low = 2 * base - high
        step = (high - low) / (ctx.num_layers - 1)
        schedule = [high - layer * step for layer in range(ctx.num_layers)]
        return largest_remainder(schedule, ctx.num_layers * base, length - window)[ctx.layer] + window

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        cap = self.layer_capacity(ctx)
        plan = self.inner.plan_layer(replace(ctx, capacity=cap))
        plan.info["layer_capacity"] = cap
        return plan


@dataclass
class HeadAdaptive(Policy):
    """AdaKV's head-adaptive allocation (docs/methods.md, AdaKV) over a scorer's scores.

    Per layer the ``H_kv b`` slots (``b = C - w``) go to the layer-wide top-k scores; head ``h`` with
    ``n_h`` of them gets ``n_h (1 - alpha) + b alpha`` (largest remainder), plus the window.
    """

    scorer: Scorer
    alpha: float = 0.2

    def __post_init__(self) -> None:
        check_fraction(self, "alpha")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"headadaptive({self.scorer.name})"

    def stats_request(self) -> StatsRequest:
        return self.scorer.stats_request()

    def window(self, ctx: LayerContext, capacity: int) -> int:
        return self.scorer.window(ctx, capacity)

    def head_capacities(self, ctx: LayerContext) -> list[int]:
        """Per-KV-head capacities (window included)."""
        length, capacity = ctx.length, ctx.capacity
        if capacity >= length:
            return [length] * ctx.num_kv_heads
        window = self.scorer.window(ctx, capacity)
        base = capacity - window
        scores = self.scorer.scores(ctx, window)  # [H_kv, L - w]
        h_kv, span = scores.shape
        flat = scores.reshape(-1)
        top = torch.topk(flat, min(h_kv * base, flat.numel())).indices
        counts = torch.bincount(top // span, minlength=h_kv).tolist()
        shares = [n * (1 - self.alpha) + base * self.alpha for n in counts]
        return [c + window for c in largest_remainder(shares, h_kv * base, span)]

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        caps = self.head_capacities(ctx)
        plan = select(self.scorer, ctx, caps, self.scorer.window(ctx, ctx.capacity))
        plan.info["head_capacities"] = caps
        return plan


# ---- MEDA's layer budgets ------------------------------------------------------------------------


def layer_entropy(stats: LayerStats, entropy: str, head_average: str) -> float:
    """The per-layer entropy that sets MEDA's budgets (see the module docstring)."""
    if entropy == "full":
        if stats.full_entropy is None:
            raise ValueError("MEDA entropy='full' needs stats.full_entropy")
        return float(stats.full_entropy.float().mean())
    if stats.cross_tv is None or stats.cross_vt is None:
        raise ValueError("MEDA entropy='cross_modal' needs the cross-modal statistics")
    if head_average == "attention":
        return float(stats.cross_tv_head_mean or 0.0) + float(stats.cross_vt_head_mean or 0.0)
    return float(stats.cross_tv.float().mean()) + float(stats.cross_vt.float().mean())


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exp = [math.exp(v - top) for v in values]
    total = sum(exp)
    return [e / total for e in exp]


def proportional_fill(weights: Sequence[float], total: float, low: float, high: float) -> list[float]:
    """``x_l = clip(lam · w_l, low, high)`` with ``sum x_l = total`` (``w_l > 0``; needs ``n·low <= total <= n·high``).

    ``f(lam) = sum_l clip(lam · w_l, low, high)`` is continuous, piecewise linear and non-decreasing,
    with breakpoints ``low / w_l`` and ``high / w_l``: find the segment where it reaches ``total``
    and solve the linear equation there (exact, no iteration).
    """
    n = len(weights)
    if not n * low - 1e-9 <= total <= n * high + 1e-9:
        raise ValueError(f"cannot fill {total} into {n} layers within [{low}, {high}]")

    def f(lam: float) -> float:
        return sum(min(high, max(low, lam * w)) for w in weights)

    points = sorted({low / w for w in weights} | {high / w for w in weights})
    prev = 0.0
    for point in points:
        if f(point) >= total:
            break
        prev = point
    else:
        return [high] * n
    # On [prev, point] a layer is pinned at `high` if high/w <= prev, at `low` if low/w >= point, else free.
    pinned = sum(high for w in weights if high / w <= prev) + sum(low for w in weights if low / w >= point)
    free = sum(w for w in weights if high / w > prev and low / w < point)
    lam = (total - pinned) / free if free > 0 else point
    return [min(high, max(low, lam * w)) for w in weights]


def layer_budgets(
    entropies: Sequence[float],
    capacities: Sequence[int],
    length: int,
    clamp: Sequence[float] | None = (0.01, 1.0),
    redistribute: bool = True,
) -> tuple[list[float], list[int]]:
    """Softmax weights and integer layer budgets ``S_l`` (tokens per KV head) from the layer entropies."""
    n = len(entropies)
    weights = softmax(entropies)
    total = int(sum(capacities))
    if clamp is None:
        low, high = 0, length
    else:
        low = min(length, max(0, math.ceil(clamp[0] * length - 1e-9)))
        high = max(0, min(length, math.floor(clamp[1] * length + 1e-9)))
    if not redistribute:
        return weights, [int(math.floor(min(high, max(low, w * total)) + 1e-9)) for w in weights]
    low = min(low, total // n)  # a floor the total cannot pay for is relaxed to the average
    high = max(high, -(-total // n))
    filled = proportional_fill(weights, float(total), float(low), float(high))
    return weights, largest_remainder(filled, total, high)


# ---- MadaKV's modality helpers -------------------------------------------------------------------


def coverage_count(scores: torch.Tensor, theta: float) -> int:
    """Fewest entries of ``scores`` (>= 0) whose sum reaches ``theta`` times the total (0 for an empty or zero set)."""
    if scores.numel() == 0:
        return 0
    total = float(scores.sum())
    if total <= 0.0:
        return 0
    ordered = torch.sort(scores.double(), descending=True).values
    reached = (torch.cumsum(ordered, 0) >= theta * total).nonzero()
    # cumsum rounding can leave the last partial sum a hair below theta*total when theta == 1
    return int(reached[0]) + 1 if reached.numel() else int(scores.numel())


def split_round(total: int, part: float, whole: float) -> int:
    """``round(total * part / whole)`` (half up) in exact arithmetic when the inputs are integers."""
    if whole <= 0:
        return 0
    if float(part).is_integer() and float(whole).is_integer():
        p, w = int(part), int(whole)
        return (2 * total * p + w) // (2 * w)
    return int(math.floor(total * part / whole + 0.5))


def top_of(scores: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` positions with the best ``scores`` among ``positions`` (ties: earlier position)."""
    if count <= 0 or positions.numel() == 0:
        return positions[:0]
    order = torch.sort(scores[positions], descending=True, stable=True).indices[:count]
    return positions[order]


# ---- global budget policies ---------------------------------------------------------------------


@dataclass
class LayerEntropy(Policy):
    """MEDA's per-layer budgets (docs/methods.md, MEDA) over ``inner`` (a scorer or a policy).

    ``S_l`` from the softmax of each layer's entropy (``entropy`` "cross_modal" | "full",
    ``head_average``, ``cross_mask``), clamped by ``clamp`` and redistributed (``redistribute``); the
    inner policy then plans layer ``l`` with capacity ``S_l``.
    """

    inner: Any  # Scorer | Method
    entropy: str = "cross_modal"
    head_average: str = "attention"
    cross_mask: str = "causal"
    clamp: Any = (0.01, 1.0)
    redistribute: bool = True

    is_global = True

    def __post_init__(self) -> None:
        self.inner = as_policy(self.inner)
        check_choice(self, "entropy", ("cross_modal", "full"))
        check_choice(self, "head_average", ("attention", "entropy"))
        check_choice(self, "cross_mask", ("causal", "full"))
        if self.clamp is not None:
            clamp = list(self.clamp) if isinstance(self.clamp, (list, tuple)) else None
            if clamp is None or len(clamp) != 2 or not 0.0 <= clamp[0] <= clamp[1] <= 1.0:
                raise ValueError(
                    f"{self.name}: clamp must be None or (low, high) with 0 <= low <= high <= 1; got {self.clamp!r}"
                )
            self.clamp = clamp

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"layerentropy({self.inner.name})"

    def stats_request(self) -> StatsRequest:
        own = StatsRequest(full_entropy=True) if self.entropy == "full" else StatsRequest(cross_modal=self.cross_mask)
        return self.inner.stats_request() | own

    def plan(self, contexts: list[LayerContext]) -> list[LayerPlan]:
        if not contexts:
            return []
        length = contexts[0].length
        entropies = [layer_entropy(ctx.stats, self.entropy, self.head_average) for ctx in contexts]
        weights, budgets = layer_budgets(
            entropies, [ctx.capacity for ctx in contexts], length, self.clamp, self.redistribute
        )
        plans = []
        for ctx, e, w, budget in zip(contexts, entropies, weights, budgets):
            plan = self.inner.plan_layer(replace(ctx, capacity=budget))
            plan.info.update(entropy=e, weight=w, layer_budget=budget, layer_ratio=budget / length if length else 0.0)
            plans.append(plan)
        return plans

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        """One layer alone gets the whole budget (a single-layer softmax); used only outside a session."""
        return self.plan([ctx])[0]


@dataclass
class ModalityAdaptive(Policy):
    """MadaKV's modality preference + hierarchical compensation (docs/methods.md, MadaKV) over a scorer's scores.

    Per head, ``psi`` = the scorer's scores before its window; the head's retention ``n`` follows the
    HCC reading ``hcc`` ("A", "B", "off") with ``phi^1 = phi_init C``, the floor ``min_ratio`` and the
    ceiling ``max_ratio``; its context part is split between the visual and the text tokens (by the
    preference ``w_v / (w_v + w_t)``, or the ``theta``-coverage demands ``k_v : k_t`` for "B").
    """

    scorer: Scorer
    theta: float = 0.9
    hcc: str = "B"
    phi_init: float = 1.0
    min_ratio: float = 0.2
    max_ratio: float = 2.0

    is_global = True

    def __post_init__(self) -> None:
        check_fraction(self, "theta")
        check_choice(self, "hcc", ("A", "B", "off"))
        check_fraction(self, "min_ratio")
        check_fraction(self, "phi_init", 0.0, 1e6)
        check_fraction(self, "max_ratio", 1.0, 1e6)
        if self.theta <= 0 or self.phi_init <= 0:
            raise ValueError(f"{self.name}: theta and phi_init must be positive")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"modalityadaptive({self.scorer.name})"

    def stats_request(self) -> StatsRequest:
        return self.scorer.stats_request()

    def window(self, ctx: LayerContext, capacity: int) -> int:
        return self.scorer.window(ctx, capacity)

    # ---- per-layer analysis (MPA) ------------------------------------------------------------
    def analyse(self, ctx: LayerContext, window: int) -> dict:
        """Per KV head: psi over the context, ``w_v``, ``w_t``, preference, ``k_v``, ``k_t``."""
        length = ctx.length
        span = length - window
        psi = self.scorer.scores(ctx, window).float()
        codes = ctx.modality.modality.to(psi.device)[:span]
        visual = (codes != TEXT).nonzero().flatten()
        text = (codes == TEXT).nonzero().flatten()
        w_v = psi[:, visual].sum(1) if visual.numel() else psi.new_zeros(ctx.num_kv_heads)
        w_t = psi[:, text].sum(1) if text.numel() else psi.new_zeros(ctx.num_kv_heads)
        pref = []
        for h in range(ctx.num_kv_heads):
            mass = float(w_v[h] + w_t[h])
            # no attention mass on the context at all: fall back to the token shares
            pref.append(float(w_v[h]) / mass if mass > 0 else visual.numel() / max(1, span))
        k_v = [coverage_count(psi[h, visual], self.theta) for h in range(ctx.num_kv_heads)]
        k_t = [coverage_count(psi[h, text], self.theta) for h in range(ctx.num_kv_heads)]
        return {
            "psi": psi,
            "visual": visual,
            "text": text,
            "w_v": w_v,
            "w_t": w_t,
            "pref": pref,
            "k_v": k_v,
            "k_t": k_t,
        }

    # ---- global plan (HCC) -----------------------------------------------------------------
    def plan(self, contexts: list[LayerContext]) -> list[LayerPlan]:
        if not contexts:
            return []
        first = contexts[0]
        length, capacity, h_kv = first.length, first.capacity, first.num_kv_heads
        n_layers = len(contexts)
        if capacity >= length:
            return [self._keep_all(ctx) for ctx in contexts]
        window = self.scorer.window(first, capacity)
        phi_min = min(capacity, max(window, int(self.min_ratio * capacity)))
        total = capacity * h_kv * n_layers
        remaining = total
        phi = self.phi_init * capacity
        plans = []
        for i, ctx in enumerate(contexts):
            a = self.analyse(ctx, window)
            demand = [window + a["k_v"][h] + a["k_t"][h] for h in range(h_kv)]
            if self.hcc == "B":
                ceiling = max(phi_min, int(math.floor(self.max_ratio * phi)))
                wanted = [min(max(d, phi_min), ceiling) for d in demand]
            else:  # "A" and "off": the layer keeps phi (phi stays phi^1 when HCC is off)
                wanted = [int(math.floor(phi))] * h_kv
            wanted = [min(length, max(phi_min, n)) for n in wanted]
            # final clip: leave phi_min per head for every later layer
            allowed = remaining - h_kv * (n_layers - 1 - i) * phi_min
            if sum(wanted) > allowed:
                spare, over = allowed - h_kv * phi_min, sum(wanted) - h_kv * phi_min
                wanted = [phi_min + ((n - phi_min) * spare) // over for n in wanted]
            elif self.hcc == "B" and sum(wanted) < (needed := remaining - h_kv * (n_layers - 1 - i) * length):
                # a surplus the later layers cannot hold even whole stays here (the last layer: all that is left)
                wanted = water_fill(needed, [float(n) for n in wanted], [length] * h_kv)
            plan = self._select(ctx, a, wanted, window)
            kept_counts = plan.budgets
            remaining -= sum(kept_counts)
            if self.hcc == "A":
                comp = float(sum(d - phi for d in demand))
            elif self.hcc == "B":
                comp = float(sum(n - phi for n in kept_counts))
            else:
                comp = 0.0
            plan.info.update(
                {
                    "phi": phi,
                    "hcc": self.hcc,
                    "window": window,
                    "demand_visual": a["k_v"],
                    "demand_text": a["k_t"],
                    "compensation": comp,
                }
            )
            plans.append(plan)
            if i < n_layers - 1 and self.hcc != "off":
                phi = phi - comp / (h_kv * (n_layers - 1 - i))
        return plans

    def _keep_all(self, ctx: LayerContext) -> LayerPlan:
        plan = LayerPlan.keep_all(ctx.num_kv_heads, ctx.length)
        plan.info.update({"phi": float(ctx.length), "hcc": self.hcc, "window": ctx.length})
        return plan

    def _select(self, ctx: LayerContext, a: dict, wanted: list[int], window: int) -> LayerPlan:
        """Per head: split ``wanted[h] - window`` between the modalities, top-k each, plus the window."""
        length = ctx.length
        span = length - window
        tail = torch.arange(span, length, device=a["psi"].device)
        n_vis, n_txt = a["visual"].numel(), a["text"].numel()
        kept, vis_budget, txt_budget = [], [], []
        for h in range(ctx.num_kv_heads):
            b = max(0, wanted[h] - window)
            if self.hcc == "B":
                k_v, k_t = a["k_v"][h], a["k_t"][h]
                phi_v = split_round(b, k_v, k_v + k_t) if k_v + k_t > 0 else split_round(b, a["pref"][h], 1.0)
            else:
                phi_v = split_round(b, a["pref"][h], 1.0)
            # overflow: a modality with fewer tokens than its share hands the rest to the other one
            phi_v = min(phi_v, n_vis)
            phi_t = min(b - phi_v, n_txt)
            phi_v = min(b - phi_t, n_vis)
            chosen = torch.cat(
                [
                    top_of(a["psi"][h], a["visual"], phi_v),
                    top_of(a["psi"][h], a["text"], phi_t),
                    tail,
                ]
            )
            kept.append(torch.sort(chosen).values)
            vis_budget.append(phi_v)
            txt_budget.append(phi_t)
        info = {"preference": a["pref"], "visual_budget": vis_budget, "text_budget": txt_budget}
        return LayerPlan(kept=kept, info=info)
