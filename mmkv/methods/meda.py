"""MEDA: entropy-guided layer budgets + text-prior selection + average merging (Wan et al., NAACL 2025, arXiv 2502.17599).

A *global* method: the budget of a layer depends on every layer's cross-modal entropy, so it plans
once after the whole prefill (docs/methods.md, MEDA).

1. Cross-modal entropy per layer (Eq. 5-6). With ``A_TV = softmax(Q_T K_V^T / sqrt(D))`` (text
   queries over visual keys only) and ``A_VT = softmax(Q_V K_T^T / sqrt(D))``::

       E_TV = -(1/|T|) sum_i sum_j A_TV[i, j] log A_TV[i, j]       (mean row entropy, nats, >= 0)
       E_VT = -(1/|V|) sum_i sum_j A_VT[i, j] log A_VT[i, j]
       E_CM^l = E_TV + E_VT

   The paper writes E_TV, E_VT with a positive sign (negative numbers) and E_CM = -(E_TV + E_VT);
   we store the positive entropies directly, same value. ``stats.cross_*`` computes them.
2. Layer budgets (Eq. 7/15/16): ``alpha_l = softmax_l(E_CM) · N_L · rho`` and ``S_l = alpha_l · L``:
   higher entropy (attention spread over many tokens of the other modality) -> larger cache. With
   ``C`` the session's capacity (``rho·L``), the total is ``T = N_L · C`` tokens per KV head.
3. Per layer, LOOK-M's text-prior selection (Eq. 8-10) with ``S_l`` split 3:1 recent:important
   (§4.4, ``M_l = floor(3/4 · S_l)``, ``N_l = S_l - M_l``), then **average** merging (Eq. 11-12),
   see :mod:`mmkv.methods.lookm` and :mod:`mmkv.methods.merge`.

Our readings where the paper is vague or the code differs (docs/methods.md, MEDA):

- ``entropy="cross_modal"`` (default, the paper) or ``"full"``: the released code's quantity, the
  mean row entropy of the full causal attention averaged over heads (its cross-modal function is
  never called).
- ``head_average="attention"`` (default, the paper: "A is average attention across multi-heads"):
  entropy of the head-averaged distribution; ``"entropy"``: mean of per-head entropies. It applies to
  the cross-modal entropy only; ``"full"`` is always the code's mean of per-head entropies.
- ``cross_mask="causal"`` (default): a query sees only earlier keys, as the model does (a text token
  before an image never attended to it; rows that see no key of the other modality are left out).
  ``"full"`` applies no mask, as the paper's formula (and the unused code function) reads.
- ``split=(3, 1)`` (paper) or ``(1, 1)`` (the code's ``hh_ratio = recent_ratio = r_l / 2``).
- ``clamp=(0.01, 1.0)`` (the code's clamp of the per-layer ratio; the paper has none) or ``None``
  (only the physical bounds ``0 <= S_l <= L``). The code does not redistribute what the clamp cuts,
  so its budgets do not add up to ``N_L·rho``; with ``redistribute=True`` (default) we do, by
  *proportional water-filling*: ``x_l = clip(lambda · w_l, lo, hi)`` with ``w = softmax(E_CM)``,
  ``lo = ceil(clamp[0]·L)``, ``hi = floor(clamp[1]·L)`` tokens, and the unique ``lambda`` making
  ``sum_l x_l = T`` (a clamped layer's excess or deficit goes to the free layers in proportion to
  their weights). Integer budgets by the largest remainder (``floor(x_l)``, then +1 to the layers
  with the largest fractional parts, ties to the lower layer), so ``sum_l S_l = T`` exactly. If the
  clamp cannot hold the total (``N_L·lo > T`` or ``N_L·hi < T``), the violated bound is relaxed to
  the average ``T / N_L`` (rounded down / up). ``redistribute=False`` is the code: ``S_l =
  floor(clip(w_l·T, lo, hi))``.
- Compression at the end of prefill, from prefill attention only. The code compresses at the first
  decode step and adds that query's attention to the scores; it also widens the recent window to
  the text length (``M <- text_len (+100)``), which we do not copy (the text prior keeps all text
  anyway; the widening only changes which visual tokens survive).
- Merging implements Eq. 12 (no code filter by default; ``similarity_filter=True`` gives it).
- Prompts without visual tokens: the cross-modal entropies are 0 in every layer (uniform budgets)
  and the text prior keeps everything (``text_only="keep"``, like the code's image guard);
  ``text_only="h2o"`` selects top-N + recent per layer budget instead (see :mod:`mmkv.methods.lookm`).

``LayerPlan.info`` records ``entropy`` (E_CM^l or the full entropy, nats), ``weight`` (softmax
weight), ``layer_budget`` (S_l tokens), ``layer_ratio`` (S_l / L), plus the selection facts of
:func:`mmkv.methods.lookm.text_prior_plan` (``retained`` is the actual count, >= S_l with long text).

Preset: ``LayerEntropy(LookM(recent_share=split[0] / sum(split), merge="average"), entropy, head_average,
cross_mask, clamp, redistribute)`` (docs/methods.md, "Composing methods").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..statistics.stats import StatsRequest
from .base import LayerContext, LayerPlan, Method, check_choice
from .compose import LayerEntropy, layer_budgets, layer_entropy, proportional_fill, softmax  # noqa: F401  (re-exported)
from .lookm import LookM, check_text_prior_params


@dataclass
class MEDA(Method):
    """MEDA: cross-modal-entropy layer budgets, text prior with a ``split`` recent:important, average merge."""

    entropy: str = "cross_modal"
    head_average: str = "attention"
    cross_mask: str = "causal"
    split: Sequence[float] = (3, 1)  # a list once validated
    clamp: Sequence[float] | None = (0.01, 1.0)
    redistribute: bool = True
    merge: str = "average"
    similarity_filter: bool = False
    text_only: str = "keep"
    gqa_reduce: str = "mean"

    name = "meda"
    is_global = True
    reference = (
        "Wan et al. 2025, MEDA: Dynamic KV Cache Allocation for Efficient Multimodal Long-Context "
        "Inference (arXiv 2502.17599)"
    )

    def __post_init__(self) -> None:
        check_choice(self, "entropy", ("cross_modal", "full"))
        check_choice(self, "head_average", ("attention", "entropy"))
        check_choice(self, "cross_mask", ("causal", "full"))
        split = list(self.split) if isinstance(self.split, (list, tuple)) else None
        if (
            split is None
            or len(split) != 2
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in split)
            or sum(split) <= 0
        ):
            raise ValueError(
                f"meda: split must be two non-negative numbers (recent, important), e.g. (3, 1); got {self.split!r}"
            )
        self.split = split  # lists keep the trace's JSON round trip exact
        if self.clamp is not None:
            clamp = list(self.clamp) if isinstance(self.clamp, (list, tuple)) else None
            if clamp is None or len(clamp) != 2 or not 0.0 <= clamp[0] <= clamp[1] <= 1.0:
                raise ValueError(
                    f"meda: clamp must be None or (low, high) with 0 <= low <= high <= 1; got {self.clamp!r}"
                )
            self.clamp = clamp
        check_text_prior_params(self)

    @property
    def recent_share(self) -> float:
        return self.split[0] / (self.split[0] + self.split[1])

    def stats_request(self) -> StatsRequest:
        if self.entropy == "full":
            return StatsRequest(column_sums=True, full_entropy=True)
        return StatsRequest(column_sums=True, cross_modal=self.cross_mask)

    @property
    def policy(self) -> LayerEntropy:
        """This preset as a composition: entropy layer budgets over LOOK-M's text prior with MEDA's split and merge."""
        inner = LookM(
            recent_share=self.recent_share,
            merge=self.merge,
            similarity_filter=self.similarity_filter,
            text_only=self.text_only,
            gqa_reduce=self.gqa_reduce,
        )
        return LayerEntropy(inner, self.entropy, self.head_average, self.cross_mask, self.clamp, self.redistribute)

    def plan(self, contexts: list[LayerContext]) -> list[LayerPlan]:
        return self.policy.plan(contexts)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        """One layer alone gets the whole budget (a single-layer softmax); used only outside a session."""
        return self.plan([ctx])[0]
