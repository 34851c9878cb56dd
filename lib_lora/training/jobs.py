"""Training jobs: one at a time, in a background thread, under the host's model lock.

Host-agnostic: a host (the WebUI, tests) implements ``TrainingHost`` (host.py).  ``JobRunner``
turns a JSON-style request into a ``TrainConfig`` (request.py), validates it *before* anything
starts (so an API can answer 400 with the dataset problem named), then trains in a thread.  A
``Job`` is the record of one run; only its own methods change it:

    (the request and the dataset are checked before ``start`` returns: errors are raised, no job)
    queued     -> waiting for the host's lock (a generation in progress finishes first)
    validating -> the lock is held: the loaded model is checked and wrapped, its fingerprint taken
    running    -> training; progress mirrored to the host after every step
    saving     -> the last step is done (or "stop & save" was asked); the file is being written
    finished | stopped | failed

The lock is held for the whole run, except where the host lets waiting work (a generation) have
it between two steps (interleave.py): the job is then ``paused`` (still "running"), its weights
apply as ``NAME@live``, and the time lost is counted.  "Keep this state" saves the weights at the
next step boundary without stopping.  After the job, whatever its end, the host refreshes its
LoRA list and the model is checked to be exactly as before.
"""
from __future__ import annotations

import math
import threading
import time
import traceback
import uuid
from collections import deque
from pathlib import Path

import torch

from ..live import live_name
from .errors import JobConflict, JobNotFound, one_line
from .fingerprint import model_fingerprint
from .host import TrainingHost
from .interleave import Interleaver, KeepRequest
from .model import TrainableModel
from .plan import Plan, make_plan
from .problems import Problem
from .request import JobRequest, build_request
from .scan import validate
from .state import state_path
from .trainer import Callbacks, Progress, Trainer, TrainResult

ACTIVE = ("queued", "validating", "running", "saving")


def precision_for(model: TrainableModel) -> str:
    """"auto" mixed precision: the UNet's own half type on CUDA, else full precision."""
    if model.device.type != "cuda":
        return "no"
    dtype = next(model.unet.parameters()).dtype
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


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


class JobRunner:
    """Starts, tracks and stops training jobs; at most one is active at a time."""

    def __init__(self, host: TrainingHost, keep: int = 20):
        self.host = host
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()

    # -- queries ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no training job with id {job_id!r}")
        return job

    def active(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.active), None)

    def latest(self) -> Job | None:
        with self._lock:
            return next(reversed(self._jobs.values()), None)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    # -- actions ------------------------------------------------------------------------------------
    def request(self, data: dict, remote: bool = False) -> JobRequest:
        """``remote``: the request came over the API, so its dataset must lie in the host's dataset roots."""
        roots = self.host.dataset_roots() if remote else None
        return build_request(data, self.host.output_dir(), self.host.family(), roots)

    def validate(self, data: dict, remote: bool = False) -> tuple[dict, list[Problem]]:
        """Dataset summary and every problem found (nothing is started)."""
        req = self.request(data, remote)
        return validate(req.config.dataset, req.config.batch_size)

    def start(self, data: dict | JobRequest, remote: bool = False) -> Job:
        """Validate (raising RequestError / DatasetError / JobConflict) and start in the background."""
        self._check_can_start()  # first: a running job or an unusable model is the answer whatever was asked
        req = data if isinstance(data, JobRequest) else self.request(data, remote)
        with self._lock:
            self._check_can_start()
            try:  # the dataset (DatasetError names the file) and every output name, before the lock
                plan = make_plan(req.config, req.resume_from, log=self.host.log)
            except FileExistsError as e:
                raise JobConflict(str(e)) from None
            summary = plan.summary
            job = Job(req, plan)
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].active:
                    break
                del self._jobs[oldest]
            job.log(f"queued: {req.name} ({job.total} steps, {summary['train_images']} images"
                    f"{', resuming ' + req.resume_from.name if req.resume_from else ''})")
            threading.Thread(target=self._work, args=(job,), name=f"lora-workshop-train-{job.id}",
                             daemon=True).start()
            return job

    def _check_can_start(self) -> None:
        running = self.active()
        if running is not None:
            raise JobConflict(f"a training job is already running: {running.name}")
        self.host.check()

    def stop(self, job_id: str, save: bool = False) -> Job:
        job = self.get(job_id)
        job.request_stop(save)
        return job

    def keep(self, job_id: str, timeout: float | None = None) -> Path:
        """Save the job's weights at its next step boundary (``NAME-step00001234.safetensors``) and return
        the file; raises JobConflict when the job cannot (not training, ended first, the file is not ours)."""
        return self.get(job_id).request_keep().wait(timeout)

    # -- the worker ------------------------------------------------------------------------------------
    def _callbacks(self, job: Job, interleaver: Interleaver) -> Callbacks:
        host = self.host

        def on_progress(p: Progress) -> None:
            job.progressed(p)
            if host.interrupted() and job.stop_requested is None:
                job.log("interrupted by the host: stopping and saving")
                job.request_stop(save=True)
            host.progress(job)

        def on_samples(step: int, images: list) -> None:
            if not images:
                return
            folder = host.samples_dir(job)
            folder.mkdir(parents=True, exist_ok=True)
            prompts = job.config.sample_prompts
            for i, img in enumerate(images):
                path = folder / f"{job.name}-{step:06d}-{i:02d}.png"
                img.save(path)
                job.sampled(step, prompts[i] if i < len(prompts) else "", path)
            job.log(f"step {step}: {len(images)} sample image(s) in {folder}")
            host.samples(job, images)
            host.progress(job)

        def log(line: str) -> None:
            job.log(line)
            host.log(line)

        def on_saved(path: Path) -> None:
            job.saved_file(path)
            host.file_saved(job, path)

        return Callbacks(on_progress=on_progress, on_saved=on_saved, on_samples=on_samples, log=log,
                         between_steps=interleaver.between_steps)

    def _work(self, job: Job) -> None:
        host = self.host
        try:
            with host.lock():
                self._train(job)
        except BaseException as e:  # noqa: BLE001 - reported in the status, never raised from a thread
            job.failed(e)
            host.log(f"training {job.name} failed:\n{traceback.format_exc()}")
        finally:
            job.close()
            try:
                host.after(job)
            except Exception as e:  # noqa: BLE001
                job.log(f"refreshing the LoRA list failed: {one_line(e)}")
            job.done()

    def _train(self, job: Job) -> None:
        host = self.host
        if job.stop_before_start():
            return
        job.validating()  # the lock is ours: check and wrap the model
        model = host.build_model(job)
        plan = job.plan.with_config(mixed_precision=precision_for(model)) if job.request.auto_precision else job.plan
        interleaver = Interleaver(job, host)
        trainer = Trainer(model, plan, self._callbacks(job, interleaver))
        job.attach(plan, trainer)
        before = model_fingerprint(model)
        host.begin(job)
        try:
            job.running()
            job.log(f"training {job.name} on {model.model_name or model.family} ({model.family}, "
                    f"{model.device}, mixed precision {job.config.mixed_precision})")
            try:
                with interleaver:
                    result = trainer.run()
            finally:
                untouched = model_fingerprint(model) == before
                job.checked_model(untouched)
                if not untouched:
                    job.log("ERROR: the model's weights or modules changed during training; reload the checkpoint")
                    host.log(f"the model changed while training {job.name}; reload the checkpoint")
            job.finished(result)
        finally:
            try:
                host.end(job)
            except Exception as e:  # noqa: BLE001
                host.log(f"ending the job's progress display failed: {one_line(e)}")
