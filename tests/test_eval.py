"""The eval harness end to end on the bundled model: Full's accuracy equals a direct evaluation, results
land in an append-only store cell by cell, and ``--resume`` finishes a stopped run without counting a
cell twice."""

from __future__ import annotations

import json

import pytest

import mmkv
from mmkv.experiments import eval as mmkv_eval
from mmkv.experiments.records import ResultStore
from mmkv.tiny.tasks import suite_of

MODEL = "assets/mmkv-tiny-qwen2vl"
SUITE = suite_of(MODEL)  # the bundled model's tasks and image sizes (as `mmkv eval --model` draws them)


def test_eval_harness_full_accuracy_equals_direct_evaluation(tmp_path, capsys) -> None:
    assert (
        mmkv_eval.main(
            [
                "--model",
                MODEL,
                "--methods",
                "full,snapkv",
                "--budgets",
                "0.2",
                "--tasks",
                "text_needle,video_colour",
                "--samples",
                "4",
                "--images",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("text_needle", "video_colour") for m in ("full", "snapkv")
    }
    store = ResultStore(tmp_path / "results.jsonl")
    cells = store.finished()
    model, processor = mmkv.load(MODEL)
    for task in ("text_needle", "video_colour"):
        samples = mmkv_eval.synthetic_samples([task], 4, 3, 10_000, SUITE)
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
    args = [
        "--model",
        MODEL,
        "--methods",
        "snapkv",
        "--budgets",
        "0.2",
        "--tasks",
        "text_needle",
        "--samples",
        "2",
        "--images",
        "3",
        "--shard-size",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert mmkv_eval.main(args) == 0  # 2 shards x (full, snapkv) = 4 cells
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    cells = [json.loads(x) for x in lines if json.loads(x)["kind"] == "cell"]
    assert [c["key"] for c in cells] == [
        "text_needle/0/full@1.0/qa",
        "text_needle/0/snapkv@0.2/qa",
        "text_needle/1/full@1.0/qa",
        "text_needle/1/snapkv@0.2/qa",
    ]
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
    samples = mmkv_eval.synthetic_samples(["text_needle"], 2, 3, 10_000, SUITE)
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


def _cell(task: str, method: str, budget: float | int, scores: list[float], query_aware: bool = True) -> dict:
    cell = mmkv_eval.Cell(task, 0, method, budget, query_aware)
    return {
        "kind": "cell",
        "key": cell.key,
        "task": task,
        "shard": 0,
        "method": method,
        "budget": budget,
        "query_aware": query_aware,
        "seconds": 0.0,
        "samples": [
            {
                "index": i,
                "score": s,
                "answer": "",
                "token_ids": [i],
                "kl": 0.0,
                "kv_ratio": 1.0 if method == "full" else float(budget),
            }
            for i, s in enumerate(scores)
        ],
    }


def test_report_sets_the_papers_figure_and_source_beside_ours_only_where_all_keys_match(
    tmp_path, monkeypatch, capsys
) -> None:
    # the shipped table loads and every entry is well formed (it is empty until numbers are verified)
    assert mmkv_eval.load_published() == mmkv_eval.PUBLISHED
    src = {"paper": "Paper A", "url": "https://example.org/a", "table": "Table 1", "paper_method": "TP+P-Merge"}
    entries = [
        {
            "model": "org/Model-7B",
            "dataset": "TextNeedleInAHaystack",
            "method": "lookm",
            "budget": 0.2,
            "score": 0.25,
            "source": src,
        },
        {
            "model": ["other/alias", "Model-7B"],
            "dataset": "TextNeedleInAHaystack",
            "method": "full",
            "budget": 1.0,
            "score": 0.4,
            "source": {"url": "https://example.org/b", "table": "Table 2"},
        },
        {
            "model": "org/Model-7B",
            "datasets": ["TextNeedleInAHaystack", "GPR1200"],
            "label": "N+I",
            "method": "lookm",
            "budget": 0.2,
            "score": 0.3,
            "source": src,
        },
        # no match: another budget, another model, a token count for a ratio, a dataset we did not run, query-agnostic
        {
            "model": "org/Model-7B",
            "dataset": "TextNeedleInAHaystack",
            "method": "lookm",
            "budget": 0.1,
            "score": 0.9,
            "source": src,
        },
        {
            "model": "org/Model-13B",
            "dataset": "TextNeedleInAHaystack",
            "method": "lookm",
            "budget": 0.2,
            "score": 0.9,
            "source": src,
        },
        {"model": "org/Model-7B", "dataset": "GPR1200", "method": "snapkv", "budget": 256, "score": 0.9, "source": src},
        {
            "model": "org/Model-7B",
            "datasets": ["GPR1200", "DocVQA"],
            "label": "X",
            "method": "lookm",
            "budget": 0.2,
            "score": 0.9,
            "source": src,
        },
        {
            "model": "org/Model-7B",
            "dataset": "GPR1200",
            "method": "lookm",
            "budget": 0.2,
            "query_aware": False,
            "score": 0.9,
            "source": src,
        },
    ]
    path = tmp_path / "published.json"
    path.write_text(json.dumps({"entries": entries}))
    monkeypatch.setattr(mmkv_eval, "PUBLISHED", mmkv_eval.load_published(path))

    store = ResultStore(tmp_path / "results.jsonl")
    store.append({"kind": "run", "config": {"model": "/models/model-7b/", "source": "milebench"}})
    for rec in (
        _cell("TextNeedleInAHaystack", "full", 1.0, [1, 0, 1, 0]),
        _cell("TextNeedleInAHaystack", "lookm", 0.2, [1, 0, 0, 0]),
        _cell("GPR1200", "full", 1.0, [1, 1, 1, 1]),
        _cell("GPR1200", "lookm", 0.2, [1, 1, 0, 0]),
        _cell("GPR1200", "snapkv", 0.2, [1, 1, 1, 0]),
    ):
        store.append(rec)
    out = tmp_path / "report"
    rows = mmkv_eval.report(tmp_path / "results.jsonl", out)
    assert len(rows) == 5
    pub = json.loads((out / "published.json").read_text())
    got = {(p["dataset"], p["method"], p["budget"]): p for p in pub}
    assert set(got) == {
        ("TextNeedleInAHaystack", "lookm", 0.2),
        ("TextNeedleInAHaystack", "full", 1.0),
        ("N+I", "lookm", 0.2),
    }
    lookm = got[("TextNeedleInAHaystack", "lookm", 0.2)]
    assert (lookm["ours"], lookm["paper"], lookm["delta"], lookm["samples"]) == (0.25, 0.25, 0.0, 4)
    assert lookm["source"] == "Paper A, Table 1, https://example.org/a" and lookm["paper_method"] == "TP+P-Merge"
    assert (
        got[("TextNeedleInAHaystack", "full", 1.0)]["ours"],
        got[("TextNeedleInAHaystack", "full", 1.0)]["paper"],
    ) == (0.5, 0.4)
    group = got[("N+I", "lookm", 0.2)]  # a paper column over two datasets: our unweighted mean
    assert group["datasets"] == ["TextNeedleInAHaystack", "GPR1200"] and group["ours"] == (0.25 + 0.5) / 2
    # the CSV and markdown tables carry the same cells with their sources; cells without a paper figure carry none
    csv_rows = (out / "published.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("model,dataset,datasets,method,budget,query_aware,ours,paper")
    md = (out / "published.md").read_text()
    assert (
        "| TextNeedleInAHaystack | lookm (TP+P-Merge) | 0.2 | aware | 0.250 | 0.250 | +0.000 | 4 | [Table 1](https://example.org/a) |"
        in md
    )
    assert "snapkv" not in md and "0.900" not in md
    assert "3 cell(s) beside a published figure" in capsys.readouterr().err
    html = (out / "eval.html").read_text()
    assert "lookm (paper)" in html and "full (paper)" in html and "snapkv (paper)" not in html
    # another model: nothing beside ours, and no published files
    assert (
        mmkv_eval.published_beside(rows, "org/Model-13B-Instruct") == []
        and mmkv_eval.published_beside(rows, None) == []
    )
    # a malformed entry is refused when the table is read
    for bad in (
        {**entries[0], "score": 25.0},
        {k: v for k, v in entries[0].items() if k != "source"},
        {**entries[0], "datasets": ["GPR1200"]},
        {**entries[0], "source": {"url": "u"}},
    ):
        path.write_text(json.dumps([bad]))
        with pytest.raises(ValueError):
            mmkv_eval.load_published(path)


def test_synthetic_samples_follow_the_models_suite() -> None:
    """`mmkv eval` draws the evaluated model's own image sizes (training_metrics.json's suite): no suite gives
    the generator's defaults (v1: 112 px flat grey); the bundled model (v2) 168 px shaded images and two
    196 px pictures."""
    from mmkv.tiny.tasks import V1_SUITE, V2_SUITE, heldout_set

    plain = mmkv_eval.synthetic_samples(["needle", "video_colour"], 2, 3, 10_000)
    assert [
        (s.question, s.scene) for s in mmkv_eval.synthetic_samples(["needle", "video_colour"], 2, 3, 10_000, V1_SUITE)
    ] == [(s.question, s.scene) for s in plain]
    assert [s.scene for s in plain[:2]] == [s.scene for s in heldout_set("needle", 2, 3, 10_000)]
    assert [(s.scene.size, s.scene.shaded) for s in plain[:2]] == [(112, False)] * 2
    assert SUITE == V2_SUITE  # the bundled model (v2)
    v2 = mmkv_eval.synthetic_samples(["needle", "spot_difference"], 2, 8, 10_000, SUITE)
    assert [(s.scene.size, s.scene.shaded, s.scene.k) for s in v2] == [(168, True, 8)] * 2 + [(196, True, 2)] * 2
