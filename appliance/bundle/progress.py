"""A text progress bar on stderr: redrawn in place on a terminal, one summary line otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
_REDRAW_SECONDS = 0.1


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class Progress:
    """Counts bytes of one file; `total` may be a guess (docker save's size is known only at the end)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and now - self._drawn >= _REDRAW_SECONDS:
            self._drawn = now
            self._draw("\r")

    def close(self) -> None:
        self.total = max(self.total, self.done)
        self._draw("\r" if self.tty else "", end="\n")

    def _draw(self, prefix: str, end: str = "") -> None:
        fraction = min(self.done / self.total, 1.0)
        bar = "#" * int(fraction * _WIDTH)
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed / 1e6 if elapsed > 0 else 0.0
        self.stream.write(f"{prefix}  {self.label:<34} [{bar:<{_WIDTH}}] {fraction:4.0%} {_mb(self.done):>11}"
                          f"  {rate:6.1f} MB/s{end}")
        self.stream.flush()
