"""Training jobs: one at a time, in a background thread, under the host's model lock.

Host-agnostic: a host (the WebUI, tests) subclasses ``TrainingHost`` to say which lock
serialises work on the model, how to wrap its loaded model as a ``TrainableModel``, where
LoRAs go, and how progress is shown.  ``JobRunner`` turns a JSON-style request into a
``TrainConfig``, validates it *before* anything starts (so an API can answer 400 with the
dataset problem named), then trains in a thread:

    (the request and the dataset are checked before ``start`` returns: errors are raised, no job)
    queued     -> waiting for the host's lock (a generation in progress finishes first)
    validating -> the lock is held: the loaded model is checked and wrapped, its fingerprint taken
    running    -> training; progress mirrored to the host after every step
    saving     -> the last step is done (or "stop & save" was asked); the file is being written
    finished | stopped | failed

The lock is held for the whole run, so any generation requested meanwhile waits until the
job ends (the WebUI shows it as queued).  After the job, whatever its end, the host
refreshes its LoRA list and the model is checked to be exactly as before.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import time
import traceback
import types
import typing
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..library import TRAINING_STATE_SUFFIX as STATE_SUFFIX
from .dataset import DatasetConfig, DatasetError, Problem, validate
from .model import TrainableModel
from .network import NetworkConfig
from .options import OptionError
from .outputs import check_output_name
from .trainer import Callbacks, Progress, TrainConfig, Trainer

STATES = ("queued", "validating", "running", "saving", "finished", "stopped", "failed")
ACTIVE = ("queued", "validating", "running", "saving")

# -- presets ---------------------------------------------------------------------------------------
# Starting points after kohya-ss/sd-scripts' documentation for LoRA on SD1.5 and SDXL.  Keys are
# request keys (see ``build_config``); anything given explicitly in a request wins.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": {
        "dataset": {"resolution": 512, "enable_buckets": True, "min_bucket_reso": 256, "max_bucket_reso": 1024,
                    "bucket_reso_steps": 64},
        "network": {"rank": 32, "alpha": 16, "train_unet": True, "train_text_encoder": True},
        "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "optimizer": "AdamW", "lr_scheduler": "cosine",
        "lr_warmup_steps": 0, "batch_size": 1, "max_train_epochs": 10, "save_every_n_epochs": 0,
        "save_precision": "fp16", "mixed_precision": "auto", "min_snr_gamma": 5.0, "noise_offset": 0.0,
        "cache_latents": True, "cache_text_encoder_outputs": True, "seed": 42,
    },
    "sdxl": {
        "dataset": {"resolution": 1024, "enable_buckets": True, "min_bucket_reso": 512, "max_bucket_reso": 2048,
                    "bucket_reso_steps": 64},
        "network": {"rank": 32, "alpha": 16, "train_unet": True, "train_text_encoder": False},
        "learning_rate": 1e-4, "text_encoder_lr": None, "optimizer": "AdamW", "lr_scheduler": "cosine",
        "lr_warmup_steps": 0, "batch_size": 1, "max_train_epochs": 10, "save_every_n_epochs": 0,
        "save_precision": "fp16", "mixed_precision": "auto", "min_snr_gamma": 5.0, "noise_offset": 0.0,
        "cache_latents": True, "cache_text_encoder_outputs": True, "seed": 42,
    },
}
PRESET_LABELS = {"sd15": "SD1.5 (512, rank 32/16, TE on)", "sdxl": "SDXL (1024, rank 32/16, UNet only)"}


def preset_for_family(family: str | None) -> str:
    return "sdxl" if family == "sdxl" else "sd15"


# -- errors ------------------------------------------------------------------------------------------


class JobError(Exception):
    """Base class; ``status`` is the HTTP status an API should answer with."""
    status = 400


class RequestError(JobError):
    """The request itself is wrong (unknown option, bad value, bad path or name)."""
    status = 400


class JobConflict(JobError):
    """Cannot start now: a job is running, the output exists, or the host refuses its model."""
    status = 409


class TrainingRefused(JobConflict):
    """The host cannot train on what is loaded (no model, --lowvram, fp8, a refiner ...)."""


class JobNotFound(JobError, LookupError):
    status = 404


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``, for statuses (tracebacks go to the console)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (JobError, DatasetError)):
        return msg or type(e).__name__
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# -- the host --------------------------------------------------------------------------------------------


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

    def build_model(self, job: "Job") -> TrainableModel:
        """The loaded model as a TrainableModel; called with the lock held. May raise TrainingRefused."""
        raise TrainingRefused("this host has no model to train on")

    def output_dir(self) -> Path:
        """Where LoRA files are written (and where state files are looked up for resuming)."""
        raise NotImplementedError

    def dataset_roots(self) -> list[Path] | None:
        """The folders remote (API) requests may read datasets from; None: anywhere."""
        return None

    def samples_dir(self, job: "Job") -> Path:
        return self.output_dir() / "samples" / job.name

    def begin(self, job: "Job") -> None:
        """The lock is held and training starts."""

    def progress(self, job: "Job") -> None:
        """After every step (and after sample images)."""

    def samples(self, job: "Job", images: list) -> None:
        """New sample images were saved."""

    def interrupted(self) -> bool:
        """The host's own "interrupt" was pressed: the job stops and saves."""
        return False

    def end(self, job: "Job") -> None:
        """Training ended (any way); the lock is still held."""

    def after(self, job: "Job") -> None:
        """The lock is released: refresh the LoRA list so the new file shows up."""

    def log(self, message: str) -> None:
        print(f"[LoRA Workshop] {message}", flush=True)


