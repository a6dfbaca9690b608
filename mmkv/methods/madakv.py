"""MadaKV: modality preference adaptation + hierarchical compression compensation.

MadaKV, ACL 2025 (arXiv 2506.15724). No public code and no paper body were available; the
formulas come from third-party notes (docs/methods.md, MadaKV) and every gap is filled by a reading that is
named below and in docs/methods.md, MadaKV.

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

Preset: ``ModalityAdaptive(SnapKVScorer(window, kernel=1), theta, hcc, phi_init, min_ratio, max_ratio)``
(docs/methods.md, "Composing methods").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..statistics.stats import StatsRequest
from .base import LayerContext, LayerPlan, Method, check_choice, check_fraction, check_positive
from .compose import ModalityAdaptive, SnapKVScorer, coverage_count, split_round, top_of  # noqa: F401  (re-exported)


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

    @property
    def policy(self) -> ModalityAdaptive:
        """This preset as a composition: the proxy window's unpooled attention under MadaKV's allocation."""
        scorer = SnapKVScorer(self.window, kernel=1, pooling="max", gqa_reduce=self.gqa_reduce)
        return ModalityAdaptive(scorer, self.theta, self.hcc, self.phi_init, self.min_ratio, self.max_ratio)

    def analyse(self, ctx: LayerContext, window: int) -> dict:
        """Per KV head: psi over the context, ``w_v``, ``w_t``, preference, ``k_v``, ``k_t``."""
        return self.policy.analyse(ctx, window)

    def plan(self, contexts: list[LayerContext]) -> list[LayerPlan]:
        return self.policy.plan(contexts)
