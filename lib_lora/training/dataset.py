"""A scanned training dataset: its settings, its images, and the samples a batch is made of.

``scan.py`` builds a ``Dataset`` from kohya-style folders; the trainer asks it for the epoch
order (``iterate``, epochs.py) and, for each slot of a batch, a ``Sample`` (caption, flip and
crop drawn) and that sample's pixels.  One item path serves the trainer and the tests alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, NoReturn

import torch

from .buckets import Bucketer, Size, cover_size, crop_offset, parse_resolution
from . import color_aug
from .captions import CAPTION_EXTENSIONS, process_caption
from .color_aug import ColorChange
from .epochs import Batch, Position, check_batch_size, epoch_plan
from .images import load_pixels
from .options import default as _d
from .problems import DatasetError, Problem
from .subsets import Subset, resolve


@dataclass
class DatasetConfig:
    """Defaults are declared in options.py; ``check()`` refuses settings that cannot work.

    The images are ``train_dir``'s (and ``reg_dir``'s) ``<repeats>_<trigger>`` folders, or the
    subsets of ``datasets`` (kohya's dataset config, see subsets.py), whose settings fall back
    to these fields."""
    train_dir: str | Path | None
    reg_dir: str | Path | None = _d("dataset.reg_dir")
    resolution: int | str | tuple[int, int] = _d("dataset.resolution")  # 512, "512,768" or (w, h); multiples of 64
    enable_buckets: bool = _d("dataset.enable_buckets")
    min_bucket_reso: int = _d("dataset.min_bucket_reso")
    max_bucket_reso: int = _d("dataset.max_bucket_reso")
    bucket_reso_steps: int = _d("dataset.bucket_reso_steps")
    bucket_no_upscale: bool = _d("dataset.bucket_no_upscale")
    caption_extension: str = _d("dataset.caption_extension")
    shuffle_caption: bool = _d("dataset.shuffle_caption")
    keep_tokens: int = _d("dataset.keep_tokens")
    keep_tokens_separator: str = _d("dataset.keep_tokens_separator")
    caption_separator: str = _d("dataset.caption_separator")
    caption_dropout_rate: float = _d("dataset.caption_dropout_rate")
    caption_dropout_every_n_epochs: int = _d("dataset.caption_dropout_every_n_epochs")
    caption_tag_dropout_rate: float = _d("dataset.caption_tag_dropout_rate")
    flip_aug: bool = _d("dataset.flip_aug")
    random_crop: bool = _d("dataset.random_crop")
    color_aug: bool = _d("dataset.color_aug")      # kohya's random hue/gamma change (color_aug.py)
    max_pixels: int = _d("dataset.max_pixels")
    datasets: list[dict] = field(default_factory=lambda: _d("dataset.datasets"))

    def __post_init__(self) -> None:
        self.train_dir = Path(self.train_dir) if self.train_dir not in (None, "") else None
        self.reg_dir = Path(self.reg_dir) if self.reg_dir not in (None, "") else None
        ext = self.caption_extension.strip()
        self.caption_extension = ext if ext.startswith(".") or not ext else "." + ext

    @property
    def reso(self) -> Size:
        """The training size: with ``datasets``, the first dataset's (what the run is named by)."""
        if self.datasets:
            return self.subsets()[0].settings.reso
        return parse_resolution(self.resolution)

    @property
    def caption_extensions(self) -> tuple[str, ...]:
        """The configured extension first, then the other usual ones."""
        return (self.caption_extension,) + tuple(e for e in CAPTION_EXTENSIONS if e != self.caption_extension)

    def subsets(self) -> list[Subset]:
        """The subsets of ``datasets``, each with the settings it trains with ([] without datasets)."""
        return resolve(self) if self.datasets else []

    def all_settings(self) -> list["DatasetConfig"]:
        """The settings every image trains with: each subset's, or these."""
        return [s.settings for s in self.subsets()] or [self]

    def bucketer(self) -> Bucketer:
        return Bucketer(self.reso, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps,
                        no_upscale=self.bucket_no_upscale, enabled=self.enable_buckets)

    def check(self) -> None:
        """Raise ``DatasetError(kind="config")`` for settings that cannot work."""
        def bad(msg: str) -> NoReturn:
            raise DatasetError(msg, kind="config")

        if self.datasets:  # these settings are only what the subsets fall back to: each subset's are checked
            if self.train_dir is not None or self.reg_dir is not None:
                bad("give train_dir (and reg_dir) or datasets, not both")
            for s in self.subsets():
                try:
                    s.settings.check()
                except DatasetError as e:
                    bad(f"{s.where}: {e}")
            return
        if self.train_dir is None:
            bad("train_dir is required: the folder holding '<repeats>_<trigger>' sub-folders")
        try:
            w, h = self.reso
        except ValueError as e:
            bad(str(e))
        if w % 64 or h % 64:
            bad(f"resolution {w}x{h}: each side must be a multiple of 64 (e.g. 512, 640, 768, 1024)")
        step = self.bucket_reso_steps
        if step <= 0 or step % 8:
            bad(f"bucket_reso_steps={step} must be a positive multiple of 8 (the VAE's downscale factor)")
        if self.enable_buckets and not self.bucket_no_upscale:
            lo, hi = self.min_bucket_reso, self.max_bucket_reso
            if lo <= 0 or lo > hi or lo % step or hi % step:
                bad(f"min_bucket_reso={lo} and max_bucket_reso={hi} must be multiples of bucket_reso_steps={step} "
                    "with min <= max")
            if min(w, h) < lo or max(w, h) > hi:  # kohya requires the base resolution to be a valid bucket size
                bad(f"resolution {w}x{h} must lie within min_bucket_reso={lo} .. max_bucket_reso={hi}")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(f"{name}={getattr(self, name)} must be between 0 and 1")
        if self.keep_tokens < 0 or self.caption_dropout_every_n_epochs < 0:
            bad("keep_tokens and caption_dropout_every_n_epochs must not be negative")
        if not self.caption_separator:
            bad("caption_separator must not be empty")
        if not self.caption_extension:
            bad("caption_extension must not be empty (e.g. '.txt')")
        if self.max_pixels <= 0:
            bad(f"max_pixels={self.max_pixels} must be positive")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str       # raw caption (file, or the folder's trigger words), before shuffling/dropout
    repeats: int       # per epoch; for reg images this is after balancing
    is_reg: bool
    folder: str        # folder name, e.g. "20_robot"
    size: Size         # original (w, h), upright (EXIF orientation applied)
    bucket: Size       # training size (w, h)
    resized: Size      # size scaled to before cropping to the bucket
    caption_source: Literal["file", "empty", "folder"] = "file"
    orientation: int = 1  # EXIF orientation, undone when loading
    subset: int = -1      # its Subset.index with a ``datasets`` config: the settings it trains with


@dataclass
class FolderInfo:
    name: str
    path: str
    repeats: int
    trigger: str
    is_reg: bool
    images: int = 0
    missing_captions: int = 0
    empty_captions: int = 0
    subset: int = -1    # the Subset.index this folder is, with a ``datasets`` config

    def to_dict(self) -> dict:
        return {**asdict(self), "images_x_repeats": self.images * self.repeats}


@dataclass(frozen=True)
class Sample:
    """One slot of a batch with its random choices made: the caption as trained, the flip and the crop."""
    item: ImageItem
    bucket: Size
    caption: str
    flip: bool
    resized: Size             # the size the image is scaled to before cropping
    window: tuple[int, int]   # (left, top) of the bucket-sized crop in the resized image, before flipping
    color: ColorChange | None = None  # color_aug's change this time (color_aug.py)

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop as seen in the (flipped) image: SDXL's crop conditioning."""
        left, top = self.window
        if self.flip:
            left = self.resized[0] - left - self.bucket[0]
        return top, left

    @property
    def size_cond(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """SDXL's size conditioning: (original (h, w), crop (top, left), target (h, w))."""
        return (self.item.size[1], self.item.size[0]), self.crop_top_left, (self.bucket[1], self.bucket[0])


class Dataset:
    """Scanned, validated images; build with ``scan()``."""

    def __init__(self, config: DatasetConfig, items: list[ImageItem], folders: list[FolderInfo],
                 problems: list[Problem], unused_reg: list[ImageItem] | None = None) -> None:
        self.config = config
        self.items = items
        self.folders = folders
        self.problems = problems
        self.unused_reg = unused_reg or []  # reg images beyond what balancing needed; still in tag stats
        self._settings = {s.index: s.settings for s in config.subsets()}
        self._plan_key: tuple | None = None
        self._plan: list[tuple[Size, list[int]]] = []

    def __len__(self) -> int:
        return len(self.items)

    def settings(self, item: ImageItem) -> DatasetConfig:
        """The settings ``item`` trains with: its subset's, or the config's."""
        return self._settings.get(item.subset, self.config)

    @property
    def samples_per_epoch(self) -> int:
        return sum(i.repeats for i in self.items)

    # --- statistics -------------------------------------------------------------------------------
    def _bucket_samples(self) -> Counter:
        counts: Counter = Counter()
        for it in self.items:
            counts[it.bucket] += it.repeats
        return counts

    def steps_per_epoch(self, batch_size: int = 1) -> int:
        """Batches never mix buckets, so each bucket rounds up on its own (as in kohya)."""
        check_batch_size(batch_size)
        return sum(math.ceil(n / batch_size) for n in self._bucket_samples().values())

    def tag_frequency(self, subsets: set[int] | None = None) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: folder -> lower-cased tag -> number of images (repeats ignored);
        of the given subsets' images only, when given."""
        freq: dict[str, dict[str, int]] = {}
        for it in self.items + self.unused_reg:
            if subsets is not None and it.subset not in subsets:
                continue
            per = freq.setdefault(it.folder, {})
            for tag in it.caption.split(self.settings(it).caption_separator):
                tag = tag.strip().lower()
                if tag:
                    per[tag] = per.get(tag, 0) + 1
        return freq

    def dataset_dirs(self, reg: bool = False) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs`` (or ``ss_reg_dataset_dirs`` with reg=True): folder -> repeats and count.

        A folder name met again (the same image_dir in two datasets) gets " (2)", " (3)"..., as kohya does."""
        out: dict[str, dict[str, int]] = {}
        for f in self.folders:
            if f.is_reg == reg and f.images > 0:
                name, n = f.name, 2
                while name in out:
                    name, n = f"{f.name} ({n})", n + 1
                out[name] = {"n_repeats": f.repeats, "img_count": f.images}
        return out

    def fingerprint(self) -> str:
        """Changes whenever the epoch plan would; store it with a Position and refuse to resume on mismatch."""
        data = [(str(i.path), i.repeats, i.bucket, i.is_reg) for i in self.items]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    def captions(self) -> list[str]:
        """The training images' captions as read (not the regularisation images')."""
        return [i.caption for i in self.items if not i.is_reg]

    def summary(self, batch_size: int = 1) -> dict:
        """JSON-ready overview the UI/API shows before training starts."""
        train = [i for i in self.items if not i.is_reg]
        reg = [i for i in self.items if i.is_reg]
        distinct = Counter(i.bucket for i in self.items)
        errors = [p for p in self.problems if p.severity == "error"]
        return {
            "ok": not errors and bool(train),
            "train_dir": str(self.config.train_dir) if self.config.train_dir else None,
            "reg_dir": str(self.config.reg_dir) if self.config.reg_dir else None,
            "resolution": _safe_reso(self.config),
            "datasets": len(self.config.datasets),
            "folders": [f.to_dict() for f in self.folders],
            "train_images": len(train),
            "train_images_x_repeats": sum(i.repeats for i in train),
            "reg_images": sum(f.images for f in self.folders if f.is_reg),
            "reg_images_used": len(reg),
            "reg_images_x_repeats": sum(i.repeats for i in reg),
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": batch_size,
            "steps_per_epoch": self.steps_per_epoch(batch_size),
            "buckets": [{"resolution": list(b), "images": distinct[b], "samples": n}
                        for b, n in sorted(self._bucket_samples().items())],
            "images_without_captions": [str(i.path) for i in self.items + self.unused_reg
                                        if i.caption_source == "folder"],
            "empty_captions": [p.path for p in self.problems if p.kind == "empty_caption"],
            "unreadable": [p.path for p in errors if p.kind in ("unreadable", "too_large", "too_small", "encoding")],
            "errors": [p.message for p in errors],
            "warnings": [p.message for p in self.problems if p.severity == "warning"],
        }

    # --- epoch order ------------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int, batch_size: int, seed: int) -> list[tuple[Size, list[int]]]:
        key = (epoch, batch_size, seed)
        if self._plan_key != key:  # cache one epoch: batches() and resumes ask for the same plan repeatedly
            self._plan_key, self._plan = key, epoch_plan(self.items, epoch, batch_size, seed)
        return self._plan

    def batches(self, epoch: int, batch_size: int, seed: int, start: int = 0) -> Iterator[Batch]:
        """One epoch's batches, each from a single bucket, every item ``repeats`` times; from batch ``start``."""
        check_batch_size(batch_size)
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must not be negative")
        plan = self._epoch_plan(epoch, batch_size, seed)
        if not 0 <= start <= len(plan):
            raise ValueError(f"position {start} is beyond epoch {epoch}'s {len(plan)} batches: "
                             "the dataset or batch size changed since it was saved")
        for i in range(start, len(plan)):
            bucket, idxs = plan[i]
            yield Batch(epoch, i, bucket, tuple(self.items[j] for j in idxs), seed)

    def iterate(self, batch_size: int, seed: int, start: Position = Position(),
                epochs: int | None = None) -> Iterator[Batch]:
        """Batches from ``start`` onwards, through epoch ``epochs - 1`` (forever if None)."""
        epoch = start.epoch
        while epochs is None or epoch < epochs:
            yield from self.batches(epoch, batch_size, seed, start.index if epoch == start.epoch else 0)
            epoch += 1

    # --- samples ----------------------------------------------------------------------------------
    def sample(self, batch: Batch, slot: int) -> Sample:
        """Slot ``slot`` of ``batch``, every random choice drawn from the slot's own RNGs.

        The RNGs depend on the slot in the *global* batch, not on which process trains it."""
        item = batch.items[slot]
        settings = self.settings(item)
        caption = process_caption(item.caption, settings, batch.rng(slot, "caption"), batch.epoch)
        rng = batch.rng(slot, "image")
        flip = settings.flip_aug and rng.random() < 0.5
        placed = self._place(item, batch.bucket, flip, rng, caption)
        if not settings.color_aug:  # its own RNG: flips and crops are drawn as without it
            return placed
        return dataclasses.replace(placed, color=color_aug.draw(batch.rng(slot, "color")))

    def pixels(self, sample: Sample) -> torch.Tensor:
        """The sample's image: float32 CHW in [-1, 1], the VAE's input range."""
        pixels = load_pixels(sample.item.path, sample.item.orientation, sample.resized, sample.window, sample.bucket,
                             sample.flip)
        return color_aug.apply(pixels, sample.color)

    def load_image(self, item: ImageItem, bucket: Size | None = None, flip: bool = False,
                   rng: random.Random | None = None) -> torch.Tensor:
        """One image outside any batch: resized to cover ``bucket``, cropped (random only with
        random_crop and an rng), flipped."""
        return self.pixels(self._place(item, bucket or item.bucket, flip, rng, item.caption))

    def fixed_samples(self) -> list[Sample]:
        """Each image as an epoch draws it when only the flip varies (centred in its bucket, its caption
        unchanged), and flipped too with flip_aug: what the caches (latents.py) fill before the first step."""
        flips = (False, True) if self.config.flip_aug else (False,)
        return [self._place(item, item.bucket, flip, None, item.caption) for item in self.items for flip in flips]

    def _place(self, item: ImageItem, bucket: Size, flip: bool, rng: random.Random | None, caption: str) -> Sample:
        resized = item.resized if bucket == item.bucket else cover_size(item.size, bucket)
        window = crop_offset(resized, bucket, rng if self.settings(item).random_crop else None)
        return Sample(item, bucket, caption, flip, resized, window)


def _safe_reso(config: DatasetConfig) -> list[int] | None:
    try:
        return list(config.reso)
    except ValueError:  # summary of a config whose resolution is the problem
        return None
