"""HybridKV: static/dynamic heads, top-down budgets, text-prior pruning + chunk-wise retrieval.

HybridKV, ACL 2026 (arXiv 2604.05887). No public code and no paper body were available; the
design comes from summaries (docs/methods.md, HybridKV) and every gap is filled by a reading that is named
below and in docs/methods.md, HybridKV.

Stage 1 — classification, per (layer, KV head). ``a`` = the question's attention (the text after the
last visual token; fallback the last 32 tokens) summed over the question queries, averaged over the
GQA group. ``k_theta`` = fewest keys holding ``theta`` of ``a``'s mass (``theta = 0.9``);
``sparsity = 1 - k_theta / L``. A head is *static* when ``sparsity >= tau``; without ``tau``, the
``round(static_fraction * N_L * H_kv)`` sparsest heads of the whole model are static (ties: lower
layer, then lower head). The rest are *dynamic*.

Stage 2 — budget, top-down. ``B = C * H_kv * N_L`` tokens. ``B_dyn = B - floor(r * B)`` goes to the
dynamic heads (``r`` defaults to the static share of heads, i.e. the same average per head for both
types); every dynamic head gets the same ``b_dyn = min(L, B_dyn // n_dyn)``, laid out as ``sinks`` +
``recent`` + ``top_chunks`` whole chunks of ``chunk_size`` (chunk-aligned; the recent window yields to
one chunk when the budget is tight). The static heads share what the dynamic heads do not use, in
proportion to their sparsity (water-filled under the cap ``L``, rounded down, remainders to the
largest fractions).

Stage 3 — compression. Static heads: text-prior pruning — the last ``recent`` tokens, then text
tokens before visual ones, each by question attention (all text fits in any budget that allows it).
Dynamic heads: :class:`mmkv.cache.hybrid.HybridLayer`, built by the plan's typed decode policy
:class:`~mmkv.methods.decode.ChunkRetrieval` — full prompt KV in a host store, chunk summaries
on the device, the ``top_chunks`` chunks best for the current query loaded at every decode step.
Before the first step the buffer holds the chunks with the most question attention (so the trace's
``kept`` shows the tokens resident on the device after compression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs.modality import TEXT
from ..statistics.stats import StatsRequest
from .base import (
    LayerContext,
    LayerPlan,
    Method,
    check_choice,
    check_fraction,
    check_positive,
    reduce_to_kv_heads,
    water_fill,
)
from .compose import coverage_count
from .decode import ChunkRetrieval


def dynamic_layout(length: int, budget: int, sinks: int, recent: int, chunk_size: int, top_chunks: int | None) -> dict:
    """Sinks, recent window and number of chunks of a dynamic head with ``budget`` tokens.

    ``budget >= L``: everything (all chunks). Otherwise ``s = min(sinks, b)``; the recent window takes
    ``min(recent, b - s - c)`` when one chunk fits next to the sinks, else ``min(recent, b - s)``; the
    chunks take ``(b - s - r) // c`` (at most the number of chunks). An explicit ``top_chunks``
    overrides that count (and may overspend). ``tokens`` = prompt tokens on the device.
    """
    n_chunks_of = lambda s, r: -(-(length - s - r) // chunk_size) if length > s + r else 0  # noqa: E731
    if budget >= length:
        s = min(sinks, length)
        r = min(recent, length - s)
        n = n_chunks_of(s, r)
        k = n
    else:
        b = max(0, budget)
        s = min(sinks, b)
        r = min(recent, b - s - chunk_size) if b - s >= chunk_size else min(recent, b - s)
        r = max(0, r)
        n = n_chunks_of(s, r)
        k = min(n, (b - s - r) // chunk_size)
    if top_chunks is not None:
        k = min(n, top_chunks)
    middle = max(0, length - s - r)
    tokens = s + r + min(k * chunk_size, middle)
    return {"sinks": s, "recent": r, "num_chunks": n, "top_chunks": k, "tokens": tokens}


@dataclass
class HybridKV(Method):
    """HybridKV: ``theta`` coverage, ``tau`` or ``static_fraction`` split, type share ``r``, chunk retrieval.

    ``chunk_size`` tokens per chunk; ``top_chunks`` retrieved per step (``None``: as many as the dynamic
    budget allows); ``scoring`` "mean" (mean key) or "bounds" (Quest min/max); ``sinks``/``recent``
    prompt tokens always resident (dynamic heads; static heads keep ``recent`` too); ``offload`` keeps
    the dynamic heads' full KV in host memory (False: it stays on the device and counts as device bytes).
    """

    theta: float = 0.9
    tau: float | None = None
    static_fraction: float = 0.7
    r: float | None = None
    chunk_size: int = 16
    top_chunks: int | None = None
    scoring: str = "mean"
    sinks: int = 4
    recent: int = 32
    offload: bool = True

    name = "hybridkv"
    is_global = True
    reference = (
        "HybridKV: hybrid static/dynamic-head KV cache compression for multimodal LLMs "
        "(ACL 2026, arXiv 2604.05887; no public code)"
    )

    def __post_init__(self) -> None:
        check_fraction(self, "theta")
        check_fraction(self, "static_fraction")
        if self.theta <= 0:
            raise ValueError(f"{self.name}: theta must be positive")
        if self.tau is not None:
            check_fraction(self, "tau")
        if self.r is not None:
            check_fraction(self, "r")
        check_positive(self, "chunk_size")
        if self.top_chunks is not None and (
            isinstance(self.top_chunks, bool) or not isinstance(self.top_chunks, int) or self.top_chunks < 0
        ):
            raise ValueError(f"{self.name}: top_chunks must be None or a non-negative integer, got {self.top_chunks!r}")
        for name in ("sinks", "recent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.name}: {name} must be a non-negative integer, got {value!r}")
        check_choice(self, "scoring", ("mean", "bounds"))
        if not isinstance(self.offload, bool):
            raise ValueError(f"{self.name}: offload must be True or False, got {self.offload!r}")

    def stats_request(self) -> StatsRequest:
        return StatsRequest(question_scores=True)

    # ---- stage 1 -------------------------------------------------------------------------------
    def question_attention(self, ctx: LayerContext) -> torch.Tensor:
        """Per KV head, the question's attention per key ``[H_kv, L]`` (GQA mean)."""
        question_scores = ctx.stats.question_scores
        assert question_scores is not None, "HybridKV's stats_request asks for question_scores"
        return reduce_to_kv_heads(question_scores.float(), ctx.num_kv_heads, "mean")

    def sparsity(self, ctx: LayerContext) -> tuple[list[int], list[float]]:
        """Per KV head: ``k_theta`` and ``1 - k_theta / L``."""
        a = self.question_attention(ctx)
        k = [coverage_count(a[h], self.theta) for h in range(ctx.num_kv_heads)]
        return k, [1.0 - kh / ctx.length for kh in k]

    def classify(self, sparsities: list[list[float]]) -> list[list[str]]:
        flat = [(s, layer, h) for layer, row in enumerate(sparsities) for h, s in enumerate(row)]
        if self.tau is not None:
            static = {(layer, h) for s, layer, h in flat if s >= self.tau}
        else:
            n_static = int(math.floor(self.static_fraction * len(flat) + 0.5))
            order = sorted(flat, key=lambda t: (-t[0], t[1], t[2]))
            static = {(layer, h) for _, layer, h in order[:n_static]}
        return [
            ["static" if (layer, h) in static else "dynamic" for h in range(len(row))]
            for layer, row in enumerate(sparsities)
        ]

    # ---- stage 2 + 3 ---------------------------------------------------------------------------
    def plan(self, contexts: list[LayerContext]) -> list[LayerPlan]:
        if not contexts:
            return []
        first = contexts[0]
        length, capacity, h_kv = first.length, first.capacity, first.num_kv_heads
        n_layers = len(contexts)
        k_theta, sparsity = zip(*(self.sparsity(ctx) for ctx in contexts))
        types = self.classify([list(s) for s in sparsity])
        static_ids = [(li, h) for li in range(n_layers) for h in range(h_kv) if types[li][h] == "static"]
        n_static = len(static_ids)
        n_dyn = n_layers * h_kv - n_static
        total = capacity * h_kv * n_layers
        share = self.r if self.r is not None else n_static / (n_layers * h_kv)
        if n_dyn == 0:
            b_static_pool = total
        elif n_static == 0:
            b_static_pool = 0
        else:
            b_static_pool = int(math.floor(share * total))
        layout: dict | None = None  # set when some head is dynamic
        if n_dyn:
            b_dyn = min(length, (total - b_static_pool) // n_dyn)
            layout = dynamic_layout(length, b_dyn, self.sinks, self.recent, self.chunk_size, self.top_chunks)
            static_pool = max(0, total - n_dyn * layout["tokens"])  # what the dynamic heads leave
        else:
            static_pool = total
        weights = [sparsity[li][h] for li, h in static_ids]
        budgets = water_fill(static_pool, weights, [length] * n_static)
        static_budget = {key: b for key, b in zip(static_ids, budgets)}
        plans = []
        for layer, ctx in enumerate(contexts):
            a = self.question_attention(ctx)
            per_head_budget, kept, initial = [], [], []
            for h in range(h_kv):
                if types[layer][h] == "static":
                    b = static_budget[(layer, h)]
                    kept.append(self.text_prior(ctx, a[h], b))
                    per_head_budget.append(b)
                else:
                    assert layout is not None  # a dynamic head: n_dyn > 0
                    chunks = self.initial_chunks(a[h], length, layout)
                    initial.append(chunks)
                    kept.append(self.dynamic_positions(length, layout, chunks))
                    per_head_budget.append(layout["tokens"])
            info = {
                "head_types": types[layer],
                "sparsity": list(sparsity[layer]),
                "k_theta": list(k_theta[layer]),
                "head_budgets": per_head_budget,
                "theta": self.theta,
            }
            decode = None
            if "dynamic" in types[layer]:
                assert layout is not None  # a dynamic head: n_dyn > 0
                info.update(
                    {
                        "chunk_size": self.chunk_size,
                        "num_chunks": layout["num_chunks"],
                        "top_chunks": layout["top_chunks"],
                        "sinks": layout["sinks"],
                        "recent": layout["recent"],
                        "initial_chunks": initial,
                    }
                )
                decode = ChunkRetrieval(
                    head_types=types[layer],
                    sinks=layout["sinks"],
                    recent=layout["recent"],
                    chunk_size=self.chunk_size,
                    top_chunks=layout["top_chunks"],
                    scoring=self.scoring,
                    offload=self.offload,
                    initial_chunks=initial,
                )
            plans.append(LayerPlan(kept=kept, decode=decode, info=info))
        return plans

    def text_prior(self, ctx: LayerContext, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Static head: the last ``recent`` tokens + the best of the rest, text before visual, by ``scores``."""
        length = ctx.length
        budget = min(budget, length)
        window = min(self.recent, budget)
        head = length - window
        codes = ctx.modality.modality.to(scores.device)[:head]
        order = torch.sort(scores[:head], descending=True, stable=True).indices
        order = order[torch.sort((codes[order] != TEXT).to(torch.uint8), stable=True).indices]
        chosen = torch.cat([order[: budget - window], torch.arange(head, length, device=scores.device)])
        return torch.sort(chosen).values

    def initial_chunks(self, scores: torch.Tensor, length: int, layout: dict) -> list[int]:
        """The ``top_chunks`` chunks with the most question attention (ties: lower id), ascending."""
        from ..cache.hybrid import chunk_grid  # lazy: import cycle

        k = layout["top_chunks"]
        if k == 0:
            return []
        starts, lengths = chunk_grid(length, layout["sinks"], layout["recent"], self.chunk_size)
        mass = torch.stack([scores[s : s + n].sum() for s, n in zip(starts.tolist(), lengths.tolist())])
        order = torch.sort(mass, descending=True, stable=True).indices[:k]
        return sorted(order.tolist())

    def dynamic_positions(self, length: int, layout: dict, chunks: list[int]) -> torch.Tensor:
        """Prompt positions resident for a dynamic head: sinks + recent + the given chunks."""
        s, r, c = layout["sinks"], layout["recent"], self.chunk_size
        parts = [torch.arange(s), torch.arange(length - r, length)]
        stop = length - r
        for i in chunks:
            start = s + i * c
            parts.append(torch.arange(start, min(start + c, stop)))
        return torch.sort(torch.cat(parts)).values
