"""Sample images while the command line trains.

kohya's prompt lines (``training/sample_prompts.py``) are rendered by this host's samplers and saved
where and as sd-scripts saves them, ``OUTPUT_DIR/sample/NAME_000120_00_20240501123000.png``, each
with the WebUI's infotext in its PNG.  What cannot be rendered here (a sampler other than DDIM or
Euler) is refused before training starts, never replaced.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from ...infotext import format_parameters, save_png
from ...training import sample_prompts
from ...training.checks import clip_skip_for
from ...training.config import TrainConfig
from ...training.options import OptionError
from .checkpoint import Checkpoint
from .sampling import sample

# kohya's sampler names this host renders -> sampling.py's sampler; and the WebUI's names for the infotext
SAMPLERS = {"ddim": "ddim", "euler": "euler", "k_euler": "euler"}
DISPLAY = {"ddim": "DDIM", "euler": "Euler"}


def sampler_for(name: str) -> str:
    """sampling.py's sampler for kohya's ``name``; OptionError when this host has none."""
    found = SAMPLERS.get(name.strip().lower())
    if found is None:
        raise OptionError("sample_sampler", f"{name}: the command line renders samples with "
                                            f"{', '.join(SAMPLERS)} (the WebUI tab renders kohya's other samplers)")
    return found


def size_multiple(ckpt: Checkpoint) -> int:
    """Image sides this checkpoint's UNet can render: multiples of the VAE's scale times its downsamplings."""
    return ckpt.vae_scale * 2 ** (len(ckpt.config["unet"]["channel_mult"]) - 1)


class TrainingSamples:
    """The renderer the trainer calls (``TrainableModel.render``) and the callback that saves what it drew."""

    def __init__(self, ckpt: Checkpoint, cfg: TrainConfig, per_epoch: int, log: Callable[[str], None]):
        self.ckpt, self.cfg, self.per_epoch, self.log = ckpt, cfg, per_epoch, log
        self.folder = Path(cfg.output_dir) / "sample"
        self.prompts = self._parse(cfg.sample_prompts, cfg.seed)
        for p in self.prompts:  # refused now, not at the first sample
            sampler_for(p.sampler or cfg.sample_sampler)

    def _parse(self, lines: list[str], seed: int) -> list[sample_prompts.SamplePrompt]:
        w, h = self.cfg.dataset.reso
        return [sample_prompts.parse(line, w, h, seed) for line in lines]

    def _size(self, p: sample_prompts.SamplePrompt) -> tuple[int, int]:
        m = size_multiple(self.ckpt)
        w, h = max(m, p.width - p.width % m), max(m, p.height - p.height % m)
        if (w, h) != (p.width, p.height):
            self.log(f"sample {p.prompt[:40]!r}: {p.width}x{p.height} rendered as {w}x{h} "
                     f"(sides are multiples of {m} for this model)")
        return w, h

    def render(self, lines: list[str], seed: int = 0) -> list:
        """One image per prompt line, carrying its infotext in ``image.info["parameters"]``."""
        images = []
        unet_dtype = next(self.ckpt.unet.parameters()).dtype
        half = self.ckpt.device.type == "cuda" and unet_dtype in (torch.float16, torch.bfloat16)
        skip = clip_skip_for(self.ckpt.family, self.cfg.clip_skip)[0]  # as the captions are encoded
        for p in self._parse(lines, seed):
            w, h = self._size(p)
            sampler = sampler_for(p.sampler or self.cfg.sample_sampler)
            with torch.autocast("cuda", dtype=unet_dtype) if half else nullcontext():
                img = sample(self.ckpt, p.prompt, negative=p.negative, steps=p.steps, cfg=p.scale, seed=p.seed,
                             width=w, height=h, sampler=sampler, clip_skip=skip)[0]
            img.info["parameters"] = format_parameters(p.prompt, p.negative, {
                "Steps": p.steps, "Sampler": DISPLAY[sampler], "CFG scale": p.scale, "Seed": p.seed,
                "Size": f"{w}x{h}", "Model hash": self.ckpt.hashes()["sha256"][:10] or None,
                "Model": self.ckpt.name, "Clip skip": skip if skip and skip > 1 else None})
            images.append(img)
        return images

    def save(self, step: int, images: list) -> None:
        """``Callbacks.on_samples``: write the images under sd-scripts' names."""
        if not images:
            return
        epoch = sample_prompts.due(self.cfg, step, self.per_epoch)[1]
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            p = self.prompts[i]
            name = sample_prompts.image_name(self.cfg.output_name, i, step, epoch, p.seed if p.seed_given else None)
            save_png(img, self.folder / name, img.info.get("parameters", ""))
        self.log(f"step {step}: {len(images)} sample image(s) in {self.folder}")
