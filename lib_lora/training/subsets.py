"""kohya's dataset structure: ``[[datasets]]`` entries of ``[[datasets.subsets]]``, each an image folder.

A ``DatasetConfig`` names either a training folder of ``<repeats>_<trigger>`` sub-folders
(``train_dir``) or ``datasets``: kohya's ``[[datasets]]`` list in its JSON form, with this
project's option names (``enable_buckets`` where kohya writes ``enable_bucket``; kohya_dataset.py
translates its TOML).  The ``DatasetConfig``'s own fields play kohya's ``[general]``: a subset's
setting is its own, else its dataset's, else the config's, as in kohya.

Unlike a ``<repeats>_<trigger>`` folder, a subset's ``image_dir`` holds its images directly; its
repeats and trigger words are ``num_repeats`` and ``class_tokens``, whatever the folder is called.
Resolution and buckets belong to a dataset; everything else may vary per subset.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .problems import DatasetError

# a subset's own keys (kohya's DreamBooth subset), with their types; image_dir and is_reg only on a subset
OWN_KEYS: dict[str, Any] = {"image_dir": str | Path, "is_reg": bool, "num_repeats": int, "class_tokens": str}
SUBSET_ONLY = ("image_dir", "is_reg")
# DatasetConfig fields a subset may set (or inherit from its dataset, then from the config)
SUBSET_FIELDS = ("caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator",
                 "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "flip_aug",
                 "random_crop", "color_aug")
# DatasetConfig fields only a dataset (or the config) sets: its subsets share one bucketing
DATASET_FIELDS = ("resolution", "enable_buckets", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                  "bucket_no_upscale")
SUBSET_KEYS = tuple(OWN_KEYS) + SUBSET_FIELDS
DATASET_KEYS = DATASET_FIELDS + SUBSET_FIELDS + ("num_repeats", "class_tokens", "subsets")


@dataclass(frozen=True)
class Subset:
    """One image folder of a ``datasets`` config, its settings resolved."""
    index: int          # among all subsets, in order: images refer to their subset by it
    dataset: int        # its ``datasets`` entry: reg balancing and bucketing are per dataset
    where: str          # "datasets[0].subsets[1]", for messages
    image_dir: Path
    num_repeats: int
    class_tokens: str
    is_reg: bool
    settings: Any       # the DatasetConfig this subset trains with (train_dir = image_dir, no datasets)


def _bad(where: str, message: str) -> DatasetError:
    return DatasetError(f"{where}: {message}", kind="config")


def _check_keys(entry: Any, allowed: tuple[str, ...], where: str, level: str) -> dict:
    if not isinstance(entry, dict):
        raise _bad(where, f"expected an object, got {type(entry).__name__}")
    for key in entry:
        if key not in allowed:
            hint = ""
            if key in DATASET_FIELDS:
                hint = " (it is a dataset's setting: give it to the dataset or the config)"
            elif key in SUBSET_ONLY:
                hint = " (it belongs to a subset)"
            raise _bad(where, f"'{key}' is not a {level} setting here{hint}")
    return entry


def _own(where: str, key: str, value: Any) -> Any:
    if key == "image_dir":
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise _bad(where, f"image_dir: expected a folder path, got {value!r}")
        return Path(str(value).strip()).expanduser()
    if key == "num_repeats":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(where, f"num_repeats: must be a whole number of at least 1 (got {value!r})")
        return value
    if key == "is_reg":
        if not isinstance(value, bool):
            raise _bad(where, f"is_reg: expected true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise _bad(where, f"class_tokens: expected a string, got {value!r}")
    return value.strip()


def resolve(config: Any) -> list[Subset]:
    """Every subset of ``config.datasets`` with its settings (subset, else dataset, else config).

    Raises DatasetError(kind="config") naming the entry for a structure kohya would refuse: an
    unknown or misplaced key, a dataset without subsets, a subset without image_dir."""
    datasets = config.datasets
    if not isinstance(datasets, list):
        raise _bad("datasets", f"expected a list, got {type(datasets).__name__}")
    out: list[Subset] = []
    for d, part in enumerate(datasets):
        where = f"datasets[{d}]"
        _check_keys(part, DATASET_KEYS, where, "dataset")
        subsets = part.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            raise _bad(where, "needs at least one subset (an image_dir)")
        inherited = {k: v for k, v in part.items() if k in DATASET_FIELDS + SUBSET_FIELDS}
        for s, entry in enumerate(subsets):
            sw = f"{where}.subsets[{s}]"
            _check_keys(entry, SUBSET_KEYS, sw, "subset")
            if "image_dir" not in entry:
                raise _bad(sw, "image_dir is required: the folder holding the images")
            own = {k: _own(sw, k, entry.get(k, part.get(k))) for k in OWN_KEYS if k in entry or k in part}
            fields = {**inherited, **{k: v for k, v in entry.items() if k in SUBSET_FIELDS}}
            try:
                settings = dataclasses.replace(config, train_dir=own["image_dir"], reg_dir=None, datasets=[],
                                               **fields)
            except (TypeError, ValueError) as e:
                raise _bad(sw, str(e)) from None
            out.append(Subset(len(out), d, sw, own["image_dir"], own.get("num_repeats", 1),
                              own.get("class_tokens", ""), own.get("is_reg", False), settings))
    return out
