"""Training images and captions laid out the kohya-ss/sd-scripts way.

Layout::

    train_dir/
        20_robot/            <repeats>_<trigger words>
            a.png  a.txt     caption for a.png (or a.caption)
            b.jpg            no caption file: trained as "robot"
        10_sks dog/ ...
    reg_dir/                 optional regularisation images, same layout
        1_dog/ ...

``scan()`` only reads image *headers* (sizes), so validating thousands of photos
is quick; pixels are decoded by ``load_image()`` when a batch needs them.

Randomness (epoch order, caption shuffle/dropout, flips, random crops) never uses
global state: each epoch and each sample derive their own ``random.Random`` from
(seed, epoch, batch index, slot), so resuming at a saved ``Position`` reproduces
exactly what an uninterrupted run would have done.

Regularisation balancing (kohya's rule): the reg set is sized to the number of
train samples per epoch, T = sum(images x repeats) over train folders.  Reg images
are taken in order (folders by name, files by name), each with its folder's
repeats, until the running total reaches T; images after that are unused this
run.  If every reg image was taken and the total is still below T, repeats are
added one at a time, round-robin from the first reg image, until it reaches T.
So an epoch holds ~2T samples, half of them regularisation.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import math
import random
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Literal, NoReturn

import numpy as np
import torch
from PIL import Image

from .buckets import Assignment, Bucketer, BucketTooSmall, Size, cover_size, crop_offset, parse_resolution
from .options import default as _d

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
_FOLDER = re.compile(r"^(\d+)_(.*)$", re.S)
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (phone photos).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class DatasetError(ValueError):
    """A dataset or config problem; the message names the file or folder at fault."""

    def __init__(self, message: str, path: str | Path | None = None, kind: str = "error") -> None:
        super().__init__(message)
        self.path = str(path) if path is not None else None
        self.kind = kind


@dataclass(frozen=True)
class Problem:
    severity: Literal["error", "warning"]
    kind: str  # config, missing_dir, empty, no_prefix, zero_repeats, unreadable, too_large, too_small,
    #            encoding, empty_caption, no_caption_text, stray_images, no_reg, unused_reg
    message: str
    path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DatasetConfig:
    """Defaults are declared in options.py; ``check()`` refuses settings that cannot work."""
    train_dir: str | Path
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
    max_pixels: int = _d("dataset.max_pixels")

    def __post_init__(self) -> None:
        self.train_dir = Path(self.train_dir)
        self.reg_dir = Path(self.reg_dir) if self.reg_dir not in (None, "") else None
        ext = self.caption_extension.strip()
        self.caption_extension = ext if ext.startswith(".") or not ext else "." + ext

    @property
    def reso(self) -> Size:
        return parse_resolution(self.resolution)

    @property
    def caption_extensions(self) -> tuple[str, ...]:
        """The configured extension first, then the other usual ones."""
        return (self.caption_extension,) + tuple(e for e in CAPTION_EXTENSIONS if e != self.caption_extension)

    def bucketer(self) -> Bucketer:
        return Bucketer(self.reso, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps,
                        no_upscale=self.bucket_no_upscale, enabled=self.enable_buckets)

    def check(self) -> None:
        """Raise ``DatasetError(kind="config")`` for settings that cannot work."""
        def bad(msg: str) -> NoReturn:
            raise DatasetError(msg, kind="config")

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

    def to_dict(self) -> dict:
        return {**asdict(self), "images_x_repeats": self.images * self.repeats}


@dataclass(frozen=True)
class Position:
    """Where training stands: ``index`` batches of ``epoch`` (0-based) are done."""
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        return cls(int(d["epoch"]), int(d["index"]))


def derive_rng(seed: int, *parts: object) -> random.Random:
    """An independent, reproducible RNG for (seed, parts...); stable across processes (no hash())."""
    digest = hashlib.blake2b(repr((int(seed),) + parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


@dataclass(frozen=True)
class Batch:
    epoch: int
    index: int
    bucket: Size
    items: tuple[ImageItem, ...]
    seed: int

    @property
    def next_position(self) -> Position:
        """Save this after the optimiser step for this batch; resuming there continues with the next batch."""
        return Position(self.epoch, self.index + 1)

    def rng(self, slot: int, purpose: str) -> random.Random:
        """Per-sample RNG, independent of other samples, so a resumed run draws the same numbers."""
        return derive_rng(self.seed, "sample", self.epoch, self.index, slot, purpose)


@dataclass
class BatchData:
    pixels: torch.Tensor                  # [B, 3, H, W] float in [-1, 1]
    captions: list[str]
    original_sizes_hw: list[tuple[int, int]]  # SDXL size conditioning
    crop_top_left: list[tuple[int, int]]      # (top, left) in the resized image, after flipping
    target_size_hw: tuple[int, int]
    items: tuple[ImageItem, ...] = ()


def process_caption(caption: str, config: DatasetConfig, rng: random.Random, epoch: int) -> str:
    """Caption dropout, shuffle with kept tokens, and tag dropout, with kohya semantics.

    * whole-caption dropout: probability ``caption_dropout_rate``, and every
      ``caption_dropout_every_n_epochs``-th epoch (counted from 1, as kohya does,
      so with n=2 the 0-based epochs 1, 3, 5... train uncaptioned);
    * ``keep_tokens_separator`` in the caption splits it into a fixed head, a
      shuffled middle and (if it appears twice) a fixed tail; otherwise the first
      ``keep_tokens`` separator-split tags stay in front;
    * tag dropout drops each non-kept tag with probability ``caption_tag_dropout_rate``.
    """
    if config.caption_dropout_rate > 0 and rng.random() < config.caption_dropout_rate:
        return ""
    n = config.caption_dropout_every_n_epochs
    if n > 0 and (epoch + 1) % n == 0:
        return ""
    if not (config.shuffle_caption or config.caption_tag_dropout_rate > 0):
        return caption

    sep = config.caption_separator

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(sep) if t.strip()]

    kts = config.keep_tokens_separator
    if kts and kts in caption:
        head, rest = caption.split(kts, 1)
        middle, _, tail = rest.partition(kts)
        fixed, flex, suffix = tags(head), tags(middle), tags(tail)
    else:
        all_tags = tags(caption)
        fixed, flex, suffix = all_tags[:config.keep_tokens], all_tags[config.keep_tokens:], []
    if config.shuffle_caption:
        rng.shuffle(flex)
    if config.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= config.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


class Dataset:
    """Scanned, validated images; build with ``scan()``."""

    def __init__(self, config: DatasetConfig, items: list[ImageItem], folders: list[FolderInfo],
                 problems: list[Problem], unused_reg: list[ImageItem] | None = None) -> None:
        self.config = config
        self.items = items
        self.folders = folders
        self.problems = problems
        self.unused_reg = unused_reg or []  # reg images beyond what balancing needed; still in tag stats
        self._plan_key: tuple | None = None
        self._plan: list[tuple[Size, list[int]]] = []

    def __len__(self) -> int:
        return len(self.items)

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
        _check_batch_size(batch_size)
        return sum(math.ceil(n / batch_size) for n in self._bucket_samples().values())

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: folder -> lower-cased tag -> number of images (repeats ignored)."""
        freq: dict[str, dict[str, int]] = {}
        for it in self.items + self.unused_reg:
            per = freq.setdefault(it.folder, {})
            for tag in it.caption.split(self.config.caption_separator):
                tag = tag.strip().lower()
                if tag:
                    per[tag] = per.get(tag, 0) + 1
        return freq

    def dataset_dirs(self, reg: bool = False) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs`` (or ``ss_reg_dataset_dirs`` with reg=True): folder -> repeats and count."""
        return {f.name: {"n_repeats": f.repeats, "img_count": f.images}
                for f in self.folders if f.is_reg == reg and f.images > 0}

    def fingerprint(self) -> str:
        """Changes whenever the epoch plan would; store it with a Position and refuse to resume on mismatch."""
        data = [(str(i.path), i.repeats, i.bucket, i.is_reg) for i in self.items]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    def summary(self, batch_size: int = 1) -> dict:
        """JSON-ready overview the UI/API shows before training starts."""
        train = [i for i in self.items if not i.is_reg]
        reg = [i for i in self.items if i.is_reg]
        distinct = Counter(i.bucket for i in self.items)
        errors = [p for p in self.problems if p.severity == "error"]
        return {
            "ok": not errors and bool(train),
            "train_dir": str(self.config.train_dir),
            "reg_dir": str(self.config.reg_dir) if self.config.reg_dir else None,
            "resolution": _safe_reso(self.config),
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
            rng = derive_rng(seed, "epoch", epoch)
            by_bucket: dict[Size, list[int]] = {}
            for idx, it in enumerate(self.items):
                by_bucket.setdefault(it.bucket, []).extend([idx] * it.repeats)
            plan: list[tuple[Size, list[int]]] = []
            for bucket in sorted(by_bucket):  # sorted so the plan never depends on dict/scan order
                entries = by_bucket[bucket]
                rng.shuffle(entries)
                plan += [(bucket, entries[i:i + batch_size]) for i in range(0, len(entries), batch_size)]
            rng.shuffle(plan)  # interleave buckets across the epoch
            self._plan_key, self._plan = key, plan
        return self._plan

    def batches(self, epoch: int, batch_size: int, seed: int, start: int = 0) -> Iterator[Batch]:
        """One epoch's batches, each from a single bucket, every item ``repeats`` times; from batch ``start``."""
        _check_batch_size(batch_size)
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
    def process_caption(self, item: ImageItem, rng: random.Random, epoch: int) -> str:
        return process_caption(item.caption, self.config, rng, epoch)

    def decide_flip(self, rng: random.Random) -> bool:
        return self.config.flip_aug and rng.random() < 0.5

    def load_image(self, item: ImageItem, bucket: Size | None = None, flip: bool = False,
                   rng: random.Random | None = None) -> torch.Tensor:
        """Decode, resize to cover ``bucket``, crop (random only with random_crop and an rng), flip.

        Returns float32 CHW in [-1, 1], the VAE's input range.
        """
        return self._load(item, bucket or item.bucket, flip, rng)[0]

    def _load(self, item: ImageItem, bucket: Size, flip: bool,
              rng: random.Random | None) -> tuple[torch.Tensor, tuple[int, int]]:
        resized = item.resized if bucket == item.bucket else cover_size(item.size, bucket)
        swapped = item.orientation in (5, 6, 7, 8)
        try:
            with Image.open(item.path) as im:
                # JPEG can decode at 1/2..1/8 scale directly (never below the requested size): far
                # faster for big photos.  The file is stored un-rotated, so ask in stored orientation.
                im.draft("RGB", resized[::-1] if swapped else resized)
                img = _to_rgb(im)
        except MemoryError:
            raise
        except Exception as e:  # truncated/corrupt data only shows up when decoding
            raise DatasetError(f"{item.path}: cannot decode image ({e})", item.path, "unreadable") from e
        if item.orientation in _UPRIGHT:
            img = img.transpose(_UPRIGHT[item.orientation])
        if img.size != resized:
            img = img.resize(resized, Image.Resampling.LANCZOS)
        left, top = crop_offset(resized, bucket, rng if self.config.random_crop else None)
        img = img.crop((left, top, left + bucket[0], top + bucket[1]))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = resized[0] - left - bucket[0]  # the crop window as seen in the flipped image
        arr = np.asarray(img, dtype=np.uint8)
        pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return pixels, (top, left)

    def load_batch(self, batch: Batch) -> BatchData:
        """Captions and pixels for a batch, every random choice drawn from the batch's per-sample RNGs."""
        captions, pixels, crops = [], [], []
        for slot, item in enumerate(batch.items):
            captions.append(self.process_caption(item, batch.rng(slot, "caption"), batch.epoch))
            img_rng = batch.rng(slot, "image")
            t, crop = self._load(item, batch.bucket, self.decide_flip(img_rng), img_rng)
            pixels.append(t)
            crops.append(crop)
        return BatchData(torch.stack(pixels), captions, [(i.size[1], i.size[0]) for i in batch.items], crops,
                         (batch.bucket[1], batch.bucket[0]), batch.items)


