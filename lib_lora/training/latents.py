"""What the model is fed, encoded once where a run allows it: image latents and text-encoder outputs.

Latents are kept per (image, bucket, flip) when the crop never changes (``cache_latents`` without
``random_crop``), and optionally on disk next to each image (as kohya keeps .npz files there),
valid while the image, the model and the seed that drew the posterior sample are unchanged.
Text-encoder outputs are kept per caption when the text encoders are frozen and the captions
never vary (no shuffling or dropout).  ``fill_caches`` fills both before the first step.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..fileio import LoraFileError, load_safetensors, save_safetensors
from .checks import clip_skip_for
from .config import TrainConfig
from .dataset import Dataset, ImageItem, Sample
from .epochs import derive_seed
from .model import Conditioning, TrainableModel

# /3: the posterior sample is seeded by the image's folder and file names (/2 also by subset; /1 by path)
LATENT_FORMAT = "lora-workshop-latent/3"


def _place(item: ImageItem) -> tuple:
    """An image's place in its dataset, independent of where the dataset lies: its folder's name and its file
    name (images are not nested below the repeat folders).  Only the path, which the caches key latents by:
    one image listed in two subsets (or as train and reg data) has one latent, cached or not."""
    return item.path.parent.name, item.path.name


class LatentCache:
    """The VAE's latents of samples; ``write_disk``: this process writes the disk files (the main one)."""

    def __init__(self, model: TrainableModel, dataset: Dataset, cfg: TrainConfig, write_disk: bool = True):
        self.model, self.dataset, self.seed = model, dataset, cfg.seed
        # a random crop or colour change makes every step's pixels new: nothing to cache
        self.asked = cfg.cache_latents
        self.caching = cfg.cache_latents and not any(s.random_crop or s.color_aug
                                                     for s in dataset.config.all_settings())
        self.on_disk = self.caching and cfg.cache_latents_to_disk
        self.write_disk = write_disk
        self._memory: dict[tuple, Tensor] = {}

    def clear(self) -> None:
        self._memory.clear()

    def missing(self, samples: list[Sample]) -> list[Sample]:
        """Those of ``samples`` whose latent is not held yet (none when not caching)."""
        if not self.caching:
            return []
        return [s for s in samples if (str(s.item.path), s.bucket, s.flip) not in self._memory]

    def hold(self, s: Sample) -> None:
        """Encode (or read from disk) the latent of ``s`` and keep it."""
        self._latent(s)

    def encode(self, samples: list[Sample]) -> Tensor:
        """[N, C, h, w] on the model's device."""
        return torch.stack([self._latent(s) for s in samples]).to(self.model.device)

    def _latent(self, s: Sample) -> Tensor:
        key = (str(s.item.path), s.bucket, s.flip)
        hit = self._memory.get(key) if self.caching else None
        if hit is None and self.on_disk:
            hit = self._read(s)
        if hit is None:
            m = self.model
            pixels = self.dataset.pixels(s)
            with torch.no_grad(), torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
                # the posterior sample is seeded per image: the same latent whichever process or step encodes it,
                # and wherever the dataset lies (a copied or moved folder trains the same file)
                torch.manual_seed(derive_seed(self.seed, "latent", *_place(s.item), s.bucket, s.flip))
                hit = m.encode_images(pixels.unsqueeze(0).to(m.device))[0].float()
            if self.on_disk and self.write_disk:
                self._write(s, hit)
        if self.caching:
            self._memory[key] = hit
        return hit

    # -- on disk, beside each image ---------------------------------------------------------------
    @staticmethod
    def _path(s: Sample) -> Path:
        p = s.item.path
        return p.with_name(f"{p.stem}.{s.bucket[0]}x{s.bucket[1]}{'.flip' if s.flip else ''}.lwlatent")

    def _key(self, item: ImageItem) -> dict[str, str]:
        st = item.path.stat()
        return {"format": LATENT_FORMAT, "image": f"{st.st_mtime_ns}:{st.st_size}",
                "model": self.model.model_hash or self.model.model_name, "seed": str(self.seed)}

    def _read(self, s: Sample) -> Tensor | None:
        path = self._path(s)
        if not path.is_file():
            return None
        try:
            tensors, meta = load_safetensors(path)
        except LoraFileError:
            return None  # a torn or foreign file is simply recomputed
        if any(meta.get(k) != v for k, v in self._key(s.item).items()):
            return None
        return tensors["latent"].float().to(self.model.device)

    def _write(self, s: Sample, latent: Tensor) -> None:
        top, left = s.crop_top_left
        meta = dict(self._key(s.item), crop=f"{top},{left}")
        save_safetensors({"latent": latent.cpu()}, self._path(s), meta, overwrite=True)


