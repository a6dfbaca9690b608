"""Writing result rows (dataclasses) as JSON and CSV, shared by ``mmkv.bench`` and ``mmkv.eval``."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence


def write_records(rows: Sequence[Any], out: Path, stem: str) -> None:
    """``out/<stem>.json`` and ``out/<stem>.csv`` with one record per dataclass row (``out`` is created)."""
    out.mkdir(parents=True, exist_ok=True)
    data = [asdict(r) for r in rows]
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
