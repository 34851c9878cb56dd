"""Ctrl-C and SIGTERM while the command line trains.

The first signal asks the trainer to stop after the current step and save what it has: the LoRA
under its final name and the training state beside it (``NAME-state.safetensors``), as the tab's
"Stop & save" does, so ``--resume`` continues the run.  The command then exits with 128 + the
signal's number (130 for Ctrl-C, 143 for SIGTERM).  A second signal stops at once, without saving.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable

SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


class StopOnSignal:
    """A context manager around ``trainer.run()``; ``received`` is the first signal's number, or None."""

    def __init__(self, trainer: Any, log: Callable[[str], None]):
        self.trainer, self.log = trainer, log
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self.log(f"{name} again: stopping now, without saving")
            raise SystemExit(128 + signum)
        self.received = signum
        self.log(f"{name}: stopping after this step and saving the LoRA and its training state "
                 "(send it again to stop at once without saving)")
        self.trainer.request_stop(save=True, state=True)

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received is not None else 0
