"""The tools (resize, merge, bake, extract, convert) inside the AUTOMATIC1111 WebUI (written against v1.10.1).

- Files: LoRAs are the Workshop library's names (``Library.resolve``: only files the library
  indexed, so not what a link out of the LoRA folder points to unless the setting allows it);
  checkpoints are the WebUI's own list (``sd_models.checkpoint_aliases``: title, name, hash).
  Outputs go to the LoRA folder (``--lora-dir``) or, for ``bake``, the checkpoint folder
  (``--ckpt-dir``, else ``models/Stable-diffusion``).
- Tools that run SVDs hold ``call_queue.queue_lock`` (through the Workshop's host), like a
  generation, and show their progress in ``shared.state`` the way training does; the WebUI's
  Interrupt stops them.  ``bake`` and ``convert`` only stream files and take no lock.
- After a job, the library is refreshed (new LoRAs are cards without a restart) and, after a
  bake, the WebUI's checkpoint list.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from modules import paths, shared

from ..tools.jobs import CheckpointNotFound, ToolHost, ToolJob, ToolRunner
from .webui import PerWorkshop, Workshop
from .webui_host import log

JOB_NAME = "lora-workshop-tools"


def _sd_models() -> Any:
    return sys.modules.get("modules.sd_models")  # loaded by the WebUI before any extension runs


class WebUIToolHost(ToolHost):
    name = "webui"

    def __init__(self, workshop: Workshop):
        self.workshop = workshop

    # files ------------------------------------------------------------------------------------------
    def lora_dir(self) -> Path:
        return self.workshop.host.lora_dirs()[0]

    def checkpoint_dir(self) -> Path:
        ckpt_dir = getattr(shared.cmd_opts, "ckpt_dir", None)
        if ckpt_dir:
            return Path(ckpt_dir)
        return Path(getattr(_sd_models(), "model_path", None) or os.path.join(paths.models_path, "Stable-diffusion"))

    def loras(self) -> list[str]:
        return sorted({e.relname for e in self.workshop.library.entries}, key=str.lower)

    def checkpoints(self) -> list[str]:
        return sorted(getattr(_sd_models(), "checkpoints_list", None) or {}, key=str.lower)

    def resolve_lora(self, name: str) -> Path:
        return self.workshop.library.resolve_fresh(name).path

    def resolve_checkpoint(self, name: str) -> Path:
        sd_models = _sd_models()
        info = (getattr(sd_models, "checkpoints_list", None) or {}).get(name) or \
            (getattr(sd_models, "checkpoint_aliases", None) or {}).get(name)
        filename = getattr(info, "filename", None)
        if not filename or not os.path.isfile(filename):
            raise CheckpointNotFound(f"checkpoint not found: {name} (names are those of the WebUI's checkpoint list)")
        return Path(filename)

    # the model lock and the progress bar -------------------------------------------------------------
    def lock(self):
        return self.workshop.host.queue_lock()

    def begin(self, job: ToolJob) -> None:
        shared.state.begin(job=JOB_NAME)
        self.progress(job)

    def progress(self, job: ToolJob) -> None:
        st = shared.state
        st.job = JOB_NAME
        st.job_count = max(job.total, 1)
        st.job_no = job.done
        st.sampling_step = 0
        st.sampling_steps = 0
        st.textinfo = job.textinfo()
        if job.eta is not None:  # /sdapi/v1/progress derives its ETA from time_start and job_no/job_count
            p = 0.01 + job.done / st.job_count
            if p < 1:
                st.time_start = time.time() - job.eta * p / (1 - p)

    def end(self, job: ToolJob) -> None:
        shared.state.textinfo = job.textinfo()
        shared.state.end()

    def interrupted(self) -> bool:
        return bool(getattr(shared.state, "interrupted", False))

    def after(self, job: ToolJob) -> None:
        if job.folder == self.checkpoint_dir():
            refresh = getattr(_sd_models(), "list_models", None)
            if callable(refresh):
                refresh()
        self.workshop.library.refresh()

    def log(self, message: str) -> None:
        log(message)


_runners: PerWorkshop[ToolRunner] = PerWorkshop(lambda ws: ToolRunner(WebUIToolHost(ws)))


def get_runner(workshop: Workshop | None = None) -> ToolRunner:
    """The process' tool runner (kept across "Reload UI", like the Workshop)."""
    return _runners.get(workshop)


def tab_section() -> None:
    """The Tools section of the LoRA Workshop tab (called inside the tab's gr.Blocks)."""
    from ..tools import ui
    ui.create_section(get_runner())


__all__ = ["WebUIToolHost", "get_runner", "tab_section", "JOB_NAME"]
