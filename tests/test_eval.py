"""The eval harness end to end on the bundled model: Full's accuracy equals a direct evaluation, results
land in an append-only store cell by cell, and ``--resume`` finishes a stopped run without counting a
cell twice."""

from __future__ import annotations

import json

import pytest

import mmkv
from mmkv import eval as mmkv_eval
from mmkv.records import ResultStore

MODEL = "assets/mmkv-tiny-qwen2vl"


def test_eval_harness_full_accuracy_equals_direct_evaluation(tmp_path, capsys) -> None:
    assert mmkv_eval.main(["--model", MODEL, "--methods", "full,snapkv", "--budgets", "0.2", "--tasks",
                           "text_needle,video_colour", "--samples", "4", "--images", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("text_needle", "video_colour") for m in ("full", "snapkv")
    }
    store = ResultStore(tmp_path / "results.jsonl")
    cells = store.finished()
    model, processor = mmkv.load(MODEL)
    for task in ("text_needle", "video_colour"):
        samples = mmkv_eval.synthetic_samples([task], 4, 3, 10_000)
        direct = [mmkv.generate(model, processor, s.chat, "full", 1.0, max_new_tokens=16) for s in samples]
        full = next(r for r in rows if r["task"] == task and r["method"] == "full")
        assert full["accuracy"] == sum(s.check(d.text) for s, d in zip(samples, direct)) / len(samples)
        assert full["agreement"] == 1.0 and full["kl"] == 0.0 and full["kv_ratio"] == 1.0
        # the store keeps every answer's text and token ids: the harness's Full is the API's, token for token
        stored = cells[f"{task}/0/full@1.0/qa"]["samples"]
        assert [s["token_ids"] for s in stored] == [d.token_ids for d in direct]
        assert [s["answer"] for s in stored] == [d.text for d in direct]
        snap = next(r for r in rows if r["task"] == task and r["method"] == "snapkv")
        assert 0.15 < snap["kv_ratio"] < 0.3 and snap["kl"] >= 0.0 and 0.0 <= snap["agreement"] <= 1.0
    assert (tmp_path / "eval.csv").exists() and (tmp_path / "eval.html").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "4/4 cells done" in err and "ETA" in err and "0 failed" in err
    # the report is rebuilt from the store alone, identically
    assert [r.__dict__ for r in mmkv_eval.report(tmp_path / "results.jsonl")] == rows


def test_resume_skips_finished_cells_and_counts_each_once(tmp_path, capsys) -> None:
    args = ["--model", MODEL, "--methods", "snapkv", "--budgets", "0.2", "--tasks", "text_needle", "--samples", "2",
            "--images", "3", "--shard-size", "1", "--out", str(tmp_path)]
    assert mmkv_eval.main(args) == 0  # 2 shards x (full, snapkv) = 4 cells
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    cells = [json.loads(x) for x in lines if json.loads(x)["kind"] == "cell"]
    assert [c["key"] for c in cells] == ["text_needle/0/full@1.0/qa", "text_needle/0/snapkv@0.2/qa",
                                         "text_needle/1/full@1.0/qa", "text_needle/1/snapkv@0.2/qa"]
    before = mmkv_eval.report(path)
    # a stopped run: the last cell never finished and its line was torn; a retried cell's line is doubled
    path.write_text("\n".join(lines[:3] + [lines[2], lines[3], lines[4][: len(lines[4]) // 2]]))
    with pytest.raises(SystemExit):  # an existing store is never overwritten without --resume
        mmkv_eval.main(args)
    with pytest.raises(SystemExit):  # nor resumed with settings that change what a cell means
        mmkv_eval.main(args + ["--resume", "--max-new-tokens", "8"])
    capsys.readouterr()
    assert mmkv_eval.main(args + ["--resume"]) == 0
    assert "4/4 cells done (3 from the store)" in capsys.readouterr().err
    after = ResultStore(path)
    keys = [r["key"] for r in after.records() if r.get("kind") == "cell"]
    assert keys.count("text_needle/0/snapkv@0.2/qa") == 2 and keys.count("text_needle/1/snapkv@0.2/qa") == 1
    assert mmkv_eval.report(path) == before  # same numbers, the doubled cell counted once
    assert [r.samples for r in before] == [2, 2]


def test_evaluate_api_keeps_a_store_and_reuses_it(tmp_path) -> None:
    model, processor = mmkv.load(MODEL)
    samples = mmkv_eval.synthetic_samples(["text_needle"], 2, 3, 10_000)
    store = ResultStore(tmp_path / "api.jsonl")
    rows = mmkv_eval.evaluate(model, processor, samples, ["snapkv"], [0.5], store=store)
    assert [(r.method, r.samples) for r in rows] == [("full", 2), ("snapkv", 2)]
    n = len(store)
    assert mmkv_eval.evaluate(model, processor, samples, ["snapkv"], [0.5], store=store) == rows
    assert len(store) == n  # nothing ran again


def test_every_flag_is_described_and_cpu_defaults_are_small() -> None:
    parser = mmkv_eval.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no description"
    text = " ".join(parser.format_help().split())
    assert "on CPU only the methods snapkv,adakv,lookm,madakv" in text and "--resume" in text and "--ray" in text
