"""Eval sweeps on a Ray cluster: ``mmkv eval ... --ray [ADDRESS]`` (the ``mmkv[cluster]`` extra).

Each worker is a Ray actor that loads the model once and serves many cells (one GPU per actor when the
cluster has GPUs, one CPU otherwise); each cell is one actor task. The driver alone writes the results
store, appending each cell as it finishes, so a stopped sweep keeps what it did and ``--resume`` skips it.
Actors are restarted when their process dies and their unfinished cells are retried there (Ray's
``max_restarts`` / ``max_task_retries``); a cell's result is written once, when its task returns. A
shard's Full cell is sent first and its other cells follow as soon as its answers are in. This is the
only module that imports Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from .progress import Progress
from .records import ResultStore, failure_record, reference_ids

if TYPE_CHECKING:  # the callers (mmkv.experiments.eval, mmkv.experiments.bench) pass their classes in: no import cycle
    from .eval import Cell, Plan


class EvalWorker:
    """A model-holding actor: loads ``model_name`` once, then runs cells with ``runner`` (:class:`mmkv.experiments.eval.CellRunner`)."""

    def __init__(self, runner: type, model_name: str, max_new_tokens: int, threads: int | None) -> None:
        import torch

        from ..models import load

        if threads:
            torch.set_num_threads(threads)
        model, processor = load(model_name)
        self.runner = runner(model, processor, max_new_tokens)

    def run(self, cell: Cell, samples: list[tuple[int, Any]], reference: list[list[int]] | None) -> dict[str, Any]:
        return self.runner.run(cell, samples, reference)


def _init(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a local instance; ``True`` when this call started Ray."""
    if ray.is_initialized():
        return False
    package_root = str(Path(__file__).resolve().parents[2])
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # a local instance: its workers import mmkv from this checkout
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    return True


def run_ray(
    plan: Plan,
    store: ResultStore,
    model: str,
    runner: type,
    *,
    address: str | None = None,
    workers: int | None = None,
    max_new_tokens: int = 16,
    progress: Progress | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    num_cpus: int | None = None,
    max_retries: int = 3,
) -> int:
    """Run the plan's pending cells on Ray actors, appending each result to ``store``; returns the failures.

    ``runner`` is :class:`mmkv.experiments.eval.CellRunner`, passed in by :mod:`mmkv.experiments.eval` (which calls this, so this
    module never imports it).

    ``address``: a running cluster (``ray start --head`` prints it), ``None`` = a local instance
    (``num_cpus`` CPUs, default all). ``workers``: actors (default one per GPU, else one per CPU).
    ``max_retries``: restarts of a dead actor and retries of its unfinished cells.
    """
    if Path(model).exists():
        model = str(Path(model).resolve())  # actors may start in another directory
    started = _init(address, num_cpus)
    finished = store.finished()
    pending = plan.pending(store)
    ready = [c for c in pending if c.method == "full" or c.reference.key in finished]
    waiting: dict[str, list[Cell]] = {}
    ready_keys = {c.key for c in ready}
    for c in pending:
        if c.key not in ready_keys:
            waiting.setdefault(c.reference.key, []).append(c)
    failures = 0

    def fail(cell: Cell, error: BaseException | str) -> None:
        nonlocal failures
        cells = [cell] + (waiting.pop(cell.key, []) if cell.method == "full" else [])
        for c in cells:
            failures += 1
            store.append(failure_record(c, error if c is cell else f"Full's cell {cell.key} failed"))
            if progress:
                progress.update(c.key, failed=True)

    if not pending:
        if started:
            ray.shutdown()
        return 0
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = max(1, min(workers or gpus or int(resources.get("CPU", 1)), len(pending)))
    actor_cls = ray.remote(EvalWorker).options(
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=max_retries, max_task_retries=max_retries
    )
    # actor handles (ray types .remote() on a class-made actor loosely)
    actors: list[Any] = [actor_cls.remote(runner, model, max_new_tokens, None if gpus else 1) for _ in range(count)]
    idle = list(actors)
    last_shard: dict[Any, tuple[str, int]] = {}
    shard_refs: dict[tuple[str, int], Any] = {}
    inflight: dict[Any, tuple[Cell, Any]] = {}

    def submit(actor: Any) -> None:
        # keep an actor on its last shard while that shard has ready cells (its prepared inputs are cached)
        same = [c for c in ready if (c.task, c.shard) == last_shard.get(actor)]
        cell = same[0] if same else ready[0]
        ready.remove(cell)
        shard = (cell.task, cell.shard)
        if shard not in shard_refs:
            shard_refs[shard] = ray.put(plan.shards[shard])
        last_shard[actor] = shard
        inflight[actor.run.remote(cell, shard_refs[shard], reference_ids(finished, cell))] = (cell, actor)

    try:
        while ready or inflight:
            while ready and idle:
                submit(idle.pop(0))
            if not inflight:  # every actor is gone
                for cell in list(ready):
                    fail(cell, "no Ray worker left")
                ready.clear()
                break
            (done,), _ = ray.wait(list(inflight), num_returns=1)
            cell, actor = inflight.pop(done)
            try:
                rec = ray.get(done)
            except ray.exceptions.RayActorError as e:  # the actor died and its restarts are spent
                fail(cell, e)
                continue
            except ray.exceptions.RayTaskError as e:  # the cell itself raised: recorded, the actor serves on
                idle.append(actor)
                fail(cell, e.cause if getattr(e, "cause", None) else e)
                continue
            idle.append(actor)
            store.append(rec)
            finished[cell.key] = rec
            if cell.method == "full":
                ready.extend(waiting.pop(cell.key, []))
            if progress:
                progress.update(cell.key)
            if on_result:
                on_result(rec)
        for key, cells in list(waiting.items()):  # Full's cell was neither finished nor planned
            for c in cells:
                fail(c, f"Full's cell {key} is not in the plan")
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return failures


