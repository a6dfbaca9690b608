"""The eval harness end to end on the bundled model: Full's accuracy equals a direct evaluation."""

from __future__ import annotations

import json

import mmkv
from mmkv import eval as mmkv_eval

MODEL = "assets/mmkv-tiny-qwen2vl"


def test_eval_harness_full_accuracy_equals_direct_evaluation(tmp_path) -> None:
    assert mmkv_eval.main(["--model", MODEL, "--methods", "full,snapkv", "--budgets", "0.2", "--tasks",
                           "text_needle,video_colour", "--samples", "6", "--images", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("text_needle", "video_colour") for m in ("full", "snapkv")
    }
    model, processor = mmkv.load(MODEL)
    for task in ("text_needle", "video_colour"):
        samples = mmkv_eval.synthetic_samples([task], 6, 3, 10_000)
        direct = sum(s.check(mmkv.generate(model, processor, s.chat, "full", 1.0, max_new_tokens=16).text)
                     for s in samples) / len(samples)
        full = next(r for r in rows if r["task"] == task and r["method"] == "full")
        assert full["accuracy"] == direct
        assert full["agreement"] == 1.0 and full["kl"] == 0.0 and full["kv_ratio"] == 1.0
        snap = next(r for r in rows if r["task"] == task and r["method"] == "snapkv")
        assert 0.15 < snap["kv_ratio"] < 0.3 and snap["kl"] >= 0.0 and 0.0 <= snap["agreement"] <= 1.0
    assert (tmp_path / "eval.csv").exists() and (tmp_path / "eval.html").stat().st_size > 1000
