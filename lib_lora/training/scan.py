"""Scanning a training dataset laid out the kohya-ss/sd-scripts way into a ``Dataset``.

Layout::

    train_dir/
        20_robot/            <repeats>_<trigger words>
            a.png  a.txt     caption for a.png (or a.caption)
            b.jpg            no caption file: trained as "robot"
        10_sks dog/ ...
    reg_dir/                 optional regularisation images, same layout
        1_dog/ ...

Only image *headers* are read (sizes), so validating thousands of photos is quick.

Regularisation balancing (kohya's rule): the reg set is sized to the number of
train samples per epoch, T = sum(images x repeats) over train folders.  Reg images
are taken in order (folders by name, files by name), each with its folder's
repeats, until the running total reaches T; images after that are unused this
run.  If every reg image was taken and the total is still below T, repeats are
added one at a time, round-robin from the first reg image, until it reaches T.
So an epoch holds ~2T samples, half of them regularisation.

With kohya's dataset config (``DatasetConfig.datasets``, subsets.py) each subset's image_dir
holds its images directly, with the subset's repeats, trigger words and settings; each dataset
is bucketed and balanced on its own, as kohya does.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path

from PIL import Image

from .buckets import Assignment, Bucketer, BucketTooSmall
from .captions import read_caption
from .checks import pivotal_caption_problem
from .dataset import Dataset, DatasetConfig, FolderInfo, ImageItem
from .subsets import Subset
from .images import IMAGE_EXTENSIONS, is_image, read_image_header
from .problems import DatasetError, Problem

_FOLDER = re.compile(r"^(\d+)_(.*)$", re.S)


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
    stray = [p for p in entries if is_image(p)]
    if stray:
        report.warning("stray_images", f"{len(stray)} image(s) directly in '{root}' (e.g. '{stray[0].name}') are not "
                       "used: images go in '<repeats>_<trigger words>' sub-folders such as '10_robot'", root)
    for sub in entries:
        if not sub.is_dir() or sub.name.startswith("."):  # hidden folders (.cache, .ipynb_checkpoints) aren't data
            continue
        images = sorted((p for p in sub.iterdir() if is_image(p)), key=lambda p: p.name)
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
                     source, orientation, info.subset)


def _scan_subset(sub: Subset, bucketer: Bucketer, report: _Report) -> tuple[FolderInfo | None, list[ImageItem]]:
    root = sub.image_dir
    if not root.is_dir():
        report.error("missing_dir", f"{sub.where}: image_dir '{root}' does not exist or is not a folder", root)
        return None, []
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    images = [p for p in entries if is_image(p)]
    if not images:
        nested = [p for p in entries if p.is_dir() and _FOLDER.match(p.name)]
        hint = ""
        if nested:  # a kohya training folder given where its image folder is meant
            m = _FOLDER.match(nested[0].name)
            hint = (f": kohya's image_dir is the folder holding the images, not their parent (e.g. image_dir = "
                    f"'{nested[0]}' with num_repeats = {m.group(1)} and class_tokens = '{m.group(2).strip()}')")
        report.error("empty", f"{sub.where}: no images in '{root}'{hint}", root)
    info = FolderInfo(root.name, str(root), sub.num_repeats, sub.class_tokens, sub.is_reg, subset=sub.index)
    items = []
    for img in images:
        item = _scan_image(img, info, sub.settings, bucketer, report)
        if item is not None:
            items.append(item)
            info.images += 1
    return info, items


def _scan_datasets(config: DatasetConfig, report: _Report) -> list[tuple[list[FolderInfo], list[ImageItem],
                                                                          list[ImageItem]]]:
    """(folders, train items, reg items) of each ``datasets`` entry."""
    groups: list[tuple[list[FolderInfo], list[ImageItem], list[ImageItem]]] = []
    seen: set[tuple[int, Path]] = set()
    for sub in config.subsets():
        if sub.dataset == len(groups):
            groups.append(([], [], []))
            bucketer = sub.settings.bucketer()  # resolution and buckets are the same for a dataset's subsets
        key = (sub.dataset, sub.image_dir.resolve())
        if key in seen:  # kohya's rule: a dataset takes a folder once
            report.warning("duplicate_subset", f"{sub.where}: image_dir '{sub.image_dir}' is already a subset of "
                           f"datasets[{sub.dataset}]; this one is skipped, as kohya skips it", sub.image_dir)
            continue
        seen.add(key)
        info, items = _scan_subset(sub, bucketer, report)
        folders, train, reg = groups[sub.dataset]
        if info is not None:
            folders.append(info)
        (reg if sub.is_reg else train).extend(items)
    return groups


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


def _warn_upscaled(items: list[ImageItem], config: DatasetConfig, report: _Report) -> None:
    """Images smaller than what they are trained at are enlarged: said, never done silently."""
    up = [i for i in items if i.resized[0] > i.size[0] or i.resized[1] > i.size[1]]
    if not up:
        return
    (w, h), (rw, rh) = up[0].size, up[0].resized
    fix = ("or set bucket_no_upscale to train each at its own size (rounded down to bucket_reso_steps)"
           if config.enable_buckets else "or turn buckets on with bucket_no_upscale to train each at its own size")
    report.warning("upscaled", f"{len(up)} image(s) are smaller than their training size and will be upscaled, "
                   f"e.g. '{up[0].path.name}' {w}x{h} to {rw}x{rh}: use larger images, a lower resolution, {fix}",
                   up[0].path)


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
        if config.datasets:
            groups = _scan_datasets(config, report)
        else:
            folders, train = _scan_root(Path(config.train_dir), False, config, bucketer, report)
            reg_folders, reg = [], []
            if config.reg_dir is not None:
                reg_folders, reg = _scan_root(Path(config.reg_dir), True, config, bucketer, report)
            groups = [(folders + reg_folders, train, reg)]
    if not config.datasets:
        _, train, reg = groups[0]
        if not train:
            report.error("empty", f"no training images found in '{config.train_dir}': expected sub-folders named "
                         f"'<repeats>_<trigger words>' (e.g. '10_robot') holding {'/'.join(IMAGE_EXTENSIONS)} files",
                         config.train_dir)
        if config.reg_dir is not None and not reg:
            report.warning("no_reg", f"no regularisation images found in '{config.reg_dir}'", config.reg_dir)
    items, all_folders, all_unused = [], [], []
    trained = {s.dataset for s in config.subsets() if not s.is_reg}
    for d, (folders, train, reg) in enumerate(groups):
        where = f"datasets[{d}]: " if config.datasets else ""
        if config.datasets and d not in trained:  # (an empty or missing image_dir is reported as such)
            report.error("empty", f"{where}no training images: every subset is is_reg")
        used_reg, unused_reg = balance_reg(sum(i.repeats for i in train), reg)  # per dataset, as kohya balances
        if unused_reg:
            report.warning("unused_reg", f"{where}{len(unused_reg)} regularisation image(s) are not used: kohya's "
                           "balancing needs only as many reg samples as train images x repeats",
                           config.reg_dir or unused_reg[0].path.parent)
        items += train + used_reg
        all_folders += folders
        all_unused += unused_reg
    _warn_upscaled(items, config, report)
    return Dataset(config, items, all_folders, report.problems, all_unused)


def validate(config: DatasetConfig, batch_size: int = 1, pivotal_word: str = "") -> tuple[dict, list[Problem]]:
    """Collect every problem instead of stopping at the first: (summary, problems); ``pivotal_word`` must stand
    in a training caption."""
    try:
        ds = scan(config, strict=False)
    except DatasetError as e:  # config errors: nothing could be scanned
        ds = Dataset(config, [], [], [Problem("error", e.kind, str(e), e.path)])
    problem = pivotal_caption_problem(pivotal_word, ds.captions()) if pivotal_word and ds.items else None
    extra = [Problem("error", "pivotal_word", problem, str(config.train_dir))] if problem else []
    return ds.summary(batch_size), ds.problems + extra
