"""Stub of modules/processing.py (WebUI v1.10.1): processing objects and ``process_images``.

Field names and defaults are the WebUI's for what extensions set.  ``process_images`` does not
sample: it walks ``shared.state`` the way a real generation does (job_count if unset,
sampling_step/sampling_steps, ``nextjob()`` per iteration, stops when interrupted), calls the
functions in ``process_callbacks`` with ``p`` (tests look at the model there) and returns
plain images of the requested size.
"""
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

process_callbacks: list = []   # test hook: called with p inside process_images
calls: list = []               # every p that went through process_images


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    prompt: Any = ""
    negative_prompt: Any = ""
    seed: int = -1
    sampler_name: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    do_not_reload_embeddings: bool = False
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str = None
    disable_extra_networks: bool = False
    comments: dict = None
    is_hr_pass: bool = field(default=False, init=False)
    iteration: int = field(default=0, init=False)

    # class-level on purpose (as in the WebUI): one conditioning cache shared by every instance
    cached_uc = [None, None]
    cached_c = [None, None]

    def __post_init__(self):
        self.comments = {}
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = dict(self.override_settings or {})
        self.all_prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        self.all_negative_prompts = [self.negative_prompt] if isinstance(self.negative_prompt, str) else list(self.negative_prompt)
        self.scripts = None

    def comment(self, text):
        self.comments[text] = 1

    def close(self):
        self.sampler = None
        StableDiffusionProcessing.cached_c = [None, None]
        StableDiffusionProcessing.cached_uc = [None, None]


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", infotexts=None):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.info = info
        self.infotexts = infotexts or [info] * len(images_list)
        self.width = p.width
        self.height = p.height


def process_images(p: StableDiffusionProcessing) -> Processed:
    from modules import shared
    state = shared.state
    if state.job_count == -1:
        state.job_count = p.n_iter
    images = []
    for n in range(p.n_iter):
        p.iteration = n
        if state.skipped:
            state.skipped = False
        if state.interrupted or state.stopping_generation:
            break
        state.sampling_steps = p.steps
        for callback in process_callbacks:
            callback(p)
        for i in range(p.steps):
            state.sampling_step = i + 1
            shared.total_tqdm.update()  # as sd_samplers_common does after each step
        shade = (p.seed * 37) % 256 if p.seed >= 0 else 128
        images.extend(Image.new("RGB", (p.width, p.height), (shade, 128, 255 - shade)) for _ in range(p.batch_size))
        state.nextjob()
    calls.append(p)
    return Processed(p, images, seed=p.seed)
