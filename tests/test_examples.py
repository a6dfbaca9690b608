"""The app's examples, run through the app's own handlers (no Gradio) on the bundled model.

Every example carries the answer its scene implies (``examples.json`` ``answer``, checked against the
scenes in ``tests/test_tiny_tasks.py``); Full must give exactly that answer, and the method and budget an
example suggests must show what its ``shows`` line claims.
"""

from __future__ import annotations

import json

import pytest

from mmkv.bundled import BUNDLED_MODEL, EXAMPLES_DIR
from mmkv.ui import handlers as H
from mmkv.ui.config import Limits
from mmkv.ui.models import ModelStore

EXAMPLES = json.loads((EXAMPLES_DIR / "examples.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def store():
    return ModelStore(str(BUNDLED_MODEL))


def _message(item: dict) -> dict:
    return {"text": item["text"], "files": [str(EXAMPLES_DIR / f) for f in item["files"]]}


def _answer(store: ModelStore, item: dict, method: str, budget: float, params: dict | None = None) -> str:
    updates = list(
        H.chat_turn(
            store, H.AppState(), _message(item), method, budget, 0, True, 24, 8, json.dumps(params or {}), Limits()
        )
    )
    assert updates[-1].done
    return updates[-1].state.display[-1]["content"]


@pytest.mark.parametrize("item", EXAMPLES, ids=[e["text"].splitlines()[-1] for e in EXAMPLES])
def test_full_answers_every_example(store, item):
    assert _answer(store, item, "full", 1.0) == item["answer"]


@pytest.mark.parametrize("item", EXAMPLES, ids=[e["method"] for e in EXAMPLES])
def test_suggested_method_answers_at_its_budget(store, item):
    assert _answer(store, item, item["method"], item["budget"], item.get("params")) == item["answer"]


def _compare(store: ModelStore, item: dict, methods: list[str]) -> dict[str, str]:
    res = H.compare(store, H.AppState(), _message(item), methods, item["budget"], 0, "", True, 16, 8, False, Limits())
    return {r["method"]: r["answer"] for r in res.rows}


# What each example's ``shows`` line claims, run through Compare at the example's budget: the suggested method
# (and Full) answer, the methods the line names lose the answer.
CLAIMS = {
    # text prior: LOOK-M keeps the sentence; H2O's accumulated attention and PyramidKV's thin upper layers lose it
    "lookm": ["h2o", "pyramidkv"],
    # per-head budgets: MadaKV keeps image 7 where one share per head (SnapKV, H2O) answers image 8
    "madakv": ["snapkv", "h2o"],
    # per-layer budgets: MEDA keeps the ball's motion where the same share in every layer loses it
    "meda": ["snapkv", "h2o"],
}


@pytest.mark.parametrize("method", sorted(CLAIMS))
def test_example_claim_separates_its_method_from_the_named_ones(store, method):
    item = next(e for e in EXAMPLES if e["method"] == method and "followup" not in e)
    losers = CLAIMS[method]
    for name in losers:
        assert name in item["shows"].lower(), (name, item["shows"])
    answers = _compare(store, item, [method, *losers])
    assert answers["full"] == answers[method] == item["answer"]
    assert all(answers[m] != item["answer"] for m in losers), answers
