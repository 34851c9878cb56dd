"""Training jobs: one at a time, in a background thread, under the host's model lock.

Host-agnostic: a host (the WebUI, tests) implements ``TrainingHost`` (host.py).  ``JobRunner``
turns a JSON-style request into a ``TrainConfig`` (request.py), validates it *before* anything
starts (so an API can answer 400 with the dataset problem named), then trains in a thread; each
run's record is a ``Job`` (job.py, with its states).

The lock is held for the whole run, except where the host lets waiting work (a generation) have
it between two steps (interleave.py): the job is then ``paused`` (still "running"), its weights
apply as ``NAME@live``, and the time lost is counted.  "Keep this state" saves the weights at the
next step boundary without stopping.  After the job, whatever its end, the host refreshes its
LoRA list and the model is checked to be exactly as before.
"""
from __future__ import annotations

import threading
import traceback
from pathlib import Path

import torch

from .errors import JobConflict, JobNotFound, one_line
from .fingerprint import model_fingerprint
from .host import TrainingHost
from .interleave import Interleaver
from .job import ACTIVE, Job, downsample, format_seconds
from .model import TrainableModel
from .plan import make_plan
from .problems import Problem
from .request import JobRequest, build_request
from .scan import validate
from .trainer import Callbacks, Progress, Trainer

__all__ = ["ACTIVE", "Job", "JobRunner", "downsample", "format_seconds", "precision_for"]  # the record's names too


def precision_for(model: TrainableModel) -> str:
    """"auto" mixed precision: the UNet's own half type on CUDA, else full precision."""
    if model.device.type != "cuda":
        return "no"
    dtype = next(model.unet.parameters()).dtype
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


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
        self.host.check_config(req.config)
        return validate(req.config.dataset, req.config.batch_size, req.config.pivotal_word)

    def start(self, data: dict | JobRequest, remote: bool = False) -> Job:
        """Validate (raising RequestError / DatasetError / JobConflict) and start in the background."""
        self._check_can_start()  # first: a running job or an unusable model is the answer whatever was asked
        req = data if isinstance(data, JobRequest) else self.request(data, remote)
        self.host.check_config(req.config)
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
