"""The multi-turn evaluation (``mmkv/experiments/multiturn.py``; docs/eval.md, "Multi-turn").

- the task generator: turn 2's needle is in another image than turn 1's, both answers recomputed here from
  the scene's objects, seeds in their own namespace (disjoint from training's and the single-question sets');
- Full answers turn 2 identically with a kept cache and with a re-read;
- the summary arithmetic on hand-made records; the CLI (``mmkv eval --followup``) writes the table.
"""

from __future__ import annotations

import functools
import json
import math
import random

import pytest
import torch

import mmkv
from mmkv.cli import main as cli_main
from mmkv.experiments import multiturn
from mmkv.experiments.multiturn import (
    FullMismatch,
    check_full,
    followup_set,
    markdown,
    run_followup_eval,
    summarize,
)
from mmkv.tiny.tasks import heldout_set


@functools.cache
def bundled():
    return mmkv.load("bundled")


@pytest.fixture(autouse=True)
def one_thread():
    """The bundled model (1.3M parameters) runs fastest on one CPU thread; the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _holders(scene, colour, shape):
    """(image, object) for every object of that colour and shape — written here, not taken from the module."""
    return [(k, o) for k, objs in enumerate(scene.images) for o in objs if o.colour == colour and o.shape == shape]


def test_generator_two_unique_needles_in_different_images_far_apart():
    samples = followup_set(40)
    assert len({s.seed for s in samples}) == 40
    for s in samples:
        assert s.scene.k == 8
        first, second = _holders(s.scene, *s.first), _holders(s.scene, *s.second)
        assert len(first) == 1 and len(second) == 1  # each pair occurs exactly once
        (k1, _), (k2, _) = first[0], second[0]
        assert (k1, k2) == (s.first_image, s.second_image) and k1 != k2
        assert s.distance == abs(k2 - k1) >= 1
        assert s.question1 == f"Which image has the {s.first[0]} {s.first[1]}?"
        assert s.answer1 == f"The {s.first[0]} {s.first[1]} is in image {k1 + 1}."
        assert s.answer2 == f"The {s.second[0]} {s.second[1]} is in image {k2 + 1}."
        assert s.check1(s.answer1) and s.check2(s.answer2) and not s.check2(s.answer1)
        # the needles are the earliest and the latest image holding a unique pair
        unique = [
            k for k, objs in enumerate(s.scene.images) for o in objs if len(_holders(s.scene, o.colour, o.shape)) == 1
        ]
        assert {k1, k2} == {min(unique), max(unique)}
        chat = s.episode().chat()  # the training format: two user turns, answer 1 between them
        assert [m["role"] for m in chat] == ["user", "assistant", "user"]
        assert sum(p["type"] == "image" for p in chat[0]["content"]) == 8
    assert any(s.first_image > s.second_image for s in samples)  # both orders are asked
    assert any(s.first_image < s.second_image for s in samples)
    assert followup_set(3)[2].scene == followup_set(3)[2].scene  # deterministic


def test_generator_seeds_are_disjoint_from_training_and_heldout(monkeypatch):
    seen = []
    real = random.Random

    def spy(seed=None):
        seen.append(seed)
        return real(seed)

    monkeypatch.setattr(multiturn.random, "Random", spy)
    samples = followup_set(10, seed=123)
    monkeypatch.undo()
    assert [s.seed for s in samples] == [f"followup-heldout-123-{i}" for i in range(10)]
    assert seen and all(isinstance(x, str) and x.startswith("mmkv-tiny/followup/followup-heldout-") for x in seen)
    # training draws from "mmkv-tiny-train/<seed>/<step>", make_sample from "mmkv-tiny/<task>/<seed>/..."
    assert not any(x.startswith(("mmkv-tiny-train/", "mmkv-tiny/needle/")) for x in seen)
    heldout = {tuple(s.scene.images) for s in heldout_set("needle", 50, k=8)}
    assert not heldout & {tuple(s.scene.images) for s in followup_set(50)}


def _rec(method, budget, setting, seed, t1, t2, prefilled=10, kv=1000):
    return {
        "method": method,
        "budget": budget,
        "setting": setting,
        "seed": seed,
        "index": 0,
        "distance": 7,
        "turn1_image": 1,
        "turn2_image": 8,
        "turn1_correct": t1,
        "turn2_correct": t2,
        "turn2_text": "x" if t2 else "y",
        "turn2_prefilled": prefilled,
        "turn2_prefill_s": 0.002,
        "turn2_s": 0.01,
        "turn2_cache_bytes": kv,
        "turn2_held_tokens": 5,
        "retokenized": False,
    }


def test_summary_arithmetic():
    outcomes = [(True, True), (True, False), (True, True), (False, True), (False, False)]
    records = [
        _rec("snapkv", 0.2, "kept", f"s{i}", a, b, prefilled=10 + i, kv=1000 * (i + 1))
        for i, (a, b) in enumerate(outcomes)
    ]
    records += [_rec("snapkv", 0.2, "reread", f"s{i}", a, True, prefilled=200) for i, (a, _) in enumerate(outcomes)]
    records += [_rec("h2o", 0.1, "kept", "s0", False, True)]
    kept, reread, h2o = summarize(records)
    assert (kept["method"], kept["budget"], kept["setting"], kept["samples"]) == ("snapkv", 0.2, "kept", 5)
    assert kept["turn1_correct"] == 3 and kept["turn2_correct"] == 3
    assert kept["turn1_acc"] == pytest.approx(0.6) and kept["turn2_acc"] == pytest.approx(0.6)
    assert kept["turn2_given_turn1"] == pytest.approx(2 / 3)  # turn 2 right in 2 of the 3 with turn 1 right
    assert kept["turn2_prefilled"] == pytest.approx(12) and kept["turn2_kv_bytes"] == pytest.approx(3000)
    assert kept["turn2_prefill_ms"] == pytest.approx(2.0) and kept["mean_distance"] == 7
    assert kept["turn2_acc_later"] == pytest.approx(0.6) and math.isnan(kept["turn2_acc_earlier"])
    assert reread["turn2_acc"] == 1.0 and reread["turn2_given_turn1"] == 1.0 and reread["turn2_prefilled"] == 200
    assert h2o["samples"] == 1 and math.isnan(h2o["turn2_given_turn1"])  # turn 1 never right
    table = markdown([kept, reread, h2o])
    assert "| snapkv | 0.2 | 5 | 0.60 | 0.60 | 1.00 | 0.67 / 1.00 | 12 / 200 |" in table
    assert "h2o" not in table  # a cell without both settings is not a row
    check_full([_rec("full", 1.0, s, "s0", True, True) for s in ("kept", "reread")])
    with pytest.raises(FullMismatch):
        check_full([_rec("full", 1.0, "kept", "s0", True, True), _rec("full", 1.0, "reread", "s0", True, False)])


def test_full_turn_two_is_the_same_kept_and_reread():
    model, processor = bundled()
    samples = followup_set(2, seed=4242)
    records = run_followup_eval(model, processor, ["full"], samples=samples)  # check_full runs inside
    by = {(r["seed"], r["setting"]): r for r in records}
    for s in samples:
        kept, reread = by[(s.seed, "kept")], by[(s.seed, "reread")]
        assert kept["turn2_text"] == reread["turn2_text"]
        assert kept["turn2_prefilled"] < reread["turn2_prefilled"] == reread["turn2_prompt_length"]
        assert kept["turn2_cache_bytes"] == reread["turn2_cache_bytes"]  # Full holds every token either way
    # the public re-read (Conversation.reread) answers as the module's fresh read of the whole chat
    s = samples[0]
    conv = mmkv.Conversation(model, processor, "full", 1.0)
    conv.ask(s.question1, media=s.media(), max_new_tokens=16)
    assert conv.reread(s.question2, max_new_tokens=16).text == by[(s.seed, "reread")]["turn2_text"]


def test_cli_writes_the_table(tmp_path, capsys):
    out = tmp_path / "followup"
    rc = cli_main(
        [
            "eval",
            "--followup",
            "--methods",
            "full,snapkv",
            "--budgets",
            "0.2",
            "--samples",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["setting"]) for r in rows} == {
        (m, s) for m in ("full", "snapkv") for s in ("kept", "reread")
    }
    assert all(r["samples"] == 2 for r in rows)
    table = (out / "followup.md").read_text()
    assert table.startswith("| method | budget |") and "| full | 1.0 | 2 |" in table and "| snapkv | 0.2 | 2 |" in table
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8  # 2 cells x 2 samples x 2 settings
    assert "| snapkv | 0.2 |" in capsys.readouterr().out
    again = tmp_path / "again"  # the table rebuilt from the per-sample records alone
    assert cli_main(["eval", "--followup", "--report", str(out / "samples.jsonl"), "--out", str(again)]) == 0
    assert (again / "followup.md").read_text() == table
