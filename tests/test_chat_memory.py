"""Chat that remembers (the app's side of ``mmkv.Conversation``), through the Gradio-free handlers on the
bundled model: a kept cache answers as a re-read does when nothing is dropped, prefills only the new turn,
shows what a first question costs the second (SCBench's shared-context finding, with images), and frees
its memory when the conversation is cleared.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import pytest

from mmkv.bundled import BUNDLED_MODEL, EXAMPLES_DIR
from mmkv.cache.layers import AppendBuffer
from mmkv.tiny.tasks import expected_answer
from mmkv.ui import handlers as H
from mmkv.ui.config import Limits
from mmkv.ui.models import ModelStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_examples  # noqa: E402

SCENE, _ = make_examples.task_scenes()
#: the app's two-question example (examples.json: "followup"); these tests hold the app to what it shows
EXAMPLE = next(e for e in json.loads((EXAMPLES_DIR / "examples.json").read_text()) if e.get("followup"))
FILES = [str(EXAMPLES_DIR / f) for f in EXAMPLE["files"]]
FIRST, SECOND = EXAMPLE["text"], EXAMPLE["followup"]


@pytest.fixture(scope="module")
def store():
    return ModelStore(str(BUNDLED_MODEL))


def test_the_two_questions_ask_about_different_images():
    assert FIRST in make_examples.needle_questions(SCENE) and SECOND in make_examples.needle_questions(SCENE)
    first, second = (expected_answer(SCENE, "needle", q) for q in (FIRST, SECOND))
    assert first and second and first[-3:] != second[-3:], (first, second)  # "image 3." vs "image 7."


def _turns(store, state, method, budget, keep=True, questions=(FIRST, SECOND), limits=None):
    out = []
    for i, question in enumerate(questions):
        message = {"text": question, "files": FILES if i == 0 else []}
        updates = list(H.chat_turn(store, state, message, method, budget, 0, True, 16, 8, "", limits, keep_cache=keep))
        assert updates[-1].done, updates[-1].status
        updates[-1].answer = state.chat[-1]["content"][0]["text"]  # this turn's answer (the state moves on)
        out.append(updates[-1])
    return out


def _answer(update) -> str:
    return update.answer


def test_kept_cache_answers_like_a_reread_and_prefills_only_the_new_turn(store):
    kept, reread = H.AppState(), H.AppState()
    kept_turns = _turns(store, kept, "full", 1.0, keep=True)
    reread_turns = _turns(store, reread, "full", 1.0, keep=False)
    expected = [expected_answer(SCENE, "needle", q) for q in (FIRST, SECOND)]
    assert [_answer(u) for u in kept_turns] == [_answer(u) for u in reread_turns] == expected
    second = kept.runs[kept.last]
    assert second.label.endswith("turn 2 · kept cache"), second.label
    assert "kept for the next turn" in kept_turns[1].summary and "saved about" in kept_turns[1].summary
    # the second turn read only its own tokens: the question and the template around it, not the 8 images
    read = int(kept_turns[1].summary.split("**This turn** read ")[1].split(" of ")[0])
    assert 0 < read < 40 and read < second.trace.prompt_length / 5
    assert "re-reads the whole conversation" in reread_turns[1].summary and reread.conversation is None
    # Inspect sees the second turn's cache: the whole conversation's images, the first-turn compression
    assert (
        len(second.images) == len(FILES)
        and second.trace.prompt_length > kept.runs[list(kept.runs)[0]].trace.prompt_length
    )


def test_a_first_question_costs_the_second_with_a_kept_cache_and_not_when_reread(store):
    """SnapKV scores with the first question: at 0.2 it keeps the purple circle's image and drops the blue
    square's, so the follow-up fails with a kept cache and succeeds when the conversation is re-read (turn 2
    compressed with its own question). AdaKV, compared in the example, loses the second image with a kept cache too."""
    expected = [expected_answer(SCENE, "needle", q) for q in (FIRST, SECOND)]
    assert expected == [EXAMPLE["answer"], EXAMPLE["followup_answer"]]
    method, budget = EXAMPLE["method"], EXAMPLE["budget"]
    snap = [_answer(u) for u in _turns(store, H.AppState(), method, budget, keep=True)]
    assert snap[0] == expected[0] and snap[1] != expected[1], snap
    assert [_answer(u) for u in _turns(store, H.AppState(), method, budget, keep=False)] == expected
    for other in EXAMPLE["compare"]:
        kept = [_answer(u) for u in _turns(store, H.AppState(), other, budget, keep=True)]
        assert kept[0] == expected[0] and kept[1] != expected[1], (other, kept)


def test_compare_runs_a_two_question_conversation_per_method(store):
    res = H.compare(
        store,
        H.AppState(),
        {"text": FIRST, "files": FILES},
        [EXAMPLE["method"], *EXAMPLE["compare"]],
        EXAMPLE["budget"],
        max_new_tokens=16,
        followup=SECOND,
    )
    assert "two-question conversations" in res.status
    answers = {r["method"]: r["answer"] for r in res.rows}
    expected = [expected_answer(SCENE, "needle", q) for q in (FIRST, SECOND)]
    assert answers["full"] == " ⟶ ".join(expected)
    for method in (EXAMPLE["method"], *EXAMPLE["compare"]):  # turn 1 right, turn 2 lost with the kept cache
        assert answers[method].startswith(expected[0]) and not answers[method].endswith(expected[1]), answers
    assert all(r.get("kl") is None for r in res.rows)
    assert all(label.endswith("turn 2") for label in res.state.runs)


def test_changed_settings_reread_the_conversation(store):
    state = H.AppState()
    _turns(store, state, "snapkv", 0.5, questions=(FIRST,))
    kept = state.conversation
    [update] = _turns(store, state, "h2o", 0.5, questions=(SECOND,))
    assert state.conversation is not kept and state.conversation_key[1] == "h2o"
    assert "saved about" not in update.summary and not state.runs[state.last].label.endswith("kept cache")
    assert len(state.chat) == 4  # the conversation itself goes on


def test_a_conversation_over_the_turn_limit_drops_the_oldest_turn_and_says_so(store):
    state = H.AppState()
    updates = _turns(store, state, "full", 1.0, questions=(FIRST, SECOND), limits=Limits(max_turns=1))
    assert "oldest 1 turn(s) were dropped" in updates[1].status
    assert [m["role"] for m in state.chat] == ["user", "assistant"] and state.conversation is not None


def test_clearing_the_chat_frees_the_kept_cache(store):
    state = H.AppState()
    _turns(store, state, "snapkv", 0.5)
    cache = state.conversation.cache
    held = state.cache_bytes
    layer = cache.layers[0]
    buffers = [b.store for b in vars(layer).values() if isinstance(b, AppendBuffer)]  # the storage, not views
    probes = [weakref.ref(x) for x in (layer, *buffers)]
    del buffers
    del cache, layer
    assert held > 0 and len(probes) > 1
    state.clear_chat()
    gc.collect()
    assert state.cache_bytes == 0 and state.conversation is None
    assert all(p() is None for p in probes), "a kept cache tensor is still referenced after Clear"
