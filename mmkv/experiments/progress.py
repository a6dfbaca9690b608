"""One overall progress line for long runs (``mmkv.experiments.eval``, ``mmkv.experiments.bench``): cells done/total, failures, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One overall progress line on stderr: cells done / total, failures, elapsed and ETA.

    On a terminal the line is rewritten in place; otherwise (logs, CI) one line per finished cell.
    """

    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, label: str = "eval") -> None:
        self.total, self.done, self.failed, self.label = total, done, 0, label
        self._skipped, self._new, self._start = done, 0, time.monotonic()
        self.stream = stream if stream is not None else sys.stderr
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._show("")

    def _show(self, last: str) -> None:
        elapsed = time.monotonic() - self._start
        left = self.total - self.done - self.failed
        eta = "?" if self._new == 0 else _duration(elapsed / self._new * left)
        line = (
            f"{self.label}: {self.done}/{self.total} cells done"
            + (f" ({self._skipped} from the store)" if self._skipped else "")
            + f" · {self.failed} failed · {_duration(elapsed)} elapsed · ETA {eta if left else '0s'}"
            + (f" · {last}" if last else "")
        )
        if self._tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, key: str, failed: bool = False) -> None:
        self._new += 1
        if failed:
            self.failed += 1
        else:
            self.done += 1
        self._show(("FAILED " if failed else "") + key)

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
