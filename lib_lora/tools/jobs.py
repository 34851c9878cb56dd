"""Tool jobs: a tool run in a background thread for the API and the tab, with its progress and result.

A request names its files, never paths: LoRAs by their name in the host's library, checkpoints by
the host's list, and the output by a plain file name (training's rule, ``training.outputs``) that
goes into the LoRA folder (the checkpoint folder for ``bake``).  All of that is checked before
the job is queued, so a bad request is refused at once with a status: 400 a bad value, 404 a name
nothing answers to, 409 an output that exists (without ``force``), is an input, is a link, or is
another queued job's.  Jobs run one at a time, in order, in one worker thread; a tool that runs
SVDs (on the GPU when there is one) holds the host's model lock meanwhile, so it never runs
beside a generation or a training run, and reports its progress to the host (the WebUI's
progress bar) only then.  The job record holds state, progress (done/total, ETA), the output's
name relative to its folder, the log, and a one-line error that names its type
(``FamilyMismatchError: ...``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from ..library import AmbiguousName, LoraNotFound
from ..training.outputs import check_output_name
from . import progress
from .common import ToolError, check_output
from .merge import Spec, layer_weight, parse_spec
from .options import OUTPUT_KINDS, OptionError, Tool, coerce, tool

ACTIVE = ("queued", "running")
LOG_LINES = 500


class ToolJobError(Exception):
    """A request refused before it was queued; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class CheckpointNotFound(LookupError):
    pass


class JobStopped(Exception):
    """The job was asked to stop (the API's stop, the WebUI's Interrupt)."""


class ToolHost:
    """What a host gives tool jobs: its folders, the names it lists, and its model lock."""

    name = "host"

    def lora_dir(self) -> Path:
        raise NotImplementedError

    def checkpoint_dir(self) -> Path:
        raise NotImplementedError

    def loras(self) -> list[str]:
        """LoRA names for the tab's pickers."""
        return []

    def checkpoints(self) -> list[str]:
        """Checkpoint names for the tab's pickers."""
        return []

    def resolve_lora(self, name: str) -> Path:
        """The file of a library name; LoraNotFound or AmbiguousName otherwise."""
        raise NotImplementedError

    def resolve_checkpoint(self, name: str) -> Path:
        """The file of a checkpoint name; CheckpointNotFound otherwise."""
        raise NotImplementedError

    def lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # while a job holds the lock: the host's own progress display
    def begin(self, job: "ToolJob") -> None:
        pass

    def progress(self, job: "ToolJob") -> None:
        pass

    def end(self, job: "ToolJob") -> None:
        pass

    def interrupted(self) -> bool:
        return False

    def after(self, job: "ToolJob") -> None:
        """A job wrote its output: make it visible (library refresh, checkpoint list)."""

    def log(self, message: str) -> None:
        print(f"[LoRA Workshop] {message}")


@dataclasses.dataclass(eq=False)
class ToolJob:
    id: str
    tool: str
    values: dict[str, Any]          # what the tool runs with (files as paths)
    output: Path
    folder: Path                    # the output's folder: paths in answers are relative to it
    hidden: tuple[Path, ...] = ()   # folders whose absolute paths are cut from the log and errors
    state: str = "queued"           # queued, running, finished, failed, stopped
    stage: str = ""                 # what the running tool is doing ("merge", "bake", ...)
    done: int = 0
    total: int = 0
    eta: float | None = None
    error: str | None = None
    error_type: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stop_requested: bool = False
    lines: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    _ended: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def relative(self, text: str) -> str:
        for folder in self.hidden:
            text = text.replace(str(folder) + os.sep, "").replace(str(folder), ".")
        return text

    def log(self, line: str) -> None:
        self.lines.append(self.relative(str(line)))

    def fail(self, e: BaseException) -> None:
        first = (str(e).strip().splitlines() or [""])[0]
        self.error_type = type(e).__name__
        self.error = self.relative(f"{self.error_type}: {first}" if first else self.error_type)
        self.state = "stopped" if isinstance(e, JobStopped) else "failed"

    def request_stop(self) -> None:
        self.stop_requested = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def textinfo(self) -> str:
        eta = f", ETA {int(self.eta)} s" if self.eta is not None and self.state == "running" else ""
        return f"{self.tool} {self.output.name}: {self.stage or self.state} {self.done}/{self.total}{eta}"

    def status(self) -> dict[str, Any]:
        now = self.ended or time.time()
        return {"id": self.id, "tool": self.tool, "state": self.state, "stage": self.stage,
                "done": self.done, "total": self.total,
                "progress": self.done / self.total if self.total else (1.0 if self.state == "finished" else 0.0),
                "eta": self.eta if self.state == "running" else None,
                "elapsed": now - self.started if self.started else 0.0,
                "output": self.output.relative_to(self.folder).as_posix(),
                "error": self.error, "error_type": self.error_type, "log": list(self.lines)[-20:]}


