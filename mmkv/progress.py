"""One overall progress line for long runs (``mmkv.bench``, ``mmkv.eval``): done/total, ETA, failures."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``[done/total] 42% · elapsed 1:10 · ETA 1:36 · failures 0 · <what>`` on one line of ``stream``.

    On a terminal the line is rewritten in place; elsewhere (CI logs, files) one line per update.
    The ETA is the mean time of the cells run so far (skipped ones excluded) times the cells left.
    """

    def __init__(self, total: int, what: str = "cells", stream: TextIO | None = None, skipped: int = 0) -> None:
        self.total, self.what = total, what
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.skipped = skipped
        self.failures = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if skipped:
            self._print(f"{skipped} {what} already done (resumed)")

    def line(self, label: str = "") -> str:
        run = self.done - self.skipped
        elapsed = time.perf_counter() - self.start
        eta = _clock(elapsed / run * (self.total - self.done)) if run else "?"
        pct = 100 * self.done / self.total if self.total else 100.0
        text = (f"[{self.done}/{self.total} {self.what}] {pct:.0f}% · elapsed {_clock(elapsed)} · ETA {eta} · "
                f"failures {self.failures}")
        return f"{text} · {label}" if label else text

    def update(self, label: str = "", failed: bool = False) -> None:
        """One more cell finished (``failed``: it raised and was recorded as a failure)."""
        self.done += 1
        self.failures += int(failed)
        self._print(self.line(label))

    def _print(self, text: str) -> None:
        if self._tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
