"""CPU smoke test of the benchmark on the tiny model (no timing asserts)."""

from __future__ import annotations

import json

import torch

from mmkv import bench
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
    assert bench.main(["--model", "tiny", "--contexts", "200", "--methods", "full,snapkv,adakv,h2o", "--budgets",
                       "0.2", "--new-tokens", "4", "--warmup", "1", "--image-grid", "8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["full", "snapkv", "adakv", "h2o"]
    for r in rows:
        target = 1.0 if r["method"] == "full" else 0.2
        assert abs(r["kv_ratio"] - target) <= 0.02 + 2 / 200  # within rounding of one token per head
        assert r["decode_ms"] > 0 and r["floor_ms"] > 0 and r["prefill_ms"] > 0
    assert (tmp_path / "bench.csv").exists() and (tmp_path / "bench.html").exists()
    assert (tmp_path / "bench.md").read_text().count("\n") == 2 + len(rows)
