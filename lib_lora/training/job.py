"""One training run's record: what was asked, where it stands, and what it wrote (``Job``).

The ``JobRunner`` (jobs.py) makes it and its worker thread moves it along; every change goes through
one of its own methods, under its lock, because the tab and the API read it from other threads:

    (the request and the dataset are checked before ``start`` returns: errors are raised, no job)
    queued     -> waiting for the host's lock (a generation in progress finishes first)
    validating -> the lock is held: the loaded model is checked and wrapped, its fingerprint taken
    running    -> training; progress mirrored to the host after every step; ``paused`` while the
                  host's lock is lent to a generation between two steps (interleave.py)
    saving     -> the last step is done (or "stop & save" was asked); the file is being written
    finished | stopped | failed
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from ..live import live_name
from .errors import JobConflict, one_line
from .interleave import KeepRequest
from .plan import Plan
from .request import JobRequest
from .state import state_path

if TYPE_CHECKING:  # hints only
    from .trainer import Progress, Trainer, TrainResult

ACTIVE = ("queued", "validating", "running", "saving")


def downsample(values: list[float], max_points: int = 200, first_step: int = 1) -> list[list[float]]:
    """[[step, mean loss], ...] with at most ``max_points`` points (bucket means)."""
    n = len(values)
    if n == 0:
        return []
    if n <= max_points:
        return [[first_step + i, float(v)] for i, v in enumerate(values)]
    size = n / max_points
    out = []
    for b in range(max_points):
        lo, hi = int(b * size), max(int((b + 1) * size), int(b * size) + 1)
        chunk = values[lo:hi]
        out.append([first_step + hi - 1, float(sum(chunk) / len(chunk))])
    return out


class Job:
    """One training run's record: what was asked, where it stands, and what it wrote.

    Every change goes through a method below, under the job's lock, because the status is read
    from other threads (the tab, the API) while the worker writes it."""

    def __init__(self, request: JobRequest, plan: Plan):
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.name = request.name
        self.config = request.config
        self.plan = plan
        self.trainer: Trainer | None = None  # made once the lock is held and the model is built
        self.summary = plan.summary
        self.state = "queued"
        self.step = 0
        self.total = plan.total_steps
        self.epoch = 0
        self.loss: float | None = None
        self.avg_loss: float | None = None
        self.lr: float | None = None
        self.elapsed = 0.0
        self.eta: float | None = None
        self.losses: list[float] = []
        self.samples: list[dict] = []
        self.saved: list[Path] = []
        self.output: Path | None = None
        self.error: str | None = None
        self.model_untouched: bool | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.logs: deque[str] = deque(maxlen=300)
        self.stop_requested: str | None = None   # None, "stop" or "save"
        self.paused = False                       # the lock is lent to a generation between two steps
        self.pauses = 0
        self.time_paused = 0.0                    # seconds training stood still for generations
        self._keeps: list[KeepRequest] = []
        self._lock = threading.RLock()
        self._done = threading.Event()

    # -- control -----------------------------------------------------------------------------
    def request_stop(self, save: bool = False) -> None:
        with self._lock:
            if self.state not in ACTIVE:
                return
            if self.stop_requested != "save":  # "stop & save" is never downgraded to "stop"
                self.stop_requested = "save" if save else "stop"
            if self.stop_requested == "save" and self.state == "running":
                self.state = "saving"  # after the current step, the file is written
            if self.trainer is not None:
                self.trainer.request_stop(save=self.stop_requested == "save")
            self.log(f"stop requested{' (saving first)' if self.stop_requested == 'save' else ''}")

    def request_keep(self) -> KeepRequest:
        """Save the weights at the next step boundary as a normal file; the job goes on."""
        with self._lock:
            if self.state in ("queued", "validating"):
                raise JobConflict(f"{self.name} has not started training yet: nothing to keep")
            if self.state not in ("running",) or self.stop_requested:
                raise JobConflict(f"{self.name} is {self.stop_requested and 'stopping' or self.state}: "
                                  "its weights are saved as it ends, if at all")
            r = KeepRequest()
            self._keeps.append(r)
        self.log("keep this state: requested")
        return r

    def take_keep_requests(self) -> list[KeepRequest]:
        with self._lock:
            out, self._keeps = self._keeps, []
            return out

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def log(self, line: str) -> None:
        with self._lock:
            stamp = time.strftime("%H:%M:%S")
            for part in str(line).splitlines() or [""]:
                self.logs.append(f"{stamp} {part}")

    def sample_paths(self) -> list[Path]:
        """Files of the sample images so far, in order (index n is sample n of the status)."""
        with self._lock:
            return [Path(s["path"]) for s in self.samples]

    # -- transitions (the runner's worker thread) ---------------------------------------------
    def stop_before_start(self) -> bool:
        """A stop asked while queued: the job ends as stopped without touching the model."""
        with self._lock:
            if not self.stop_requested:
                return False
            self.state = "stopped"
        self.log("stopped before it started")
        return True

    def validating(self) -> None:
        """The host's lock is held: the model is being checked and wrapped."""
        with self._lock:
            self.state, self.started_at = "validating", time.time()

    def attach(self, plan: Plan, trainer: Trainer) -> None:
        """The trainer is built (``plan`` may have its precision resolved); a stop asked meanwhile reaches it."""
        with self._lock:
            self.plan, self.config, self.trainer = plan, plan.config, trainer
            if self.stop_requested:
                trainer.request_stop(save=self.stop_requested == "save")

    def running(self) -> None:
        with self._lock:
            self.state = "running"

    def progressed(self, p: Progress) -> None:
        with self._lock:
            self.step, self.total, self.epoch = p.step, p.total, p.epoch
            self.loss, self.avg_loss, self.lr = p.loss, p.avg_loss, p.lr
            self.elapsed, self.eta = p.elapsed, p.eta
            self.losses.append(p.loss)
            if self.stop_requested == "save" or p.step >= p.total:
                self.state = "saving"

    def paused_for_generation(self) -> None:
        with self._lock:
            self.paused = True
            self.pauses += 1

    def resumed(self, seconds: float) -> None:
        with self._lock:
            self.paused = False
            self.time_paused += seconds
        self.log(f"step {self.step}: paused {seconds:.1f} s for generations; training goes on")

    def saved_file(self, path: Path) -> None:
        with self._lock:
            self.saved.append(Path(path))

    def sampled(self, step: int, prompt: str, path: Path) -> None:
        with self._lock:
            self.samples.append({"step": step, "prompt": prompt, "path": path})

    def checked_model(self, untouched: bool) -> None:
        with self._lock:
            self.model_untouched = untouched

    def finished(self, result: TrainResult) -> None:
        with self._lock:
            self.output = result.output
            self.step = result.steps
            self.state = "stopped" if result.stopped else "finished"
        if result.stopped:
            self.log(f"stopped at step {result.steps}" + (f"; saved {result.output.name}" if result.output else
                                                          " (nothing saved)"))
        else:
            self.log(f"finished: {result.output.name}")

    def failed(self, e: BaseException) -> None:
        with self._lock:
            self.state, self.error = "failed", one_line(e)
        self.log(f"failed: {one_line(e)}")

    def close(self) -> None:
        """The worker is done, whatever the end: the model is let go and waiters wake."""
        with self._lock:
            if self.trainer is not None:
                self.trainer.release()  # finished jobs are kept for their status: never keep a model alive
            self.finished_at = time.time()
            self.paused = False
            keeps, self._keeps = self._keeps, []
        for r in keeps:
            r.failed(f"{self.name} ended before its next step; nothing was kept"
                     + (f" (its file: {self.output.name})" if self.output else ""))

    def done(self) -> None:
        self._done.set()

    # -- reporting -------------------------------------------------------------------------------
    def textinfo(self) -> str:
        """One line: step, loss, lr, ETA (the host's progress text)."""
        with self._lock:
            parts = [f"LoRA Workshop: training {self.name}", f"step {self.step}/{self.total}",
                     f"epoch {self.epoch}"]
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4f} (avg {self.avg_loss:.4f})")
            if self.lr is not None:
                parts.append(f"lr {self.lr:.2e}")
            if self.eta is not None and self.state == "running":
                parts.append(f"ETA {format_seconds(self.eta)}")
            if self.state not in ("running",):
                parts.append(self.state)
            if self.paused:
                parts.append("paused for generation")
            if self.time_paused >= 0.05:
                parts.append(f"{format_seconds(self.time_paused)} lost to generations")
            return ", ".join(parts)

    def status(self, relative_to: Path | None = None, max_points: int = 200) -> dict:
        """JSON-ready status. With ``relative_to`` file paths are given relative to it (no absolute paths)."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            if relative_to is None:
                return str(p)
            try:
                return Path(p).resolve().relative_to(Path(relative_to).resolve()).as_posix()
            except ValueError:
                return Path(p).name

        with self._lock:
            first = self.step - len(self.losses) + 1
            state_file = None
            if self.config.save_state and self.saved:
                candidate = state_path(self.saved[-1])
                state_file = rel(candidate) if candidate.exists() else None
            return {
                "id": self.id,
                "name": self.name,
                "state": self.state,
                "step": self.step,
                "total": self.total,
                "epoch": self.epoch,
                "loss": self.loss,
                "avg_loss": self.avg_loss,
                "lr": self.lr,
                "elapsed": round(self.elapsed, 3),
                "eta": None if self.eta is None else round(self.eta, 3),
                "loss_history": downsample(self.losses, max_points, first_step=max(first, 1)),
                "samples": [{"index": i, "step": s["step"], "prompt": s["prompt"],
                             **({"path": str(s["path"])} if relative_to is None else {})}
                            for i, s in enumerate(self.samples)],
                "output": rel(self.output),
                "saved": [rel(p) for p in self.saved],
                "state_file": state_file,
                "resumed_from": rel(self.request.resume_from),
                "error": self.error,
                "model_untouched": self.model_untouched,
                "stop_requested": self.stop_requested,
                "paused": self.paused,          # lent to a generation between two steps ("paused for generation")
                "pauses": self.pauses,
                "time_paused": round(self.time_paused, 3),
                "live_name": live_name(self.name) if self.state in ACTIVE else None,
                "created_at": self.created_at,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "preset": self.request.preset,
                "mixed_precision": self.config.mixed_precision,
                "dataset": {k: self.summary.get(k) for k in ("train_images", "train_images_x_repeats", "reg_images_used",
                                                             "steps_per_epoch", "samples_per_epoch")},
                "log": list(self.logs),
            }


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
