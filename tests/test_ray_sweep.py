"""Ray sweeps on a local 2-CPU instance: the same numbers as the serial harness, cell by cell, with a
worker killed mid-sweep, and after a stopped sweep is resumed."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

# CI installs ray (requirements-dev.txt): there a missing ray fails the run instead of skipping it
ray = __import__("ray") if os.environ.get("CI") == "true" else pytest.importorskip("ray")

import mmkv  # noqa: E402
from mmkv.experiments import eval as mmkv_eval  # noqa: E402
from mmkv.experiments.records import ResultStore  # noqa: E402
from mmkv.experiments.sweep import run_ray  # noqa: E402
from mmkv.tiny.tasks import suite_of  # noqa: E402

MODEL = "assets/mmkv-tiny-qwen2vl"


def _plan() -> mmkv_eval.Plan:
    samples = mmkv_eval.synthetic_samples(["text_needle"], 2, 3, 10_000, suite_of(MODEL))
    return mmkv_eval.make_plan(samples, ["snapkv", "lookm"], [0.2], shard_size=1)  # 2 shards x 3 cells


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict:
    torch.set_num_threads(1)  # as each Ray worker: the same float sums, so the same KL to the last bit
    model, processor = mmkv.load(MODEL)
    store = ResultStore(tmp_path_factory.mktemp("serial") / "results.jsonl")
    assert mmkv_eval.run_serial(mmkv_eval.CellRunner(model, processor, 16), _plan(), store) == 0
    return store.finished()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(mmkv.__file__))}},
    )
    yield
    ray.shutdown()


def _same_cells(store: ResultStore, serial: dict) -> None:
    cells = [r for r in store.records() if r.get("kind") == "cell"]
    assert sorted(r["key"] for r in cells) == sorted(serial)  # nothing lost, nothing written twice
    for rec in cells:
        ref = serial[rec["key"]]
        for a, b in zip(rec["samples"], ref["samples"], strict=True):
            assert (a["token_ids"], a["answer"], a["score"], a["kv_ratio"]) == (
                b["token_ids"],
                b["answer"],
                b["score"],
                b["kv_ratio"],
            )
            assert a["kl"] == pytest.approx(b["kl"], rel=1e-6, abs=1e-9)
    assert mmkv_eval.aggregate(store.finished().values()) == pytest.approx(mmkv_eval.aggregate(serial.values()))


class DiesOnce:
    """A sample whose first scoring kills the worker process running it (SIGKILL, mid-cell)."""

    def __init__(self, sample, marker: str) -> None:
        self.sample, self.marker, self.task, self.chat = sample, marker, sample.task, sample.chat

    def check(self, answer: str) -> bool:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.sample.check(answer)


def test_sweep_with_a_worker_killed_mid_cell_equals_serial(local_ray, serial, tmp_path) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need DiesOnce by value
    plan = _plan()
    marker = tmp_path / "killed"
    index, sample = plan.shards[("text_needle", 1)][0]
    plan.shards[("text_needle", 1)][0] = (index, DiesOnce(sample, str(marker)))
    store = ResultStore(tmp_path / "results.jsonl")
    assert run_ray(plan, store, MODEL, mmkv_eval.CellRunner) == 0
    assert marker.exists()  # a worker did die in the middle of a cell ...
    assert not any(r.get("kind") == "failure" for r in store.records())  # ... and its cell was run again
    _same_cells(store, serial)


def test_stopped_sweep_resumes_without_redoing_cells(local_ray, serial, tmp_path) -> None:
    store = ResultStore(tmp_path / "results.jsonl")

    def stop_after_two(rec: dict) -> None:
        if len(store.finished()) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ray(_plan(), store, MODEL, mmkv_eval.CellRunner, on_result=stop_after_two)
    first = list(store.finished())
    assert len(first) == 2
    assert run_ray(_plan(), store, MODEL, mmkv_eval.CellRunner) == 0
    _same_cells(store, serial)  # each key once: the two finished cells were not run again
    assert list(store.finished())[:2] == first


def test_bench_on_ray_measures_the_same_memory_and_ops_as_serial(local_ray, tmp_path, capsys) -> None:
    """``mmkv.experiments.bench --ray``: cells measured on actors land in the same store; what does not depend on
    timing (bytes, KV ratio, aten ops per step) equals the serial run's, and --resume skips them."""
    from mmkv.experiments import bench

    args = [
        "--model",
        "tiny",
        "--contexts",
        "200",
        "--methods",
        "snapkv,adakv",
        "--budgets",
        "0.3",
        "--new-tokens",
        "2",
        "--warmup",
        "1",
        "--image-grid",
        "8",
    ]
    assert bench.main(args + ["--out", str(tmp_path / "serial")]) == 0
    assert bench.main(args + ["--out", str(tmp_path / "ray"), "--ray"]) == 0
    serial = ResultStore(tmp_path / "serial" / "bench.jsonl").finished()
    on_ray = ResultStore(tmp_path / "ray" / "bench.jsonl").finished()
    assert sorted(on_ray) == sorted(serial) and len(on_ray) == 3
    for key, rec in on_ray.items():
        for field in ("kv_bytes_full", "kv_bytes", "kv_reserved_bytes", "kv_ratio", "ops_per_step"):
            assert rec[field] == serial[key][field], (key, field)
    assert "bench: 3/3 cells done" in capsys.readouterr().err
    assert bench.main(args + ["--out", str(tmp_path / "ray"), "--ray", "--resume"]) == 0
    assert len(ResultStore(tmp_path / "ray" / "bench.jsonl").records()) == 3
