"""LOOK-M: text-prior KV eviction + KV merging (Wan et al., EMNLP Findings 2024, arXiv 2406.18139).

Once per layer at the end of prefill (docs/methods.md, LOOK-M):

1. Score (Eq. 4): ``A_s = sum_i A_p[i, :]``, the attention each key received summed over **all**
   prompt queries (H2O's accumulated attention; ``stats.column_sums``), per query head, reduced to
   KV heads by the mean over each GQA group (docs/methods.md, Common framework).
2. Text prior (Eq. 5): ``A_s[T] += max(A_s)``, so every text token outranks every visual token. We
   implement the *ordering* directly (text first, as the code's ``-65516`` on visual positions does):
   the paper's ``+= max`` would tie a zero-score text token with the best visual token.
3. Selection (Eq. 6-8): ``I = Top_N(A_s[:L-M])``; keep ``T ∪ I ∪ {L-M, ..., L-1}``. Because text
   comes first, ``Top_N`` takes text before any visual token, so every text token is kept whatever
   the budget and visual tokens compete for the ``N - |text before the window|`` remaining slots
   (ties: the earlier position). The retained count is ``max(N, n_text_outside_window) + M``, the
   same in every KV head. The paper's "S = N + M" holds only for short text: the trace reports the
   actual count as ``info["retained"]`` next to the nominal ``N + M``.
4. Merging (§3.3, Eq. 9-12): every evicted token is folded into its most key-similar kept token,
   see :mod:`mmkv.methods.merge`. Default: pivotal merge (the paper's best, "TP + P-Merge").

Budget. The paper keeps ``M = int(α1·L)`` recent and ``N = int(α2·L)`` important tokens with
α1 = α2 = 0.1 at a 20 % budget. We derive both from the session's budget: with ``C`` the capacity
(``ρ·L`` tokens per layer and KV head), ``M = floor(recent_share · C)`` and ``N = C - M`` (floor like
the code's ``int()``, the remainder to the important part so that ``N + M = C``). The default
``recent_share = 0.5`` gives the paper's α1 = α2 = ρ/2. Compression is skipped when ``L <= N + M``.

Prompts without visual tokens: the text prior then keeps every token, which is also what the
official code does (its ``image_position.shape[0] > 0`` guard skips compression). That is the default
(``text_only="keep"``); ``text_only="h2o"`` instead applies LOOK-M *without* the text prior, as the
code's ``pivot_merge`` / ``avg_merge`` / ``weighted_merge`` modes do: the top-N accumulated-attention
tokens with the first four forced in (``select_hh_scores[:, 0:4] = inf``) plus the last M, followed by
the chosen merge, so the budget is honoured.

GQA: scores are averaged over each KV head's query group; selection and merging are per KV head.

``merge="none"`` gives eviction only (TP alone): the kept keys/values are the original ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..inputs.modality import TEXT
from ..statistics.stats import StatsRequest
from .base import LayerContext, LayerPlan, Method, check_choice, check_fraction, reduce_to_kv_heads
from .merge import MERGE_MODES, check_merge, merge_layer

if TYPE_CHECKING:  # meda imports this module
    from .meda import MEDA

TEXT_ONLY_MODES = ("keep", "h2o")
SINKS = 4  # first tokens forced into the non-text-prior selection (official code, pivot/avg/weighted merge modes)


def split_budget(budget: int, recent_share: float) -> tuple[int, int]:
    """``(M recent, N important)`` with ``M = floor(recent_share * budget)`` and ``N = budget - M``."""
    recent = int(recent_share * budget + 1e-9)  # guard 0.75 * 4 = 2.9999...
    recent = max(0, min(budget, recent))
    return recent, budget - recent


def text_prior_keep(scores: torch.Tensor, text: torch.Tensor, important: int, recent: int) -> list[torch.Tensor]:
    """LOOK-M/MEDA selection (Eq. 5-8) per KV head: ``T ∪ Top_N(A_s[:L-M]) ∪ last M``, text first.

    ``scores [H_kv, L]``, ``text`` bool ``[L]``. Visual tokens before the recent window fill the
    ``N - #text`` slots the text left, best score first (ties: the earlier position).
    """
    num_heads, length = scores.shape
    recent = min(recent, length)
    head = length - recent
    text = text.to(scores.device)
    base = text.clone()
    base[head:] = True
    candidates = (~text[:head]).nonzero().flatten()  # visual positions outside the window
    slots = max(0, important - int(text[:head].sum()))
    slots = min(slots, candidates.numel())
    kept = []
    for h in range(num_heads):
        mask = base.clone()
        if slots:
            order = torch.sort(scores[h, candidates], descending=True, stable=True).indices[:slots]
            mask[candidates[order]] = True
        kept.append(mask.nonzero().flatten())
    return kept


def h2o_keep(scores: torch.Tensor, important: int, recent: int, sinks: int = SINKS) -> list[torch.Tensor]:
    """LOOK-M without the text prior: the first ``sinks`` tokens count as top scorers, then ``Top_N`` + last M."""
    num_heads, length = scores.shape
    recent = min(recent, length)
    head = length - recent
    kept = []
    for h in range(num_heads):
        s = scores[h, :head].clone()
        s[: min(sinks, head)] = float("inf")
        order = torch.sort(s, descending=True, stable=True).indices[: max(0, min(important, head))]
        mask = torch.zeros(length, dtype=torch.bool, device=scores.device)
        mask[order] = True
        mask[head:] = True
        kept.append(mask.nonzero().flatten())
    return kept


def text_prior_plan(
    ctx: LayerContext,
    budget: int,
    recent_share: float,
    merge: str,
    similarity_filter: bool = False,
    text_only: str = "keep",
    gqa_reduce: str = "mean",
) -> LayerPlan:
    """Select (text prior) and merge one layer with ``budget`` nominal tokens per KV head.

    Shared by LOOK-M (``budget`` = the capacity) and MEDA (``budget`` = its layer budget ``S_l``).
    ``info`` records ``recent`` (M), ``important`` (N), ``nominal`` (N + M), ``retained`` (actual
    tokens per KV head), ``text``/``visual`` counts, ``visual_kept`` per head, ``merged`` per head,
    ``dropped`` (filtered out without merging), ``skipped`` (why nothing was evicted, if so) and
    ``over_budget`` (why the layer keeps more than N + M: the text prior keeps every text token).
    """
    length = ctx.length
    codes = ctx.modality.modality[:length]
    text = codes == TEXT
    n_text = int(text.sum())
    recent, important = split_budget(budget, recent_share)
    info: dict[str, Any] = {
        "recent": recent,
        "important": important,
        "nominal": recent + important,
        "text": n_text,
        "visual": length - n_text,
    }
    no_visual = n_text == length
    if length <= recent + important or (no_visual and text_only == "keep"):
        info["skipped"] = "L <= N + M" if length <= recent + important else "no visual tokens: the text prior keeps all"
        info["retained"] = length
        plan = LayerPlan.keep_all(ctx.num_kv_heads, length)
        plan.info = info
        return plan
    column_sums = ctx.stats.column_sums
    assert column_sums is not None, "LOOK-M's stats_request asks for column_sums"
    scores = reduce_to_kv_heads(column_sums[:, :length].float(), ctx.num_kv_heads, gqa_reduce)
    if no_visual:
        kept = h2o_keep(scores, important, recent)
        info["fallback"] = "no visual tokens: top-N + recent without the text prior"
    else:
        kept = text_prior_keep(scores, text, important, recent)
    kept = [k.cpu() for k in kept]
    info["retained"] = int(kept[0].numel())
    if info["retained"] > recent + important and not no_visual:
        info["over_budget"] = (
            f"text prior: all {n_text} text tokens stay (Eq. 5-8), {info['retained'] - recent - important} "
            f"over the nominal N + M = {recent + important}"
        )
    info["visual_kept"] = [int((~text[k]).sum()) for k in kept]
    plan = LayerPlan(kept=kept, info=info)
    if merge != "none" and info["retained"] < length:
        if ctx.keys is None or ctx.values is None:
            raise ValueError("merging needs the layer's keys and values in the LayerContext")
        keys, values = ctx.keys[:, :length], ctx.values[:, :length]
        plan.keys, plan.values, plan.merges, dropped = merge_layer(keys, values, kept, merge, similarity_filter)
        info["merged"] = [int(r.source.numel()) for r in plan.merges]
        info["dropped"] = dropped
    return plan


def check_text_prior_params(method: LookM | MEDA) -> None:
    check_fraction(method, "recent_share")
    check_choice(method, "merge", MERGE_MODES)
    check_merge(method.merge, method.similarity_filter)
    check_choice(method, "text_only", TEXT_ONLY_MODES)
    check_choice(method, "gqa_reduce", ("mean", "max"))


@dataclass
class LookM(Method):
    """LOOK-M, text prior + merge. ``recent_share`` = α1 / (α1 + α2) of the budget.

    ``merge``: ``"pivotal"`` (default, Eq. 11) | ``"average"`` (Eq. 10) | ``"weighted"`` (Eq. 12) |
    ``"none"``. ``similarity_filter``: the code's below-mean-similarity filter (average/weighted).
    ``text_only``: ``"keep"`` (default) | ``"h2o"`` for prompts without visual tokens.
    """

    recent_share: float = 0.5
    merge: str = "pivotal"
    similarity_filter: bool = False
    text_only: str = "keep"
    gqa_reduce: str = "mean"

    name = "lookm"
    reference = (
        "Wan et al. 2024, LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal "
        "Long-Context Inference (arXiv 2406.18139)"
    )

    def __post_init__(self) -> None:
        check_text_prior_params(self)

    def stats_request(self) -> StatsRequest:
        return StatsRequest(column_sums=True)

    def plan_layer(self, ctx: LayerContext) -> LayerPlan:
        return text_prior_plan(
            ctx, ctx.capacity, self.recent_share, self.merge, self.similarity_filter, self.text_only, self.gqa_reduce
        )
