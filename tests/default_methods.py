"""The one list of method configurations the matrix tests run (like kvpress's ``tests/default_presses.py``).

- :data:`DEFAULT_METHODS`: every method of the registry with its default hyper-parameters, on every
  tiny family. It is built from :data:`mmkv.methods.METHODS`, so a new method file is in every matrix
  test as soon as it is registered; :data:`KINDS` must then say what the method promises (the tests
  check that), or ``test_every_registered_method_has_a_kind`` fails and names it.
- :data:`VARIANTS`: the hyper-parameter settings that take another code path (the other merges, the
  code-faithful readings, decode-time policies, the other chunk score), on one family each, to keep
  the matrix small.
- :data:`ALL_METHODS` = both. Tests take the slice they need (``held``, ``replayable``,
  ``on(family)``) and parametrize with :func:`params`, which gives every case a readable id
  (``lookm``, ``lookm-merge=weighted``).

What a configuration promises (``budget``) is what the tests assert about its kept tokens:

- ``full``: keeps everything
- ``uniform``: every (layer, KV head) keeps the capacity ``C``
- ``layers``: one budget per layer, non-increasing with depth (PyramidKV), summing to ``N_L·C``
- ``heads``: per-head budgets whose layer total is ``H_kv·C`` (AdaKV)
- ``text``: the text prior: at least ``ρ × Full``, above it only where a layer says why (LOOK-M, MEDA)
- ``slots``: HybridKV: the head slots hold ``ρ × Full``; resident tokens may be fewer
- ``total``: the model's total is ``ρ × Full`` (MadaKV's reading B), per head and layer it varies
- ``free``: not held to the budget by design (MadaKV's readings A and "off", MEDA without redistribution)
- ``evicting``: H2O evicting while decoding: ``C`` per head, in a layer that also holds a slot for the
  incoming token (its bytes count ``C + 1``), so the budget test leaves it to tests/test_replay.py
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mmkv.methods import METHODS
from mmkv.testing.tiny import FAMILIES

# What each registered method promises with its defaults (see the table above), and whether its plan is
# only a set of kept positions (no merge, no decode-time policy): such a plan, replayed as masks on a
# full cache, must give the same logits (tests/oracle.py).
KINDS: dict[str, dict[str, Any]] = {
    "full": {"budget": "full", "replayable": True},
    "streamingllm": {"budget": "uniform", "replayable": True},
    "h2o": {"budget": "uniform", "replayable": True},
    "snapkv": {"budget": "uniform", "replayable": True},
    "pyramidkv": {"budget": "layers", "replayable": True},
    "adakv": {"budget": "heads", "replayable": True},
    "lookm": {"budget": "text", "replayable": False},
    "meda": {"budget": "text", "replayable": False},
    "madakv": {"budget": "total", "replayable": True},
    "hybridkv": {"budget": "slots", "replayable": False, "decode_policy": True},
}

HELD = ("full", "uniform", "layers", "heads", "text", "slots", "total")  # every kind but "free"


@dataclass(frozen=True)
class MethodConfig:
    """One method with one set of hyper-parameters, and what the tests may expect of it."""

    method: str
    params: dict = field(default_factory=dict)
    budget: str = "uniform"
    families: tuple[str, ...] = tuple(FAMILIES)
    replayable: bool = False  # the plan is kept positions only: replayable as masks on a full cache
    decode_policy: bool = False  # the cache layer evicts or retrieves while decoding (own storage)

    @property
    def id(self) -> str:
        if not self.params:
            return self.method
        return "-".join([self.method] + [f"{k}={_short(v)}" for k, v in sorted(self.params.items())])

    @property
    def held(self) -> bool:
        return self.budget in HELD

    def kwargs(self) -> dict:
        """Keyword arguments for ``mmkv.generate`` / ``make_method``: the method's hyper-parameters."""
        return dict(self.params)


def _short(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ":".join(str(v) for v in value)
    return str(value)


def _default(name: str) -> MethodConfig:
    kind = KINDS.get(name, {"budget": "unknown"})
    return MethodConfig(
        name, {}, kind["budget"], tuple(FAMILIES), kind.get("replayable", False), kind.get("decode_policy", False)
    )


DEFAULT_METHODS: list[MethodConfig] = [_default(name) for name in sorted(METHODS)]

_ONE = ("qwen2_5_vl",)  # the family variants run on: images, M-RoPE, GQA

VARIANTS: list[MethodConfig] = [
    MethodConfig("h2o", {"decode_evict": True}, "evicting", _ONE, decode_policy=True),
    MethodConfig("snapkv", {"gqa_reduce": "max", "pooling": "max"}, "uniform", _ONE, replayable=True),
    MethodConfig("lookm", {"merge": "average"}, "text", _ONE),
    MethodConfig("lookm", {"merge": "weighted", "similarity_filter": True}, "text", _ONE),
    MethodConfig("lookm", {"merge": "none"}, "text", _ONE),
    MethodConfig("lookm", {"text_only": "h2o"}, "text", _ONE),
    MethodConfig("meda", {"entropy": "full", "split": (1, 1)}, "text", _ONE),
    MethodConfig("meda", {"head_average": "entropy", "cross_mask": "full"}, "text", _ONE),
    MethodConfig("meda", {"redistribute": False}, "free", _ONE),
    MethodConfig("madakv", {"hcc": "A"}, "free", _ONE, replayable=True),
    MethodConfig("madakv", {"hcc": "off"}, "free", _ONE, replayable=True),
    MethodConfig("hybridkv", {"scoring": "bounds"}, "slots", _ONE, decode_policy=True),
    MethodConfig("hybridkv", {"offload": False, "chunk_size": 8}, "slots", _ONE, decode_policy=True),
]

ALL_METHODS: list[MethodConfig] = DEFAULT_METHODS + VARIANTS


def on(family: str, cases: Iterable[MethodConfig] = ALL_METHODS) -> list[MethodConfig]:
    """The cases that run on ``family``."""
    return [case for case in cases if family in case.families]


def params(cases: Iterable[MethodConfig]) -> list:
    """``pytest.param`` per case, with the case's id."""
    return [pytest.param(case, id=case.id) for case in cases]


def family_params(cases: Iterable[MethodConfig]) -> list:
    """``pytest.param(family, case)`` for every family each case runs on (ids ``family-case``)."""
    return [pytest.param(family, case, id=f"{family}-{case.id}") for case in cases for family in case.families]
