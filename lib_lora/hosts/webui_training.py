"""Training on the checkpoint the AUTOMATIC1111 WebUI has loaded (written against v1.10.1): the
``TrainingHost`` the job runner drives, and the tab.

The model is the WebUI's own (``webui_trainable``: ``refusal``, ``trainable_model``).  Sample
images: ``processing.StableDiffusionProcessingTxt2Img`` + ``process_images`` while the LoRA being
trained is attached as hooks, so the WebUI's own sampler renders with it.  Extra networks are
disabled for those renders and they use a private conditioning cache, so nothing computed with
the training LoRA is reused by later generations.

The job holds ``call_queue.queue_lock``; with the setting "generation first" it lends the lock
between two steps to generations waiting for it (UI or /sdapi/v1/txt2img), in which
``<lora:NAME@live>`` applies the weights trained so far, and refuses checkpoint/VAE/precision
changes and other training meanwhile (hosts/webui_interleave.py); with "training only" they wait
until training ends.  Progress goes to ``shared.state`` the way the WebUI's embedding training
reports it (job_count = steps, job_no = step, textinfo), so /sdapi/v1/progress and the progress
bar show it (a generation's own progress while one runs); the WebUI's Interrupt (``shared.state
.interrupted``) stops the job after the current step and saves what was trained.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from modules import paths, shared

from .. import families
from ..training import sample_prompts
from ..training.checks import OptionError, check_v2, clip_skip_for
from ..training.config import TrainConfig
from ..training.errors import RequestError
from ..training.host import TrainingHost, TrainingRefused
from ..training.job import Job
from ..training.jobs import JobRunner
from ..training.model import TrainableModel
from . import webui_interleave as interleave
from .webui import PerWorkshop, Workshop
from .webui_host import log
from .webui_model import model_family, unet_root
from .webui_trainable import (checkpoint_change_pending, clip_skip_note, loaded_model, max_token_length_refusal,
                              refusal, text_encoding, trainable_model)

JOB_NAME = "lora-workshop-train"


# -- sample prompts -------------------------------------------------------------------------------------

# kohya's sampler names (training.checks.KOHYA_SAMPLERS) -> the WebUI's (training/sample_prompts.py
# parses the prompt lines).  The WebUI has no DPM-Solver of kohya's other two kinds: "dpmsolver"
# (multistep, second order) renders with its multistep DPM++ 2M, "dpmsingle" (singlestep, second
# order, no added noise) with its singlestep DPM2 rather than the ancestral DPM++ 2S a, which adds noise.
_KOHYA_SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
                   "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M",
                   "dpmsolver++": "DPM++ 2M", "dpmsingle": "DPM2", "k_lms": "LMS", "k_euler": "Euler",
                   "k_euler_a": "Euler a", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a"}


def parse_sample_prompt(line: str, width: int, height: int, seed: int, steps: int = 20,
                        cfg_scale: float = 7.0, sampler: str | None = None) -> dict:
    """One sample prompt line with kohya's inline options (``a cat --n blurry --w 768 --s 28``) as txt2img's
    arguments; ``sampler`` (kohya's name) unless the line's ``--ss`` names one; None: the WebUI's default."""
    p = sample_prompts.parse(line, width, height, seed, steps, cfg_scale)
    name = p.sampler or sampler
    return {"prompt": p.prompt, "negative_prompt": p.negative, "width": p.width, "height": p.height, "seed": p.seed,
            "steps": p.steps, "cfg_scale": p.scale,
            "sampler_name": _KOHYA_SAMPLERS.get(name.lower(), name) if name else None}


# -- the host -------------------------------------------------------------------------------------------


class WebUITrainingHost(TrainingHost):
    name = "webui"

    def __init__(self, workshop: Workshop):
        self.workshop = workshop
        self._trained: tuple[Any, torch.nn.Module] | None = None  # (sd_model, its UNet) of the running job
        self._guard: interleave.ModelGuard | None = None

    def lock(self):
        return self.workshop.host.queue_lock()

    def family(self) -> str | None:
        sd_model = loaded_model()
        return model_family(sd_model) if sd_model is not None else None

    def describe(self) -> str:
        """One line for the tab: what would be trained on, or why not."""
        sd_model = loaded_model()
        why = refusal(sd_model)
        if sd_model is None:
            return f"Cannot train: {why}"
        info = getattr(sd_model, "sd_checkpoint_info", None)
        title = getattr(info, "title", None) or "the loaded model"
        family = families.display(model_family(sd_model), unknown="?")
        return f"Cannot train on {title}: {why}" if why else f"Trains on the loaded {family} model: {title}"

    def dataset_roots(self) -> list[Path]:
        return self.workshop.api_dataset_roots()

    def check(self) -> None:
        why = refusal(loaded_model())
        if why:
            raise TrainingRefused(why)

    def check_config(self, config: TrainConfig) -> None:
        sd_model = loaded_model()
        if sd_model is not None and refusal(sd_model) is None:  # else check() or build_model says why
            family = model_family(sd_model)
            try:
                check_v2(family, config.v2)
            except OptionError as e:
                raise RequestError.of(e) from None
            why = max_token_length_refusal(sd_model, family) if config.max_token_length is not None else None
            if why:
                raise RequestError.bad("max_token_length", why)
        shadow = self.workshop.embeddings.folder_embedding(config.pivotal_word) if config.pivotal_word else None
        if shadow:
            # it would stand for the word wherever the LoRA is used, as the built-in keeps a folder embedding
            raise RequestError.bad("pivotal_word", f"{config.pivotal_word!r}: the embedding {shadow!r} from the "
                                   "embeddings folder would stand for this word in prompts instead of the trained "
                                   "vectors; choose another word, or rename that embedding")

    def build_model(self, job: Job) -> TrainableModel:
        sd_model = loaded_model()
        why = refusal(sd_model)
        if why:
            raise TrainingRefused(why)
        self.check_config(job.config)  # again: before anything below touches the model
        restored = self.workshop.restore()  # LoRAs left merged by the last generation must not be trained into
        if restored:
            job.log(f"restored the model's original weights ({restored} layers had LoRAs merged)")
        self._no_token_merging(sd_model)
        mm = self.workshop.host.model_map(sd_model)
        family = model_family(sd_model)
        skip, note = clip_skip_for(family, job.config.clip_skip)
        for line in (note, clip_skip_note(sd_model, family, skip)):
            if line:
                job.log(line)
        self._trained = (sd_model, unet_root(sd_model))
        return trainable_model(sd_model, render=self._renderer(job, sd_model, skip), model_map=mm, clip_skip=skip,
                               max_token_length=job.config.max_token_length)

    @staticmethod
    def _no_token_merging(sd_model: Any) -> None:
        """ToMe patches stay on the model after a generation; the UNet must train without them."""
        sd_models = sys.modules.get("modules.sd_models")
        apply = getattr(sd_models, "apply_token_merging", None)
        if apply is not None:
            apply(sd_model, 0)

    def _renderer(self, job: Job, sd_model: Any, clip_skip: int | None) -> Callable[..., list]:
        w, h = job.config.dataset.reso
        family = model_family(sd_model)

        def render(prompts: list[str], seed: int = 0) -> list:
            from modules import processing
            if checkpoint_change_pending(sd_model):
                job.log("a checkpoint change is waiting: sample images skipped")
                return []
            # samples render with extra networks off: a failed generation's bundled embeddings must not reach them
            self.workshop.drop_embeddings()
            images = []
            for line in prompts:
                o = parse_sample_prompt(line, w, h, seed, sampler=job.config.sample_sampler)
                p = processing.StableDiffusionProcessingTxt2Img(
                    sd_model=sd_model, prompt=o["prompt"], negative_prompt=o["negative_prompt"], seed=o["seed"],
                    steps=o["steps"], cfg_scale=o["cfg_scale"], width=o["width"], height=o["height"],
                    sampler_name=o["sampler_name"], batch_size=1, n_iter=1, do_not_save_samples=True,
                    do_not_save_grid=True, do_not_reload_embeddings=True, disable_extra_networks=True)
                # a private conditioning cache: the shared one must never keep conds made with the training LoRA
                p.cached_c = [None, None]
                p.cached_uc = [None, None]
                try:
                    with text_encoding(sd_model, family, clip_skip):  # the samples see what training sees
                        processed = processing.process_images(p)
                finally:
                    close = getattr(p, "close", None)
                    if callable(close):
                        close()
                    # as the WebUI's txt2img callers do: else the next generation's console bar continues this one
                    shared.total_tqdm.clear()
                    self._no_token_merging(sd_model)
                if processed is not None and processed.images:
                    images.append(processed.images[0])
                if getattr(shared.state, "interrupted", False):
                    break
            return images

        return render

    def output_dir(self) -> Path:
        return self.workshop.host.lora_dirs()[0]

    def samples_dir(self, job: Job) -> Path:
        return Path(paths.data_path) / "outputs" / "lora-workshop" / f"{job.name}-{job.id}"

    # progress, the way the WebUI's own training reports it ------------------------------------------------
    def begin(self, job: Job) -> None:
        st = shared.state
        st.begin(job=JOB_NAME)
        self.progress(job)
        self._guard = interleave.ModelGuard(job.name, job.log)
        self._guard.install()

    def progress(self, job: Job) -> None:
        st = shared.state
        st.job = JOB_NAME
        st.job_count = max(job.total, 1)
        st.job_no = job.step
        st.sampling_step = 0
        st.sampling_steps = 0
        st.textinfo = job.textinfo()
        if job.eta is not None:
            # /sdapi/v1/progress derives its ETA from time_start and job_no/job_count: make it ours
            p = 0.01 + job.step / st.job_count
            if p < 1:
                st.time_start = time.time() - job.eta * p / (1 - p)

    def samples(self, job: Job, images: list) -> None:
        assign = getattr(shared.state, "assign_current_image", None)
        if callable(assign) and images:
            assign(images[-1])  # the live preview shows the newest sample

    def interrupted(self) -> bool:
        return bool(getattr(shared.state, "interrupted", False))

    def end(self, job: Job) -> None:
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        self._trained = None
        shared.state.textinfo = job.textinfo()
        shared.state.end()

    # generations between steps (hosts/webui_interleave.py) ----------------------------------------------------
    def live_registry(self):
        return self.workshop.runtime.live

    def yield_interval(self) -> float | None:
        return interleave.yield_interval(self.workshop.host)

    def generation_waiting(self) -> bool:
        return interleave.waiting(self.lock())

    def yield_lock(self, job: Job) -> None:
        progress = interleave.Progress()
        shared.state.textinfo = job.textinfo()
        interleave.lend(self.lock())
        # the lock is ours again: the model as training left it, and the job's progress on show
        self.workshop.restore()
        sd_model, unet = self._trained or (None, None)
        self._no_token_merging(sd_model)
        progress.put_back()
        if loaded_model() is not sd_model or unet_root(sd_model) is not unet:
            raise TrainingRefused("the loaded model was replaced while training was paused for a generation; "
                                  "training stopped (the model it trained on is gone)")
        why = refusal(sd_model)
        if why:  # e.g. an alternative UNet a generation switched on: what was trained so far is still good
            job.log(f"after a generation: {why}; stopping and saving")
            job.request_stop(save=True)

    def file_saved(self, job: Job, path: Path) -> None:
        self.workshop.library.refresh()  # a step save or a kept state appears in the cards and the API at once

    def after(self, job: Job) -> None:
        self.workshop.library.refresh()

    def log(self, message: str) -> None:
        log(message)


_runners: PerWorkshop[JobRunner] = PerWorkshop(lambda ws: JobRunner(WebUITrainingHost(ws)))


def get_runner(workshop: Workshop | None = None) -> JobRunner:
    """The process' job runner (kept across "Reload UI", like the Workshop)."""
    return _runners.get(workshop)


def ui_tabs() -> list:
    """script_callbacks.on_ui_tabs: the "LoRA Workshop" tab."""
    from ..training import ui
    from . import webui_tools
    return ui.create_tab(get_runner(), sections=[webui_tools.tab_section])


__all__ = ["parse_sample_prompt", "WebUITrainingHost", "get_runner", "ui_tabs", "JOB_NAME"]