# --- scanning -------------------------------------------------------------------------------------
class _Report:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.problems: list[Problem] = []

    def error(self, kind: str, message: str, path: str | Path | None = None) -> None:
        if self.strict:
            raise DatasetError(message, path, kind)
        self.problems.append(Problem("error", kind, message, str(path) if path is not None else None))

    def warning(self, kind: str, message: str, path: str | Path | None = None) -> None:
        self.problems.append(Problem("warning", kind, message, str(path) if path is not None else None))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")


def _safe_reso(config: DatasetConfig) -> list[int] | None:
    try:
        return list(config.reso)
    except ValueError:  # summary of a config whose resolution is the problem
        return None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (plain convert() would expose whatever hides under alpha=0)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def read_image_header(path: Path, max_pixels: int) -> tuple[Size, int]:
    """(upright size, EXIF orientation) from the header alone; DatasetError names the file on failure."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = 1
            if "exif" in im.info:  # only EXIF already parsed with the header; asking otherwise may decode
                try:
                    orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
                except Exception:  # a broken EXIF block is no reason to refuse the picture
                    orientation = 1
    except Image.DecompressionBombError:
        raise DatasetError(f"{path}: image is too large (over PIL's decompression-bomb limit of "
                           f"{Image.MAX_IMAGE_PIXELS * 2:,} pixels); downscale it", path, "too_large") from None
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, struct.error...)
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})", path, "unreadable") from None
    if w * h > max_pixels:
        raise DatasetError(f"{path}: image is {w}x{h} ({w * h / 1e6:.1f} megapixels), over the max_pixels limit of "
                           f"{max_pixels / 1e6:g} megapixels; downscale it or raise max_pixels", path, "too_large")
    if w <= 0 or h <= 0:
        raise DatasetError(f"{path}: image has no pixels ({w}x{h})", path, "unreadable")
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), orientation


def read_caption(path: Path) -> str:
    """First non-blank line of a UTF-8 caption file (kohya also uses one line); '' if blank."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read caption ({e.strerror or e})", path, "unreadable") from None
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # Windows Notepad adds a BOM
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = e.start + skip
        raise DatasetError(f"{path}: caption is not valid UTF-8 (byte 0x{raw[pos]:02x} at byte position {pos}); "
                           "re-save it as UTF-8", path, "encoding") from None
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _find_caption(image: Path, config: DatasetConfig) -> Path | None:
    for ext in config.caption_extensions:
        p = image.with_suffix(ext)
        if p.is_file():
            return p
    return None