# -- requests -> TrainConfig ---------------------------------------------------------------------------

_TOP_EXCLUDED = {"dataset", "network", "output_dir", "world_size"}
_EXTRA_TOP = {"preset", "resume_from"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Make JSON/gradio values fit a dataclass field (gradio numbers are floats, paths are str)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise RequestError(f"{where}: a value is required")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(where, a, value)
            except RequestError as e:
                errors.append(str(e))
        raise RequestError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise RequestError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RequestError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())
        raise RequestError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RequestError(f"{where}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise RequestError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise RequestError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise RequestError(f"{where}: expected a folder path, got {value!r}")
        return Path(str(value).strip())
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RequestError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(where, a, v) for a, v in zip(args, value))
    if origin is list:
        if isinstance(value, str):  # one per line (a textbox)
            value = [line for line in value.splitlines() if line.strip()]
        if not isinstance(value, (list, tuple)):
            raise RequestError(f"{where}: expected a list, got {value!r}")
        return [_coerce(where, args[0], v) for v in value] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RequestError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    return value


def _fields(cls, data: dict, where: str, skip: set[str] = frozenset()) -> dict:
    if not isinstance(data, dict):
        raise RequestError(f"{where}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    out = {}
    for key, value in data.items():
        if key not in names:
            raise RequestError(f"unknown option '{where}.{key}'" if where else f"unknown option '{key}'")
        out[key] = _coerce(f"{where}.{key}" if where else key, hints[key], value)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k in ("dataset", "network"):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _dataset_dir(value: Any, where: str, roots: list[Path] | None) -> Path:
    if not isinstance(value, (str, Path)):
        raise RequestError(f"{where}: expected a folder path, got {value!r}")
    path = Path(str(value)).expanduser()
    if roots is not None and not _inside(path, roots):
        # checked before existence, so a refusal says nothing about folders outside the roots
        raise RequestError(f"{where}: {value} is outside the dataset folders this server may read "
                           f"(add its parent folder to the setting that lists them)")
    if not path.is_dir():
        raise RequestError(f"{where}: dataset folder not found: {value}")
    return path


def resolve_state_file(value: Any, output_dir: Path) -> Path:
    """A ``*.state.safetensors`` file inside the LoRA folder, by name relative to it."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError("resume_from: expected the name of a .state.safetensors file in the LoRA folder")
    name = value.strip().replace("\\", "/")
    root = Path(output_dir).resolve()
    path = (root / name).resolve()
    if not name.endswith(STATE_SUFFIX) or root not in path.parents:
        raise RequestError(f"resume_from {value!r}: must name a {STATE_SUFFIX} file inside the LoRA folder")
    if not path.is_file():
        raise RequestError(f"resume_from: state file not found: {name}")
    return path


def state_header(path: Path) -> dict:
    """step, session and TrainConfig (as a dict) of a training state file, read from its header only."""
    from ..fileio import LoraFileError
    from .state import read_state_header
    try:
        return read_state_header(path)
    except (LoraFileError, OSError) as e:
        raise RequestError(f"resume_from: cannot use {Path(path).name}: {e}") from None


def _inside(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real == r or r in real.parents for r in (Path(x).resolve() for x in roots))


@dataclass
class JobRequest:
    config: TrainConfig
    name: str
    resume_from: Path | None = None
    auto_precision: bool = False
    preset: str = "sd15"


def build_request(data: dict, output_dir: Path, family: str | None = None,
                  dataset_roots: list[Path] | None = None) -> JobRequest:
    """A JSON request -> validated JobRequest.  Keys:

    ``output_name`` (required unless resuming), ``preset`` ("auto" | "sd15" | "sdxl"),
    ``dataset`` {DatasetConfig fields; ``train_dir`` required}, ``network`` {NetworkConfig fields},
    any other TrainConfig field at the top level (``mixed_precision`` also takes "auto"),
    ``resume_from`` (a state file name in the LoRA folder: its stored settings are used, the
    request's keys override them).  ``output_dir`` cannot be chosen: it is the LoRA folder.
    ``dataset_roots``, when given, are the only folders the dataset paths may lie in.
    """
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = set(data) - ({f.name for f in dataclasses.fields(TrainConfig)} - _TOP_EXCLUDED) - _EXTRA_TOP \
        - {"dataset", "network"}
    if unknown:
        bad = sorted(unknown)[0]
        hint = " (output always goes to the LoRA folder; set output_name)" if bad == "output_dir" else ""
        raise RequestError(f"unknown option '{bad}'{hint}")
    for part in ("dataset", "network"):
        if part in data and not isinstance(data[part], dict):
            raise RequestError(f"{part}: expected an object, got {type(data[part]).__name__}")
    resume = None
    if data.get("resume_from") not in (None, ""):
        resume = resolve_state_file(data["resume_from"], output_dir)
        stored = state_header(resume)["config"]
        base = {k: v for k, v in stored.items() if k not in _TOP_EXCLUDED}
        for part in ("dataset", "network"):
            if not isinstance(stored.get(part) or {}, dict):
                raise RequestError(f"resume_from: {resume.name} holds a damaged {part} configuration")
            base[part] = dict(stored.get(part) or {})
        preset = "resume"
    else:
        preset = data.get("preset") or "auto"
        if not isinstance(preset, str):
            raise RequestError(f"preset: expected one of auto, {', '.join(PRESETS)}, got {preset!r}")
        if preset == "auto":
            preset = preset_for_family(family)
        if preset not in PRESETS:
            raise RequestError(f"preset {preset!r}: choose one of auto, {', '.join(PRESETS)}")
        base = json.loads(json.dumps(PRESETS[preset]))
    merged = _merge(base, {k: v for k, v in data.items() if k not in _EXTRA_TOP})
    if data.get("max_train_steps") is not None and "max_train_epochs" not in data:
        # a length in steps replaces the preset's (or the resumed run's) length in epochs, which
        # would otherwise win (kohya's rule when both are set)
        merged["max_train_epochs"] = None

    ds_data = dict(merged.get("dataset") or {})
    if not ds_data.get("train_dir"):
        raise RequestError("dataset.train_dir is required: the folder holding '<repeats>_<trigger>' sub-folders")
    ds_data["train_dir"] = str(_dataset_dir(ds_data["train_dir"], "dataset.train_dir", dataset_roots))
    if ds_data.get("reg_dir") not in (None, ""):
        ds_data["reg_dir"] = str(_dataset_dir(ds_data["reg_dir"], "dataset.reg_dir", dataset_roots))
    else:
        ds_data["reg_dir"] = None
    if isinstance(ds_data.get("resolution"), list):
        ds_data["resolution"] = tuple(ds_data["resolution"])
    ds_kwargs = _fields(DatasetConfig, ds_data, "dataset")
    net_kwargs = _fields(NetworkConfig, dict(merged.get("network") or {}), "network")

    top = {k: v for k, v in merged.items() if k not in ("dataset", "network")}
    try:
        name = check_output_name(top.get("output_name"))
    except OptionError as e:
        raise RequestError(str(e)) from None
    top["output_name"] = name
    auto = top.get("mixed_precision", "auto") in ("auto", None, "")
    if auto:
        top["mixed_precision"] = "no"  # resolved from the model's dtype once it is built
    top_kwargs = _fields(TrainConfig, top, "", skip=_TOP_EXCLUDED)
    try:
        dataset = DatasetConfig(**ds_kwargs)
        network = NetworkConfig(**net_kwargs)
        cfg = TrainConfig(dataset=dataset, network=network, output_dir=Path(output_dir), **top_kwargs)
    except (TypeError, ValueError) as e:
        raise RequestError(one_line(e) if not isinstance(e, DatasetError) else str(e)) from None
    if not (network.train_unet or network.train_text_encoder):
        raise RequestError("network: train_unet and train_text_encoder are both off: nothing to train")
    return JobRequest(cfg, name, resume, auto, preset)


def precision_for(model: TrainableModel) -> str:
    """"auto" mixed precision: the UNet's own half type on CUDA, else full precision."""
    if model.device.type != "cuda":
        return "no"
    dtype = next(model.unet.parameters()).dtype
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


# -- model check -------------------------------------------------------------------------------------


def _checksum(t: torch.Tensor) -> tuple[int, int]:
    """Two sums over the tensor's bit pattern (plain and position-weighted): any write shows."""
    t = t.detach()
    n = t.numel()
    if n == 0:
        return (0, 0)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = t.contiguous().reshape(-1).view(ints).to(torch.int64)
    weights = torch.arange(n, device=bits.device, dtype=torch.int64) % 65521 + 1
    return int(bits.sum()), int((bits * weights).sum())


def model_fingerprint(model: TrainableModel) -> list:
    """Identity, storage, version counter and a checksum of every parameter and buffer, plus hook counts."""
    out = []
    roots = [("unet", model.unet)] + [(p, m) for p, m in model.text_encoders]
    with torch.no_grad():
        for label, root in roots:
            for name, t in list(root.named_parameters()) + list(root.named_buffers()):
                out.append((label, name, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape),
                            bool(getattr(t, "requires_grad", False)), _checksum(t)))
            hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())
            modes = tuple(m.training for m in root.modules())
            out.append((label, "<hooks/modes>", hooks, hash(modes)))
    return out


