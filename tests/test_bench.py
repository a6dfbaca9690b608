"""CPU smoke test of the benchmark on the tiny model (no timing asserts)."""

from __future__ import annotations

import json

import torch

from mmkv.experiments import bench
from mmkv.testing.tiny import build_tiny


def test_synthetic_prompt_has_the_requested_length_and_visual_share() -> None:
    model, _ = build_tiny("qwen2_5_vl")
    inputs, modality = bench.synthetic_prompt(model, 300, visual_share=0.8, image_grid=8)
    assert inputs["input_ids"].shape[1] == 300 == len(modality)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == modality.counts()["image"] and abs(image_tokens / 300 - 0.8) < 0.1
    assert inputs["pixel_values"].shape[0] == inputs["image_grid_thw"].prod(-1).sum()
    with torch.inference_mode():
        model(**inputs)  # the synthetic prompt is a valid model input


def test_bench_smoke_writes_all_outputs(tmp_path) -> None:
    assert (
        bench.main(
            [
                "--model",
                "tiny",
                "--contexts",
                "200",
                "--methods",
                "full,snapkv,adakv,h2o",
                "--budgets",
                "0.2",
                "--new-tokens",
                "4",
                "--warmup",
                "1",
                "--image-grid",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["full", "snapkv", "adakv", "h2o"]
    for r in rows:
        target = 1.0 if r["method"] == "full" else 0.2
        assert abs(r["kv_ratio"] - target) <= 0.02 + 2 / 200  # within rounding of one token per head
        assert r["decode_ms"] > 0 and r["floor_ms"] > 0 and r["prefill_ms"] > 0
    assert (tmp_path / "bench.csv").exists() and (tmp_path / "bench.html").exists()
    assert (tmp_path / "bench.md").read_text().count("\n") == 2 + len(rows)


def test_full_kv_ratio_is_one_with_preallocated_room_and_cells_are_appended_then_resumed(tmp_path, capsys) -> None:
    args = [
        "--model",
        "tiny",
        "--contexts",
        "200",
        "--methods",
        "snapkv",
        "--budgets",
        "0.3",
        "--new-tokens",
        "3",
        "--warmup",
        "1",
        "--image-grid",
        "8",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(args) == 0
    lines = (tmp_path / "bench.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one record per cell, written as each finished
    records = {json.loads(line)["method"]: json.loads(line) for line in lines}
    full = records["full"]
    assert full["kv_ratio"] == 1.0 and full["kv_bytes"] == full["kv_bytes_full"]
    # the reserved room (4 generated tokens: 3 timed + 1 counted) is reported apart, not in the ratio
    per_token = full["kv_bytes_full"] // 200
    assert full["kv_reserved_bytes"] == 4 * per_token
    assert full["ops_per_step"] > 0 and records["snapkv"]["ops_per_step"] > 0
    assert full["peak_prefill_bytes"] is None or full["peak_prefill_bytes"] > 0  # CPU: peak RSS, never 0
    err = capsys.readouterr().err
    assert "bench: 2/2 cells done" in err and "ETA" in err
    # resume: nothing is run again, the tables come from the store
    assert bench.main(args + ["--resume"]) == 0
    assert len((tmp_path / "bench.jsonl").read_text().splitlines()) == 2
    assert "2/2 cells done (2 from the store)" in capsys.readouterr().err
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["full", "snapkv"] and rows[1]["ops_ratio"] > 0


def test_bench_refuses_bad_arguments_before_running(tmp_path, capsys) -> None:
    assert bench.main(["--model", "tiny", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert bench.main(["--model", "tiny", "--contexts", "40", "--image-grid", "16", "--out", str(tmp_path)]) == 2
    assert "too short" in capsys.readouterr().err and not (tmp_path / "bench.jsonl").exists()