def run_bench_ray(
    cells: list[tuple[int, str, float | int]],
    store: ResultStore,
    model: str,
    record: Callable[[tuple[int, str, float | int], dict[str, Any]], dict[str, Any]],
    measurer: type,
    *,
    address: str | None = None,
    workers: int | None = None,
    device: str | None = None,
    dtype: str = "bfloat16",
    settings: dict[str, Any] | None = None,
    progress: Progress | None = None,
    max_retries: int = 3,
) -> int:
    """Measure ``cells`` (context, method, budget) on Ray actors, one GPU each (CPUs otherwise).

    ``measurer`` is :class:`mmkv.experiments.bench.CellMeasurer` (passed in by :func:`mmkv.experiments.bench.run`). ``record(cell, measured)`` makes the store record the driver appends as each cell returns. Cells
    are independent (ratios against Full are computed from the store afterwards); each actor warms up
    once per context, as the serial run does. On CPU, actors on one machine share its cores and memory
    bandwidth, so their timings disturb each other: use one actor per machine there (``workers``).
    Returns the failures (recorded in the store with the error).
    """
    if Path(model).exists():
        model = str(Path(model).resolve())
    started = _init(address, None)
    failures = 0
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = max(1, min(workers or gpus or 1, len(cells)))
        actor_cls: Any = ray.remote(measurer).options(
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1, max_restarts=max_retries, max_task_retries=max_retries
        )
        actors: list[Any] = [actor_cls.remote(model, device, dtype, settings or {}) for _ in range(count)]
        inflight: dict[Any, tuple[Any, Any]] = {}  # task ref -> (cell, actor)
        queue, idle = list(cells), list(actors)
        while queue or inflight:
            while queue and idle:
                actor, cell = idle.pop(0), queue.pop(0)
                inflight[actor.run.remote(*cell)] = (cell, actor)
            (done,), _ = ray.wait(list(inflight), num_returns=1)
            cell, actor = inflight.pop(done)
            try:
                measured = ray.get(done)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                failures += 1
                if not isinstance(e, ray.exceptions.RayActorError):
                    idle.append(actor)
                store.append({"kind": "failure", "key": record(cell, {})["key"], "error": f"{type(e).__name__}: {e}"})
                if progress:
                    progress.update(str(cell), failed=True)
                continue
            idle.append(actor)
            rec = record(cell, measured)
            store.append(rec)
            if progress:
                progress.update(f"{rec['key']}: decode {measured['decode_ms']:.2f} ms/token")
        for actor in actors:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    return failures