class TextCache:
    """The text encoders' outputs for captions, kept per caption when nothing makes them vary."""

    def __init__(self, model: TrainableModel, cfg: TrainConfig):
        wanted = clip_skip_for(model.family, cfg.clip_skip)[0]  # SDXL ignores it
        if (wanted or 1) != (model.clip_skip or 1):
            raise ValueError(f"clip_skip {cfg.clip_skip} is asked for, but the host encodes captions at clip skip "
                             f"{model.clip_skip or 1}: build the model with the run's clip_skip")
        if cfg.max_token_length != model.max_token_length:
            raise ValueError(f"max_token_length {cfg.max_token_length} is asked for, but the host encodes captions "
                             f"with max_token_length {model.max_token_length}: build the model with the run's")
        self.model = model
        fixed = not any(d.shuffle_caption or d.caption_dropout_rate or d.caption_tag_dropout_rate
                        or d.caption_dropout_every_n_epochs for d in cfg.dataset.all_settings())
        self.caching = cfg.cache_text_encoder_outputs and fixed
        self._memory: dict[tuple, Conditioning] = {}

    def clear(self) -> None:
        self._memory.clear()

    def missing(self, samples: list[Sample]) -> list[Sample]:
        """One of ``samples`` per caption not held yet (none when not caching)."""
        if not self.caching:
            return []
        todo = {self._key(s.caption, s.size_cond): s for s in samples}
        return [s for key, s in todo.items() if key not in self._memory]

    def hold(self, s: Sample) -> None:
        """Encode the caption of ``s`` (frozen text encoders only) and keep it."""
        self._one(s.caption, s.size_cond)

    def encode(self, captions: list[str], sizes: list, frozen: bool) -> Conditioning:
        """``frozen``: the text encoders are not trained (no gradients, and caching is allowed)."""
        if not (frozen and self.caching):
            with (torch.no_grad() if frozen else nullcontext()):
                return self.model.encode_text(captions, sizes)
        parts = [self._one(cap, size) for cap, size in zip(captions, sizes)]
        y = torch.cat([p.y for p in parts]) if parts[0].y is not None else None
        contexts = [p.context for p in parts]
        longest = max(c.shape[1] for c in contexts)
        if any(c.shape[1] != longest for c in contexts):
            # a caption longer than one 75-token chunk: pad the others with empty chunks, as the
            # WebUI (and the checkpoint host) do for a batch of prompts encoded together
            empty = self._one("", sizes[0]).context
            if any((longest - c.shape[1]) % empty.shape[1] for c in contexts):
                raise ValueError(f"text contexts of {sorted({c.shape[1] for c in contexts})} positions cannot be "
                                 f"batched: not whole {empty.shape[1]}-position chunks")
            contexts = [torch.cat([c, *[empty] * ((longest - c.shape[1]) // empty.shape[1])], 1) for c in contexts]
        return Conditioning(torch.cat(contexts), y)

    def _key(self, caption: str, size) -> tuple:
        return caption, size if self.model.family == "sdxl" else None

    def _one(self, caption: str, size) -> Conditioning:
        key = self._key(caption, size)
        if key not in self._memory:
            with torch.no_grad():
                self._memory[key] = self.model.encode_text([caption], [size])
        return self._memory[key]


def fill_caches(dataset: Dataset, latents: LatentCache, texts: TextCache, frozen_text: bool,
                report: Callable[[str, int, int], None] | None, log: Callable[[str], None],
                stop: Callable[[], bool]) -> None:
    """Cache every latent and (text encoders frozen) caption before the first step, as kohya does;
    ``report("caching latents", done, total)`` as it goes, ``stop()`` cuts it short."""
    if latents.asked and not latents.caching:
        log("cache_latents: off for this run, since random_crop or color_aug changes the pixels every step; "
            "latents are encoded at each step")
    if not (latents.caching or (frozen_text and texts.caching)):
        return
    samples = dataset.fixed_samples()
    if latents.model.family == "sdxl" and dataset.config.random_crop:
        frozen_text = False  # the crop is part of SDXL's text conditioning: captions are cached as they come
    for what, cache, on in (("latents", latents, True), ("text encoder outputs", texts, frozen_text)):
        if not on:
            continue
        t, todo, n = time.time(), cache.missing(samples), 0
        for s in todo:
            if stop():
                break
            cache.hold(s)
            n += 1
            if report:
                report(f"caching {what}", n, len(todo))
        if n:
            log(f"cached {n} {what} in {time.time() - t:.1f} s")
