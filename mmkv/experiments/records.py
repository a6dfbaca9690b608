"""Result files shared by ``mmkv.experiments.bench`` and ``mmkv.experiments.eval``: JSON/CSV tables and the append-only JSONL store."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any


def write_records(rows: Sequence[Any], out: Path, stem: str) -> None:
    """``out/<stem>.json`` and ``out/<stem>.csv`` with one record per dataclass row (``out`` is created)."""
    out.mkdir(parents=True, exist_ok=True)
    data = [asdict(r) for r in rows]
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]) if data else [])
        writer.writeheader()
        writer.writerows(data)


class ResultStore:
    """An append-only JSONL file of result records (``path=None``: kept in memory).

    Every record is one JSON object on one line, written with a single ``write`` and flushed to disk
    (``fsync``) before :meth:`append` returns, so a stopped run keeps every record it finished. Readers
    skip a torn last line (a run killed mid-write), and :meth:`finished` keeps the *first* record of each
    key, so a line written twice (a retried task, two runs racing) is counted once.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=True)
        if self.path is None:
            self._memory.append(json.loads(line))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            torn = False
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((("\n" if torn else "") + line + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, in file order (torn or corrupt lines are skipped)."""
        if self.path is None:
            return list(self._memory)
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def finished(self, kind: str = "cell") -> dict[str, dict[str, Any]]:
        """The first record of each ``key`` among records of ``kind``."""
        out: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            if rec.get("kind") == kind and "key" in rec:
                out.setdefault(rec["key"], rec)
        return out

    def __len__(self) -> int:
        return len(self.records())


# ---- eval cells (mmkv.experiments.eval.Cell) ---------------------------------------------------------------
def reference_ids(finished: dict[str, dict[str, Any]], cell: Any) -> list[list[int]] | None:
    """Full's token ids per sample of ``cell``'s shard, from the store (``None`` for Full or when absent)."""
    if cell.method == "full":
        return None
    rec = finished.get(cell.reference.key)
    return None if rec is None else [s["token_ids"] for s in rec["samples"]]


def failure_record(cell: Any, error: BaseException | str) -> dict[str, Any]:
    return {
        "kind": "failure",
        "key": cell.key,
        **asdict(cell),
        "error": error if isinstance(error, str) else f"{type(error).__name__}: {error}",
    }
