"""Stub of modules/processing.py (WebUI v1.10.1): the processing object attributes extra networks use."""
from dataclasses import dataclass, field
from typing import Any


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    prompt: Any = ""
    negative_prompt: Any = ""
    n_iter: int = 1
    batch_size: int = 1
    extra_generation_params: dict = None
    disable_extra_networks: bool = False
    comments: dict = None
    is_hr_pass: bool = field(default=False, init=False)
    iteration: int = field(default=0, init=False)

    def __post_init__(self):
        self.comments = {}
        self.extra_generation_params = self.extra_generation_params or {}
        self.all_prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        self.all_negative_prompts = [self.negative_prompt] if isinstance(self.negative_prompt, str) else list(self.negative_prompt)
        self.scripts = None

    def comment(self, text):
        self.comments[text] = 1


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
