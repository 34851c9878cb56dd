"""A job's step boundaries: generations in between, its live weights, and "keep this state".

Between two optimiser steps (``trainer.StepBoundary``) the ``Interleaver`` of a job:

- saves the current weights as a normal file when someone asked (``KeepRequest``), without
  stopping the job;
- when the host says the interval has passed and work is waiting for its lock, hands the model
  back exactly as loaded (``StepBoundary.suspended``), lets the host give its lock to the waiting
  work (``TrainingHost.yield_lock``) and takes both back; meanwhile ``NAME@live`` in a prompt
  resolves to this step's weights (``JobLiveSource``, registered in the host's ``LiveRegistry``).

Training continues exactly where it was: the run's randomness is derived from (seed, step, ...),
its state (optimiser, scaler, data position) is never visible to the generation, and the host
restores the model's weights before giving it back.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..live import LiveRegistry, LiveSnapshot, LiveUnavailable, live_name
from ..network import parse_state_dict
from .errors import JobConflict
from .host import TrainingHost

if TYPE_CHECKING:  # hints only: job.py imports this module
    from .job import Job
    from .trainer import StepBoundary


class KeepRequest:
    """One "keep this state" asked of a running job; answered at its next step boundary."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.path: Path | None = None
        self.step: int | None = None
        self.error: str | None = None

    def kept(self, path: Path, step: int) -> None:
        self.path, self.step = Path(path), step
        self._done.set()

    def failed(self, reason: str) -> None:
        self.error = reason
        self._done.set()

    def wait(self, timeout: float | None = None) -> Path:
        """The file written; raises JobConflict with the reason when none was, TimeoutError if not yet."""
        if not self._done.wait(timeout):
            raise TimeoutError("the job has not reached its next step yet")
        if self.error is not None:
            raise JobConflict(self.error)
        assert self.path is not None
        return self.path


class JobLiveSource:
    """``NAME@live`` for one job: the weights at the boundary where the job is paused, else a message."""

    def __init__(self, job: "Job"):
        self.job = job
        self.name = live_name(job.name)
        self._lock = threading.Lock()
        self._boundary: StepBoundary | None = None
        self._snapshot: LiveSnapshot | None = None

    def open(self, boundary: "StepBoundary") -> None:
        with self._lock:
            self._boundary, self._snapshot = boundary, None

    def close(self) -> None:
        with self._lock:
            self._boundary, self._snapshot = None, None

    def snapshot(self) -> LiveSnapshot:
        with self._lock:
            b = self._boundary
            if b is None:
                raise LiveUnavailable(f"{self.name}: the job is training; its weights apply only in generations that "
                                      "run while it pauses for them (priority \"generation first\")")
            if self._snapshot is None:  # one per pause: every generation in it sees the same weights
                tensors, meta = b.contents()
                cpu = {k: v.detach().cpu() for k, v in tensors.items()}
                self._snapshot = LiveSnapshot(parse_state_dict(self.name, cpu, meta), self.job.id, b.step,
                                              meta["sshs_model_hash"])
            return self._snapshot


class Interleaver:
    def __init__(self, job: "Job", host: TrainingHost):
        self.job, self.host = job, host
        self.registry: LiveRegistry | None = host.live_registry()
        self.source = JobLiveSource(job)
        self.resumed_at = time.monotonic()

    def __enter__(self) -> "Interleaver":
        if self.registry is not None:
            self.registry.register(self.job.name, self.source)
        self.resumed_at = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.source.close()
        if self.registry is not None:
            self.registry.unregister(self.job.name, self.source)

    def between_steps(self, b: "StepBoundary") -> None:
        self._keep(b)
        interval = self.host.yield_interval()
        if interval is None or time.monotonic() - self.resumed_at < interval or not self.host.generation_waiting():
            return
        self._yield(b)
        self._keep(b)  # asked during the generation: the weights it saw

    def _yield(self, b: "StepBoundary") -> None:
        job, t0 = self.job, time.monotonic()
        job.paused_for_generation()
        try:
            with b.suspended():
                self.source.open(b)
                try:
                    self.host.yield_lock(job)
                finally:
                    self.source.close()
        finally:
            job.resumed(time.monotonic() - t0)
            self.resumed_at = time.monotonic()

    def _keep(self, b: "StepBoundary") -> None:
        requests = self.job.take_keep_requests()
        if not requests:
            return
        try:
            path = b.keep()
        except (OSError, ValueError) as e:  # FileExistsError (a file not ours), disk full ...: the job goes on
            for r in requests:
                r.failed(f"keeping step {b.step} failed: {e}")
            self.job.log(f"keeping step {b.step} failed: {e}")
            return
        self.job.log(f"kept step {b.step}: {path.name} (training goes on)")
        for r in requests:
            r.kept(path, b.step)
