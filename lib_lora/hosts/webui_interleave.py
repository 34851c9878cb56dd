"""Generations between training steps in the WebUI (v1.10.1): the queue lock lent and taken back.

A training job holds ``call_queue.queue_lock``, a ``fifo_lock.FIFOLock`` that grants the lock in
request order and keeps the waiters in ``_pending_threads``.  At a step boundary, when the
setting allows and a waiter exists, the job queues itself *behind* every current waiter and
releases: each of them (a txt2img from the UI or the API, a settings change, a tool job) runs,
then the job gets the lock back.  The WebUI's own code never changes for this.

Around that gap:

- ``shared.state`` is the generation's while it runs (so ``/sdapi/v1/progress`` and the progress
  bar show it); the job's progress is put back afterwards, with the generation's Interrupt
  cleared: interrupting a generation does not stop training.
- LoRAs the generation merged are restored and token merging is undone before training goes
  on, and the model must still be the one training started on.
- ``ModelGuard`` refuses, with a message naming the job, what would change the model under the
  job: loading another checkpoint or VAE (also through a request's ``override_settings``, a refiner
  or a hires checkpoint), unloading it, a precision change that reloads it (fp8, fp16 weight
  cache), and the WebUI's own embedding / hypernetwork training.  The WebUI reverts a setting
  whose change is refused this way and shows the error.
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable

from modules import shared

from . import webui_settings as settings
from .webui_host import WebUIHost

_FIELDS = ("job", "job_count", "job_no", "job_timestamp", "time_start", "textinfo", "sampling_step",
           "sampling_steps", "current_image", "id_live_preview")


def yield_interval(host: WebUIHost) -> float | None:
    """Seconds of training between chances for waiting generations; None: training only."""
    if host.option(settings.OPT_TRAIN_PRIORITY) == settings.TRAIN_PRIORITIES[1]:
        return None
    try:
        seconds = float(host.option(settings.OPT_TRAIN_YIELD_SECONDS))
    except (TypeError, ValueError):
        seconds = settings.DEFAULTS[settings.OPT_TRAIN_YIELD_SECONDS]
    return max(0.0, seconds) if seconds == seconds else settings.DEFAULTS[settings.OPT_TRAIN_YIELD_SECONDS]


def waiting(lock: Any) -> bool:
    """Someone waits for the WebUI's FIFO queue lock (False for a lock that does not say)."""
    return bool(getattr(lock, "_pending_threads", None))


def lend(lock: Any) -> None:
    """Called holding ``lock``: let everyone already waiting for it run, then hold it again.

    The FIFO lock wakes its first waiter on release; queuing our own turn behind the waiters
    first means no release/acquire race can take the lock back before they had it."""
    inner, pending, raw = (getattr(lock, a, None) for a in ("_inner_lock", "_pending_threads", "_lock"))
    if inner is None or pending is None or raw is None:
        lock.release()  # not the WebUI's FIFO lock: a plain hand-over, fair or not
        lock.acquire()
        return
    turn = threading.Event()
    with inner:
        pending.append(turn)
    lock.release()
    turn.wait()
    raw.acquire()


class Progress:
    """``shared.state``'s job fields, to put the job's progress back after a generation."""

    def __init__(self) -> None:
        st = shared.state
        self.values = {f: getattr(st, f, None) for f in _FIELDS}

    def put_back(self) -> None:
        st = shared.state
        for f, v in self.values.items():
            setattr(st, f, v)
        # what the generation's Interrupt / Skip set was meant for the generation
        st.interrupted = st.skipped = st.stopping_generation = False


# -- what would change the model under a job ----------------------------------------------------------


class ModelChangeRefused(RuntimeError):
    """Raised in place of a WebUI call that would change the model a job trains on."""


def _reload_changes_model(sd_model=None, info=None, forced_reload=False, **_: Any) -> bool:
    """Whether ``sd_models.reload_model_weights`` would load anything (it runs before every generation,
    and then loads nothing unless the checkpoint, its fp8 storage or a forced reload asks for it)."""
    if forced_reload:
        return True
    sd_models = sys.modules["modules.sd_models"]
    model = sd_model or getattr(getattr(sd_models, "model_data", None), "sd_model", None) \
        or getattr(shared, "sd_model", None)
    if model is None:
        return True
    wanted = info or sd_models.select_checkpoint()
    if getattr(model, "sd_model_checkpoint", None) != getattr(wanted, "filename", None):
        return True
    check_fp8, devices = getattr(sd_models, "check_fp8", None), sys.modules.get("modules.devices")
    return callable(check_fp8) and devices is not None and check_fp8(model) != getattr(devices, "fp8", False)