def _scan_root(root: Path, is_reg: bool, config: DatasetConfig, bucketer: Bucketer,
               report: _Report) -> tuple[list[FolderInfo], list[ImageItem]]:
    label = "regularisation folder" if is_reg else "training folder"
    if not root.is_dir():
        report.error("missing_dir", f"{label} '{root}' does not exist or is not a folder", root)
        return [], []
    folders: list[FolderInfo] = []
    items: list[ImageItem] = []
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    stray = [p for p in entries if _is_image(p)]
    if stray:
        report.warning("stray_images", f"{len(stray)} image(s) directly in '{root}' (e.g. '{stray[0].name}') are not "
                       "used: images go in '<repeats>_<trigger words>' sub-folders such as '10_robot'", root)
    for sub in entries:
        if not sub.is_dir() or sub.name.startswith("."):  # hidden folders (.cache, .ipynb_checkpoints) aren't data
            continue
        images = sorted((p for p in sub.iterdir() if _is_image(p)), key=lambda p: p.name)
        m = _FOLDER.match(sub.name)
        if not m:
            if images:  # folders without images (logs, samples...) are not data either: skip them silently
                report.error("no_prefix", f"folder '{sub.name}' has no '<repeats>_' prefix, e.g. '10_{sub.name}'", sub)
            continue
        repeats, trigger = int(m.group(1)), m.group(2).strip()
        if repeats < 1:
            report.error("zero_repeats", f"folder '{sub.name}' has {repeats} repeats; use at least 1, "
                         f"e.g. '1_{trigger}'", sub)
            continue
        info = FolderInfo(sub.name, str(sub), repeats, trigger, is_reg)
        folders.append(info)
        for img in images:
            item = _scan_image(img, info, config, bucketer, report)
            if item is not None:
                items.append(item)
                info.images += 1
    return folders, items


