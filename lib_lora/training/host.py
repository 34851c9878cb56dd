"""What a program that runs training jobs gives the ``JobRunner`` (jobs.py): the training host seam.

A host (the WebUI, tests) subclasses ``TrainingHost`` to say which lock serialises work on the
model, how to wrap its loaded model as a ``TrainableModel`` (model.py), where LoRAs go, and how
progress is shown; it raises ``TrainingRefused`` when what is loaded cannot be trained on.  A host
that lets its other work (generations) run between training steps says how often
(``yield_interval``), whether any is waiting, and hands its lock over (``yield_lock``); see
interleave.py.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..live import LiveRegistry
from .errors import JobConflict
from .model import TrainableModel

if TYPE_CHECKING:  # for the hints only: jobs.py imports this module
    from .config import TrainConfig
    from .job import Job


class TrainingRefused(JobConflict):
    """The host cannot train on what is loaded (no model, --lowvram, fp8, a refiner ...)."""


class TrainingHost:
    """What the runner needs from the program it runs in.  Every hook has a harmless default."""

    name = "host"

    def lock(self) -> contextlib.AbstractContextManager:
        """Held for the whole training; a lock that serialises all work on the model."""
        return contextlib.nullcontext()

    def family(self) -> str | None:
        """The loaded model's family (for presets); None if nothing usable is loaded."""
        return None

    def check(self) -> None:
        """Raise ``TrainingRefused`` when the loaded model cannot be trained on (called before queuing)."""

    def check_config(self, config: TrainConfig) -> None:
        """Raise ``RequestError`` for a setting this host cannot run with (or that contradicts what is
        loaded); called when a request is validated or queued, so it is refused before the lock."""

    def build_model(self, job: Job) -> TrainableModel:
        """The loaded model as a TrainableModel; called with the lock held. May raise TrainingRefused."""
        raise TrainingRefused("this host has no model to train on")

    def output_dir(self) -> Path:
        """Where LoRA files are written (and where state files are looked up for resuming)."""
        raise NotImplementedError

    def dataset_roots(self) -> list[Path] | None:
        """The folders remote (API) requests may read datasets from; None: anywhere."""
        return None

    def samples_dir(self, job: Job) -> Path:
        return self.output_dir() / "samples" / job.name

    def begin(self, job: Job) -> None:
        """The lock is held and training starts."""

    def progress(self, job: Job) -> None:
        """After every step (and after sample images)."""

    def samples(self, job: Job, images: list) -> None:
        """New sample images were saved."""

    def interrupted(self) -> bool:
        """The host's own "interrupt" was pressed: the job stops and saves."""
        return False

    def end(self, job: Job) -> None:
        """Training ended (any way); the lock is still held."""

    def file_saved(self, job: Job, path: Path) -> None:
        """A LoRA file was written (a step save, a kept state, the final file)."""

    # generations between steps (interleave.py) -------------------------------------------------------
    def live_registry(self) -> LiveRegistry | None:
        """Where the job offers its weights as ``NAME@live`` to generations; None: nowhere."""
        return None

    def yield_interval(self) -> float | None:
        """Seconds of training between two chances for waiting work to run; None: never (training only)."""
        return None

    def generation_waiting(self) -> bool:
        """Some work waits for the lock (asked at step boundaries, so it must be cheap)."""
        return False

    def yield_lock(self, job: Job) -> None:
        """Called holding the lock, with the model as loaded: let the waiting work have the lock, take it
        back, and leave the model as it was loaded (e.g. restore LoRAs a generation merged)."""
        lock = self.lock()
        release, acquire = getattr(lock, "release", None), getattr(lock, "acquire", None)
        if callable(release) and callable(acquire):
            release()
            acquire()

    def after(self, job: Job) -> None:
        """The lock is released: refresh the LoRA list so the new file shows up."""

    def log(self, message: str) -> None:
        print(f"[LoRA Workshop] {message}", flush=True)
