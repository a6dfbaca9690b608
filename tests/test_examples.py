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


def test_text_prior_example_separates_lookm_from_query_aware_eviction(store):
    """The LOOK-M example's claim, run through Compare: at its budget LOOK-M keeps the text fact and
    answers; SnapKV and H2O, which rank tokens by attention alone, lose it."""
    item = next(e for e in EXAMPLES if e["method"] == "lookm")
    res = H.compare(
        store,
        H.AppState(),
        _message(item),
        ["lookm", "snapkv", "h2o"],
        item["budget"],
        0,
        "",
        True,
        16,
        8,
        False,
        Limits(),
    )
    answers = {r["method"]: r["answer"] for r in res.rows}
    assert answers["full"] == answers["lookm"] == item["answer"]
    assert answers["snapkv"] != item["answer"] and answers["h2o"] != item["answer"]