def _scan_image(img: Path, info: FolderInfo, config: DatasetConfig, bucketer: Bucketer,
                report: _Report) -> ImageItem | None:
    try:
        size, orientation = read_image_header(img, config.max_pixels)
        cap_path = _find_caption(img, config)
        caption = read_caption(cap_path) if cap_path else ""
        try:
            assigned: Assignment = bucketer.assign(*size)
        except BucketTooSmall as e:
            raise DatasetError(f"{img}: {e}", img, "too_small") from None
    except DatasetError as e:
        report.error(e.kind, str(e), e.path)
        return None
    source = "file"
    if cap_path is None:
        source = "folder"
        info.missing_captions += 1
    elif not caption:
        source = "empty"
        info.empty_captions += 1
        report.warning("empty_caption", f"{cap_path}: caption file is empty; using the folder's trigger words "
                       f"'{info.trigger}'", cap_path)
    if source != "file":
        caption = info.trigger
        if not caption:
            report.warning("no_caption_text", f"{img}: no caption and folder '{info.name}' has no trigger words, "
                           "so it trains with an empty caption", img)
    return ImageItem(img, caption, info.repeats, info.is_reg, info.name, size, assigned.bucket, assigned.resized,
                     source, orientation)


def balance_reg(train_samples: int, reg: list[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
    """kohya's rule (see module docstring): (used reg items with new repeats, unused reg items)."""
    if train_samples <= 0 or not reg:
        return [], list(reg)
    repeats: list[int] = []
    total = 0
    for it in reg:  # first pass: whole images with their folder's repeats, until the total is reached
        if total >= train_samples:
            break
        repeats.append(it.repeats)
        total += it.repeats
    i = 0
    while total < train_samples:  # still short: one extra repeat each, round-robin
        repeats[i % len(repeats)] += 1
        total += 1
        i += 1
    used = [replace(it, repeats=r) for it, r in zip(reg, repeats)]
    return used, reg[len(used):]


def scan(config: DatasetConfig, strict: bool = True) -> Dataset:
    """Read the folders and image headers.  strict: raise DatasetError on the first error;
    otherwise skip bad files and record every problem in ``Dataset.problems``.
    Config errors always raise."""
    config.check()
    bucketer = config.bucketer()
    report = _Report(strict)
    with warnings.catch_warnings():
        # Large-but-allowed images would print PIL's bomb warning; max_pixels is our explicit check.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        folders, train = _scan_root(Path(config.train_dir), False, config, bucketer, report)
        reg_folders, reg = [], []
        if config.reg_dir is not None:
            reg_folders, reg = _scan_root(Path(config.reg_dir), True, config, bucketer, report)
    if not train:
        report.error("empty", f"no training images found in '{config.train_dir}': expected sub-folders named "
                     f"'<repeats>_<trigger words>' (e.g. '10_robot') holding {'/'.join(IMAGE_EXTENSIONS)} files",
                     config.train_dir)
    if config.reg_dir is not None and not reg:
        report.warning("no_reg", f"no regularisation images found in '{config.reg_dir}'", config.reg_dir)
    used_reg, unused_reg = balance_reg(sum(i.repeats for i in train), reg)
    if unused_reg:
        report.warning("unused_reg", f"{len(unused_reg)} regularisation image(s) are not used: kohya's balancing needs "
                       "only as many reg samples as train images x repeats", config.reg_dir)
    return Dataset(config, train + used_reg, folders + reg_folders, report.problems, unused_reg)


def validate(config: DatasetConfig, batch_size: int = 1) -> tuple[dict, list[Problem]]:
    """Collect every problem instead of stopping at the first: (summary, problems)."""
    try:
        ds = scan(config, strict=False)
    except DatasetError as e:  # config errors: nothing could be scanned
        ds = Dataset(config, [], [], [Problem("error", e.kind, str(e), e.path)])
    return ds.summary(batch_size), ds.problems
