"""What a training run's caller gets: progress reports, callbacks, the run's boundaries between two steps, and
its result (``trainer.Trainer`` runs it)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from torch import Tensor

from .epochs import Position
from .mode import TrainingMode
from .network import TrainingNetwork
from .saves import save_contents

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class Progress:
    step: int
    total: int
    epoch: int
    loss: float
    avg_loss: float
    lr: float
    elapsed: float
    eta: float
    lrs: dict[str, float] = field(default_factory=dict)  # per parameter group: "unet", "text_encoder"


@dataclass
class Callbacks:
    on_progress: Callable[[Progress], None] | None = None
    on_saved: Callable[[Path], None] | None = None
    on_samples: Callable[[int, list], None] | None = None
    on_caching: Callable[[str, int, int], None] | None = None  # ("caching latents", done, total) before step 1
    log: Callable[[str], None] = print
    # after every optimiser step but the last, unless stopping: the run waits for it (see StepBoundary)
    between_steps: Callable[["StepBoundary"], None] | None = None


class StepBoundary:
    """A run between two optimiser steps: what ``Callbacks.between_steps`` may do there.

    Nothing of the run changes while the callback runs, so ``contents`` is exactly what a save at
    this step writes, and ``suspended`` hands the host its model as loaded (for a generation)
    and takes it back; training then continues as if nothing had happened, because all of its
    randomness is derived from (seed, step, ...) and none of its state lives in the model.
    """

    def __init__(self, trainer: "Trainer", mode: TrainingMode, net: TrainingNetwork, step: int, pos: Position,
                 losses: list[float], started: float, opt, sched):
        self.trainer, self.step = trainer, step
        self._mode, self._net, self._pos, self._losses = mode, net, pos, losses
        self._started, self._opt, self._sched = started, opt, sched

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The host's model exactly as loaded (no hook, flag or mode of ours) for the block; its time
        is left out of the run's elapsed time and ETA."""
        t0 = time.time()
        try:
            with self._mode.suspended():
                yield
        finally:
            self.trainer.paused_seconds += time.time() - t0

    def contents(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors (on their device) and metadata a save at this step writes."""
        t = self.trainer
        return save_contents(t.model, t.plan, self._net, t.session_id, self.step, t._step_epoch(self.step),
                             self._started, self._opt, t._ema, t._pivot)

    def keep(self) -> Path:
        """Save this step as kohya names a step save (``NAME-step00001234``, with its state file when the run
        saves states); the run goes on, and this file is never pruned."""
        t = self.trainer
        path = t.output_path(step=self.step)
        return t._save(self._net, path, t._step_epoch(self.step), self.step, self._pos, self._losses, self._started,
                       self._opt, self._sched)


@dataclass
class TrainResult:
    output: Path | None
    steps: int
    losses: list[float]
    stopped: bool
    saved: list[Path]
