"""MadaKV: modality preference adaptation + hierarchical compression compensation.

MadaKV, ACL 2025 (arXiv 2506.15724). No public code and no paper body were available; the
formulas come from third-party notes (algorithms.md §4) and every gap is filled by a reading that is
named below and in ``docs/_madakv_hybridkv.md``.

Per layer ``l`` (processed in order, so the method is global) and KV head ``h``:

- proxy window: the last ``w`` prompt queries (``window``); ``psi(i)`` = their attention on key ``i``,
  summed over the window queries and averaged over the query heads of the GQA group;
- context = the positions before the kept window (``w_eff = min(window, capacity, L)``);
  ``w_v = sum psi`` over visual (image or video) context keys, ``w_t`` over text context keys;
  preference ``p = w_v / (w_v + w_t)``;
- modality demand ``k_v`` = fewest visual context tokens whose ``psi`` covers ``theta * w_v`` (same
  for ``k_t``); the head's demand is ``d = w_eff + k_v + k_t`` tokens;
- per-head retention ``n`` (window included), by the HCC reading ``hcc``:

  * ``"A"``: ``n = floor(phi^l)``, context part split by preference: ``phi_v = round((n - w) p)``;
  * ``"B"``: ``n = clip(d, phi_min, max_ratio * phi^l)``, context part split in proportion ``k_v : k_t``;
  * ``"off"``: ``n = floor(phi^1)`` in every layer, split by preference (MPA only);

  always ``phi_min <= n <= L``, then the final clip (below); a modality that cannot use its share
  (fewer tokens than its budget) gives the rest to the other modality;
- kept tokens = top ``phi_v`` visual context tokens by ``psi`` + top ``phi_t`` text context tokens +
  the proxy window itself;
- compensation: ``K^l = sum_h (d_h - phi^l)`` (reading A, the demand as the notes write it) or
  ``K^l = sum_h (n_h - phi^l)`` (reading B, what the layer really kept), and
  ``phi^{l+1} = phi^l - K^l / (H_kv (N_L - 1 - l))`` for a 0-indexed ``l`` (the notes'
  ``L_layers - l`` with a 1-indexed ``l``, divided by ``H_kv`` so that ``phi`` stays per head).
  With reading B and ``phi^1 = C`` this is exactly "the remaining budget shared evenly by the
  remaining (layer, head) pairs".

Final clip (both readings): every head of every later layer is guaranteed ``phi_min`` tokens, so
layer ``l`` may keep at most ``remaining - H_kv (N_L - 1 - l) phi_min`` in all; a layer above that
shrinks each head's share above ``phi_min`` by the same factor (rounded down). Hence
``sum over layers and heads <= C * H_kv * N_L`` always.

Closing the budget (reading B, the default): compensation passes what a layer does not use on to
the later layers, but the last layer has none, so with demand-driven retention (heads whose ``theta``
coverage needs few tokens) the surplus was lost: a peaked model held 0.37 of the cache at
``rho = 0.5``. So a layer keeps at least ``remaining - H_kv (N_L - 1 - l) L``, the part of the
surplus that the later layers could not hold even whole (the last layer: everything that is left),
shared in proportion to its heads' ``n`` (largest remainder, at most ``L`` per head): the model
holds exactly ``C * H_kv * N_L``, the surplus landing as late as possible. Reading A follows the
demand, not the budget (``phi`` moves by ``sum_h (d_h - phi)`` whatever was kept), and ``"off"``
keeps ``floor(phi_init C)`` per head: neither is held to the budget (the trace records ``phi``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..modality import TEXT
from ..stats import StatsRequest
from .base import LayerContext, LayerPlan, Method, check_choice, check_fraction, check_positive, reduce_to_kv_heads, water_fill


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


@dataclass
class MadaKV(Method):
    """MadaKV with proxy window ``window``, coverage ``theta``, HCC reading ``hcc`` ("A", "B", "off").

    ``phi_init`` sets ``phi^1 = phi_init * capacity``; ``min_ratio`` the floor
    ``phi_min = max(window kept, floor(min_ratio * capacity))`` per head; ``max_ratio`` the ceiling
    ``max_ratio * phi^l`` of reading B.
    """

    window: int = 32
    theta: float = 0.9
    hcc: str = "B"
    phi_init: float = 1.0
    min_ratio: float = 0.2
    max_ratio: float = 2.0
    gqa_reduce: str = "mean"

    name = "madakv"
    is_global = True
    reference = (
        "MadaKV: modality-adaptive KV cache eviction for multimodal long-context inference "
        "(ACL 2025, arXiv 2506.15724; no public code)"
    )

    def __post_init__(self) -> None:
        check_positive(self, "window")
        check_fraction(self, "theta")
        check_choice(self, "hcc", ("A", "B", "off"))
        check_fraction(self, "min_ratio")
        check_fraction(self, "phi_init", 0.0, 1e6)
        check_fraction(self, "max_ratio", 1.0, 1e6)
        check_choice(self, "gqa_reduce", ("mean", "max"))
        if self.theta <= 0 or self.phi_init <= 0:
            raise ValueError(f"{self.name}: theta and phi_init must be positive")

    def stats_request(self) -> StatsRequest:
        return StatsRequest(window=self.window)

    # ---- per-layer analysis (MPA) ------------------------------------------------------------
    def analyse(self, ctx: LayerContext, window: int) -> dict:
        """Per KV head: psi over the context, ``w_v``, ``w_t``, preference, ``k_v``, ``k_t``."""
        length = ctx.length
        span = length - window
        psi = reduce_to_kv_heads(ctx.stats.window_scores.float(), ctx.num_kv_heads, self.gqa_reduce)[:, :span]
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
        return {"psi": psi, "visual": visual, "text": text, "w_v": w_v, "w_t": w_t, "pref": pref, "k_v": k_v, "k_t": k_t}

    # ---- global plan (HCC) -----------------------------------------------------------------
    def plan(self, contexts: list[LayerContext]) -> list[LayerPlan]:
        if not contexts:
            return []
        first = contexts[0]
        length, capacity, h_kv = first.length, first.capacity, first.num_kv_heads
        n_layers = len(contexts)
        if capacity >= length:
            return [self._keep_all(ctx) for ctx in contexts]
        window = min(self.window, capacity, length)
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
            plan.info.update({
                "phi": phi,
                "hcc": self.hcc,
                "window": window,
                "demand_visual": a["k_v"],
                "demand_text": a["k_t"],
                "compensation": comp,
            })
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
            chosen = torch.cat([
                top_of(a["psi"][h], a["visual"], phi_v),
                top_of(a["psi"][h], a["text"], phi_t),
                tail,
            ])
            kept.append(torch.sort(chosen).values)
            vis_budget.append(phi_v)
            txt_budget.append(phi_t)
        info = {"preference": a["pref"], "visual_budget": vis_budget, "text_budget": txt_budget}
        return LayerPlan(kept=kept, info=info)
