"""The command line's progress on stderr: one line rewritten in place (loading, caching, steps), and log
lines that never land in the middle of it.  Quiet on the non-main processes of a multi-process run."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Console:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._open = False  # a progress line is on screen without its newline

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str, done: bool = False) -> None:
        """Rewrite the progress line; ``done`` ends it."""
        if not self.enabled:
            return
        self._write(f"\r{text}\033[K" + ("\n" if done else ""))
        self._open = not done

    def end(self) -> None:
        """End the progress line where it stands."""
        if self._open:
            self._write("\n")
            self._open = False

    def log(self, text: str) -> None:
        if self.enabled:
            self.end()
            self._write(text + "\n")

    def stage(self, what: str, done: int, total: int) -> None:
        """``Callbacks.on_caching`` and the like: ``what done/total``, ended at the last one."""
        self.line(f"{what} {done}/{total}", done=done >= total)

    def steps(self, p: Any) -> None:
        """``Callbacks.on_progress``: a bar with the step, the average loss, the learning rate and the ETA."""
        width = 30
        filled = int(width * p.step / max(p.total, 1))
        eta = time.strftime("%M:%S", time.gmtime(p.eta)) if p.eta < 3600 else f"{p.eta / 3600:.1f}h"
        self.line(f"[{'#' * filled}{'.' * (width - filled)}] {p.step}/{p.total} loss {p.avg_loss:.4f} "
                  f"lr {p.lr:.2e} eta {eta}", done=p.step == p.total)


class Timer:
    """``with Timer(console, "loading x.safetensors") as t: ... t.stage("UNet")``: one line per task."""

    def __init__(self, console: Console, task: str):
        self.console, self.task = console, task

    def __enter__(self) -> "Timer":
        self.t0 = time.time()
        self.stage("")
        return self

    def stage(self, what: str) -> None:
        self.console.line(f"{self.task}{': ' + what if what else ''}...")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.console.line(f"{self.task}: done in {time.time() - self.t0:.1f} s", done=True)
        else:
            self.console.end()  # the error message starts on a line of its own