# -- jobs ---------------------------------------------------------------------------------------------


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
    def __init__(self, request: JobRequest, trainer: Trainer, summary: dict):
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.name = request.name
        self.config = request.config
        self.trainer = trainer
        self.summary = summary
        self.state = "queued"
        self.step = 0
        self.total = trainer.total_steps()
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
        self._lock = threading.RLock()
        self._done = threading.Event()
        self.thread: threading.Thread | None = None
        self.begun = False  # host.begin() was called (so host.end() is due)

    # -- control -----------------------------------------------------------------------------
    def request_stop(self, save: bool = False) -> None:
        with self._lock:
            if self.state not in ACTIVE:
                return
            if self.stop_requested != "save":  # "stop & save" is never downgraded to "stop"
                self.stop_requested = "save" if save else "stop"
            if self.stop_requested == "save" and self.state == "running":
                self.state = "saving"  # after the current step, the file is written
            self.trainer.request_stop(save=self.stop_requested == "save")
            self.log(f"stop requested{' (saving first)' if self.stop_requested == 'save' else ''}")

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

    def _set(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, v)

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
                candidate = Trainer.state_path(self.saved[-1])
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
            trainer = Trainer(None, req.config)  # the model is attached once the lock is held
            try:
                summary = trainer.prepare(req.resume_from)  # dataset (DatasetError names the file), output names
            except FileExistsError as e:
                raise JobConflict(str(e)) from None
            job = Job(req, trainer, summary)
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].active:
                    break
                del self._jobs[oldest]
            job.state = "queued"
            job.log(f"queued: {req.name} ({job.total} steps, {summary['train_images']} images"
                    f"{', resuming ' + req.resume_from.name if req.resume_from else ''})")
            job.thread = threading.Thread(target=self._work, args=(job,), name=f"lora-workshop-train-{job.id}",
                                          daemon=True)
            job.thread.start()
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
    def _callbacks(self, job: Job) -> Callbacks:
        host = self.host

        def on_progress(p: Progress) -> None:
            with job._lock:
                job.step, job.total, job.epoch = p.step, p.total, p.epoch
                job.loss, job.avg_loss, job.lr = p.loss, p.avg_loss, p.lr
                job.elapsed, job.eta = p.elapsed, p.eta
                job.losses.append(p.loss)
                if job.stop_requested == "save" or p.step >= p.total:
                    job.state = "saving"
            if host.interrupted() and job.stop_requested is None:
                job.log("interrupted by the host: stopping and saving")
                job.request_stop(save=True)
            host.progress(job)

        def on_saved(path: Path) -> None:
            with job._lock:
                job.saved.append(Path(path))

        def on_samples(step: int, images: list) -> None:
            if not images:
                return
            folder = host.samples_dir(job)
            folder.mkdir(parents=True, exist_ok=True)
            prompts = job.config.sample_prompts
            for i, img in enumerate(images):
                path = folder / f"{job.name}-{step:06d}-{i:02d}.png"
                img.save(path)
                with job._lock:
                    job.samples.append({"step": step, "prompt": prompts[i] if i < len(prompts) else "",
                                        "path": path})
            job.log(f"step {step}: {len(images)} sample image(s) in {folder}")
            host.samples(job, images)
            host.progress(job)

        def log(line: str) -> None:
            job.log(line)
            host.log(line)

        return Callbacks(on_progress=on_progress, on_saved=on_saved, on_samples=on_samples, log=log)

    def _work(self, job: Job) -> None:
        host = self.host
        try:
            with host.lock():
                try:
                    self._train(job)
                finally:
                    if job.begun:
                        try:
                            host.end(job)
                        except Exception as e:  # noqa: BLE001
                            host.log(f"ending the job's progress display failed: {one_line(e)}")
        except BaseException as e:  # noqa: BLE001 - reported in the status, never raised from a thread
            job._set(state="failed", error=one_line(e))
            job.log(f"failed: {one_line(e)}")
            host.log(f"training {job.name} failed:\n{traceback.format_exc()}")
        finally:
            job.trainer.model = None  # finished jobs are kept for their status: never keep a model alive
            job._set(finished_at=time.time())
            try:
                host.after(job)
            except Exception as e:  # noqa: BLE001
                job.log(f"refreshing the LoRA list failed: {one_line(e)}")
            job._done.set()

    def _train(self, job: Job) -> None:
        host = self.host
        if job.stop_requested:
            job._set(state="stopped")
            job.log("stopped before it started")
            return
        job._set(state="validating", started_at=time.time())  # the lock is ours: check and wrap the model
        model = host.build_model(job)
        job.trainer.model = model
        if job.request.auto_precision:
            job.config.mixed_precision = precision_for(model)
        job.trainer.cb = self._callbacks(job)
        before = model_fingerprint(model)
        host.begin(job)
        job.begun = True
        job._set(state="running")
        job.log(f"training {job.name} on {model.model_name or model.family} ({model.family}, "
                f"{model.device}, mixed precision {job.config.mixed_precision})")
        try:
            result = job.trainer.run(resume_from=job.request.resume_from)
        finally:
            untouched = model_fingerprint(model) == before
            job._set(model_untouched=untouched)
            if not untouched:
                job.log("ERROR: the model's weights or modules changed during training; reload the checkpoint")
                host.log(f"the model changed while training {job.name}; reload the checkpoint")
        with job._lock:
            job.output = result.output
            job.step = result.steps
            job.state = "stopped" if result.stopped else "finished"
        if result.stopped:
            job.log(f"stopped at step {result.steps}" + (f"; saved {result.output.name}" if result.output else
                                                         " (nothing saved)"))
        else:
            job.log(f"finished: {result.output.name}")
