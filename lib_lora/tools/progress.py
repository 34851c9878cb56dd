"""A one-line progress bar with ETA on the terminal (stderr); silent when stderr is not a tty.

A job runner learns of each bar's progress through ``observe``: the tools create their bars deep
inside (bake, extract, the SVD loop) and need not pass a callback down.  Observers are per thread,
so two jobs in two threads each see their own bars.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

_local = threading.local()


@contextmanager
def observe(callback: Callable[["Progress"], None]) -> Iterator[None]:
    """Call ``callback(bar)`` after each update of any bar this thread makes meanwhile."""
    previous = getattr(_local, "observer", None)
    _local.observer = callback
    try:
        yield
    finally:
        _local.observer = previous


class Progress:
    def __init__(self, total: int, label: str = "", enabled: bool | None = None, stream: TextIO | None = None):
        self.total, self.label, self.done = max(int(total), 0), label, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._observer = getattr(_local, "observer", None)
        if self._observer is not None:
            self._observer(self)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.done + n, self.total)
        if self._observer is not None:
            self._observer(self)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return  # a redraw per tensor would cost more than the work on small layers
        self._last = now
        width = 30
        frac = self.done / self.total if self.total else 1.0
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} eta {clock(eta)} {note[:40]:<40}")
        if self.done >= self.total:
            self.stream.write(f"\r{self.label} [{'#' * width}] {self.done}/{self.total} in {clock(elapsed)}"
                              f"{' ' * 44}\n")
        self.stream.flush()

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first step)."""
        if not self.done or not self.total:
            return None
        elapsed = time.monotonic() - self.start
        return elapsed * (self.total - self.done) / self.done


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60:02d}:{seconds % 60:02d}"