class ToolRunner:
    """Queues tool jobs and runs them one at a time in a worker thread (started when there is work)."""

    def __init__(self, host: ToolHost, keep: int = 50):
        self.host, self.keep = host, keep
        self._jobs: dict[str, ToolJob] = {}
        self._pending: collections.deque[ToolJob] = collections.deque()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    # -- requests ------------------------------------------------------------------------------------
    def start(self, name: str, body: Any) -> ToolJob:
        """Check and resolve a request (ToolJobError otherwise) and queue it; returns the job at once."""
        try:
            t = tool(name)
        except KeyError as e:
            raise ToolJobError(404, str(e.args[0])) from None
        try:
            values = coerce(t, body)
            values, output, folder = self._resolve(t, values)
        except OptionError as e:
            raise ToolJobError(400, f"OptionError: {e}") from None
        except ToolError as e:
            raise ToolJobError(400, f"{type(e).__name__}: {e}") from None
        except (LoraNotFound, CheckpointNotFound) as e:
            raise ToolJobError(404, f"{type(e).__name__}: {e.args[0] if e.args else e}") from None
        except AmbiguousName as e:
            raise ToolJobError(409, f"AmbiguousName: {e}") from None
        hidden = tuple(sorted({self.host.lora_dir(), self.host.checkpoint_dir()}, key=lambda p: -len(str(p))))
        job = ToolJob(uuid.uuid4().hex[:12], t.name, values, output, folder, hidden)
        with self._lock:
            taken = next((j for j in self._jobs.values() if j.active and j.output == output), None)
            if taken is not None:
                raise ToolJobError(409, f"FileExistsError: {job.relative(str(output))} is the output of job "
                                        f"{taken.id} ({taken.tool}, {taken.state})")
            self._jobs[job.id] = job
            self._pending.append(job)
            self._prune()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="lora-workshop-tools", daemon=True)
                self._worker.start()
        job.log(f"queued {t.name} -> {job.status()['output']}")
        return job

    def get(self, job_id: str) -> ToolJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise ToolJobError(404, f"no tool job {job_id}")
        return job

    def jobs(self) -> list[ToolJob]:
        """Newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def latest(self) -> ToolJob | None:
        jobs = self.jobs()
        return jobs[0] if jobs else None

    def _prune(self) -> None:
        done = [j for j in sorted(self._jobs.values(), key=lambda j: j.created) if not j.active]
        for j in done[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[j.id]

    # -- names -> files --------------------------------------------------------------------------------
    def _resolve(self, t: Tool, values: dict[str, Any]) -> tuple[dict[str, Any], Path, Path]:
        out = dict(values)
        inputs: list[Path] = []
        for o in t.options:
            v = values.get(o.name)
            if v is None or not o.kind or o.kind in OUTPUT_KINDS:
                continue
            if o.kind == "lora":
                out[o.name] = self.host.resolve_lora(v)
                inputs.append(out[o.name])
            elif o.kind == "checkpoint":
                out[o.name] = self.host.resolve_checkpoint(v)
                inputs.append(out[o.name])
            else:  # loras
                out[o.name] = [self._spec(item, o.name) for item in v]
                inputs += [s.path for s in out[o.name]]
        o = next(o for o in t.options if o.kind in OUTPUT_KINDS)
        folder = self.host.lora_dir() if o.kind == "output" else self.host.checkpoint_dir()
        path = folder / f"{check_output_name(values[o.name], o.name)}.safetensors"
        if path.is_symlink():
            raise ToolJobError(409, f"{o.name}: {path.name} is a link in the {_what(o.kind)} folder; outputs are "
                                    "never written through links: choose another name")
        try:
            check_output(path, inputs, bool(values.get("force")))
        except ToolError as e:
            raise ToolJobError(409, f"ToolError: {path.name}: the output would overwrite an input") from e
        except (FileExistsError, IsADirectoryError) as e:
            raise ToolJobError(409, f"{type(e).__name__}: {path.name} exists in the {_what(o.kind)} folder; "
                                    "set force to replace it") from e
        out[o.name] = path
        return out, path, folder

    def _spec(self, item: Any, option: str) -> Spec:
        """A weighted LoRA: "NAME[:te[:unet[:dyn]]]" (items like "te=0.5", "lbw=...") or
        {"name", "weight" | "te"/"unet", "dyn", "lbw"}."""
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"name", "weight", "te", "unet", "dyn", "lbw"})
            if unknown or not isinstance(item.get("name"), str):
                raise OptionError(option, f"each LoRA is a string or an object with a name and weight, te, unet, "
                                          f"dyn, lbw (got {unknown[0] + ' in ' if unknown else ''}{item!r})")
            for k in ("weight", "te", "unet", "dyn"):
                if k in item and (isinstance(item[k], bool) or not isinstance(item[k], (int, float))):
                    raise OptionError(option, f"{item['name']}: {k} must be a number (got {item[k]!r})")
            parts = [item["name"]] + ([repr(item["weight"])] if "weight" in item else [])
            parts += [f"{k}={item[k]!r}" if k != "lbw" else f"lbw={item[k]}"
                      for k in ("te", "unet", "dyn", "lbw") if k in item]
            text = ":".join(str(p) for p in parts)
        elif isinstance(item, str) and item.strip():
            text = item.strip()
        else:
            raise OptionError(option, f"each LoRA is a string or an object with a name (got {item!r})")
        spec = parse_spec(text)
        layer_weight(spec)  # unknown items are refused now, not after the job started
        return dataclasses.replace(spec, path=self.host.resolve_lora(str(spec.path)))

    # -- the worker ----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                job = self._pending.popleft()
            self._run(job)

    def _run(self, job: ToolJob) -> None:
        """Run ``job``; its final state is set last, once the lock is released and the lists are refreshed,
        so whoever sees "finished" also sees the new file listed."""
        t = tool(job.tool)
        done = False
        try:
            if job.stop_requested:
                raise JobStopped("stopped before it started")
            job.stage = "waiting for the model (a generation or training is running)" if t.uses_gpu else ""
            with self._holding(t, job) as locked:
                job.state, job.started, job.stage = "running", time.time(), t.name
                with progress.observe(lambda bar: self._on_bar(job, bar, locked)):
                    t.run(job.values, log=job.log)
                done, job.stage, job.eta = True, "finished", None
        except Exception as e:  # the job's error, for its status; the worker goes on with the next job
            job.fail(e)
            self.host.log(f"{t.name} {job.output.name}: {job.error}")
        finally:
            job.ended, job.eta = time.time(), None
            if job.state in ACTIVE and not done:  # not an Exception: the thread is being torn down
                job.state, job.error = "failed", job.error or "interrupted"
        if done:
            try:
                self.host.after(job)
            except Exception as e:  # the file is written; only the listing is stale
                job.log(f"could not refresh the lists: {e}")
                self.host.log(f"refresh after {t.name}: {e}")
            job.state = "finished"
        job._ended.set()

    @contextlib.contextmanager
    def _holding(self, t: Tool, job: ToolJob) -> Iterator[bool]:
        if not t.uses_gpu:
            yield False
            return
        with self.host.lock():
            self.host.begin(job)
            try:
                yield True
            finally:
                self.host.end(job)

    def _on_bar(self, job: ToolJob, bar: progress.Progress, locked: bool) -> None:
        job.stage, job.done, job.total, job.eta = bar.label or job.tool, bar.done, bar.total, bar.eta()
        if job.stop_requested or (locked and self.host.interrupted()):
            raise JobStopped("stopped on request")
        if locked:
            self.host.progress(job)


def _what(kind: str) -> str:
    return "checkpoint" if kind == "checkpoint_output" else "LoRA"