_UNSET = object()


def _vae_changes(sd_model=None, vae_file=_UNSET, *_, **__: Any) -> bool:
    """Whether ``sd_vae.reload_vae_weights`` would load another VAE (None is the checkpoint's own)."""
    sd_vae = sys.modules["modules.sd_vae"]
    if vae_file is _UNSET or vae_file is getattr(sd_vae, "unspecified", _UNSET):
        model = sd_model or shared.sd_model
        vae_file = sd_vae.resolve_vae(model.sd_checkpoint_info.filename).vae
    return vae_file != getattr(sd_vae, "loaded_vae_file", None)


def _always(*_: Any, **__: Any) -> bool:
    return True


def _keep_checkpoint_setting(sd_model=None, info=None, *_: Any, **__: Any) -> None:
    """A refused reload of the checkpoint the setting names: the setting names the loaded one again.

    The WebUI reverts a setting whose change failed only after its queued call let go of the lock,
    so a generation queued behind it would otherwise find the new value and be refused as well."""
    if info is not None:
        return
    model = sd_model or shared.sd_model
    title = getattr(getattr(model, "sd_checkpoint_info", None), "title", None)
    if title:
        shared.opts.sd_model_checkpoint = title


def _nothing(*_: Any, **__: Any) -> None:
    return None


_CHECKPOINT = "load another checkpoint"
_TRAINING = "start another training"
# (module, function, would it change the model?, what it would do, what to set back when refusing)
GUARDED: list[tuple[str, str, Callable[..., bool], str, Callable[..., None]]] = [
    ("modules.sd_models", "reload_model_weights", _reload_changes_model, _CHECKPOINT, _keep_checkpoint_setting),
    ("modules.sd_models", "load_model", _always, _CHECKPOINT, _nothing),
    ("modules.sd_models", "unload_model_weights", _always, "unload the checkpoint", _nothing),
    ("modules.sd_vae", "reload_vae_weights", _vae_changes, "load another VAE", _nothing),
    ("modules.textual_inversion.textual_inversion", "train_embedding", _always, _TRAINING, _nothing),
    ("modules.hypernetworks.hypernetwork", "train_hypernetwork", _always, _TRAINING, _nothing),
    ("modules.api.api", "train_embedding", _always, _TRAINING, _nothing),
    ("modules.api.api", "train_hypernetwork", _always, _TRAINING, _nothing),
]


class ModelGuard:
    """While installed, the WebUI functions in ``GUARDED`` refuse what would change the job's model."""

    def __init__(self, job_name: str, log: Callable[[str], None]):
        self.job_name, self.log = job_name, log
        self._installed: list[tuple[Any, str, Callable, Callable]] = []

    def _wrap(self, original: Callable, changes: Callable[..., bool], what: str, undo: Callable[..., None]) -> Callable:
        guard = self

        @functools.wraps(original)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if changes(*args, **kwargs):
                undo(*args, **kwargs)
                message = (f"LoRA Workshop is training {guard.job_name} on the loaded model: cannot {what} until the "
                           "job ends (stop it in the LoRA Workshop tab, or wait)")
                guard.log(f"refused: {what} during training")
                raise ModelChangeRefused(message)
            return original(*args, **kwargs)

        return guarded

    def install(self) -> None:
        for module_name, attr, changes, what, undo in GUARDED:
            module = sys.modules.get(module_name)  # only what the WebUI has loaded: nothing is imported here
            original = getattr(module, attr, None) if module is not None else None
            if not callable(original):
                continue
            wrapper = self._wrap(original, changes, what, undo)
            setattr(module, attr, wrapper)
            self._installed.append((module, attr, original, wrapper))

    def remove(self) -> None:
        while self._installed:
            module, attr, original, wrapper = self._installed.pop()
            if getattr(module, attr, None) is wrapper:  # someone else re-patched it since: leave theirs
                setattr(module, attr, original)
