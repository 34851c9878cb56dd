"""kohya's dataset config (``--dataset_config dataset.toml``), read into a request's ``dataset`` and written back.

The schema is sd-scripts' (library/config_util.py, v0.10.1): ``[general]``, ``[[datasets]]`` and
``[[datasets.subsets]]``, each level taking the keys kohya allows there, a lower level's value
winning.  A DreamBooth-style subset (``image_dir`` with its images, ``num_repeats``,
``class_tokens``, ``is_reg``) is what this trainer has; the result is a request's ``dataset``
object whose ``datasets`` list subsets.py reads.  A key kohya knows but this trainer cannot honour
(``metadata_file``, ``enable_wildcard``…) is refused by name, and so is a
key kohya does not know: nothing is ignored.  Settings kohya lets each dataset choose but which are
one per run here (``batch_size``) must agree across datasets.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import RequestError
from .subsets import DATASET_FIELDS, SUBSET_FIELDS

# kohya's name -> this project's, where they differ
_RENAMED = {"enable_bucket": "enable_buckets"}
_KOHYA = {v: k for k, v in _RENAMED.items()}

# kohya's keys, by where its schema allows them (ConfigSanitizer's schemas, DreamBooth and dropout on)
_SUBSET_ASCENDABLE = ("color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption",
                      "keep_tokens", "keep_tokens_separator", "secondary_separator", "caption_separator",
                      "enable_wildcard", "token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix",
                      "custom_attributes", "resize_interpolation", "caption_dropout_every_n_epochs",
                      "caption_dropout_rate", "caption_tag_dropout_rate", "caption_extension", "class_tokens",
                      "cache_info")
_DATASET_ASCENDABLE = ("batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                       "min_bucket_reso", "validation_seed", "validation_split", "resolution", "network_multiplier",
                       "resize_interpolation")
_SUBSET_DISTINCT = ("image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir")
GENERAL_KEYS = _DATASET_ASCENDABLE + _SUBSET_ASCENDABLE
DATASET_KEYS = GENERAL_KEYS + ("subsets",)
SUBSET_KEYS = _SUBSET_ASCENDABLE + _SUBSET_DISTINCT

# kohya keys whose effect this trainer does not have: accepted at the value that means "off"
_OFF: dict[str, tuple[tuple, str]] = {
    "enable_wildcard": ((False,), "wildcard and multi-line captions are not implemented"),
    "token_warmup_min": ((1,), "token warm-up is not implemented"),
    "token_warmup_step": ((0, 0.0), "token warm-up is not implemented"),
    "alpha_mask": ((False,), "alpha masks (masked loss) are not implemented"),
    "network_multiplier": ((1, 1.0), "per-dataset network multipliers are not implemented"),
    "validation_split": ((0, 0.0), "validation splits are not implemented"),
    "caption_prefix": (("",), "caption prefixes are not implemented"),
    "caption_suffix": (("",), "caption suffixes are not implemented"),
    "secondary_separator": ((), "secondary separators are not implemented"),
    "face_crop_aug_range": ((), "face-crop augmentation is not implemented"),
    "custom_attributes": ((), "custom attributes are not implemented"),
    "resize_interpolation": ((), "choosing the resize interpolation is not implemented (Lanczos is used)"),
    "metadata_file": ((), "fine-tuning datasets (metadata_file, kohya's in_json) are not implemented: give "
                          "image_dir with caption files beside the images"),
    "conditioning_data_dir": ((), "ControlNet datasets are not implemented"),
}
# kohya keys that change nothing in the trained file, accepted with any value: validation_seed only
# seeds a validation split (refused above unless 0); cache_info only caches image sizes, which are
# read from the image headers here anyway
_NO_EFFECT = ("validation_seed", "cache_info")
_PER_RUN = ("batch_size",)  # per dataset in kohya, one per run here
_OUR_KEYS = ("num_repeats", "class_tokens")  # kept under kohya's name in the request's datasets


class DatasetConfigError(RequestError):
    """The dataset config cannot be used; the message names the file and the key."""


def _check(entry: Any, allowed: tuple[str, ...], where: str, source: str) -> dict:
    if not isinstance(entry, dict):
        raise DatasetConfigError(f"{source}: {where}: expected a table, got {type(entry).__name__}")
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        k = unknown[0]
        if k in SUBSET_KEYS + DATASET_KEYS:
            levels = [name for name, keys in (("[general]", GENERAL_KEYS), ("[[datasets]]", DATASET_KEYS),
                                              ("[[datasets.subsets]]", SUBSET_KEYS)) if k in keys]
            raise DatasetConfigError(f"{source}: {where}: '{k}' is not allowed here; kohya takes it in "
                                     f"{' or '.join(levels)}")
        raise DatasetConfigError(f"{source}: {where}: '{k}' is not a key of kohya's dataset config")
    return entry


def _translate(entry: dict, where: str, source: str) -> dict:
    """An entry's keys in this project's names, without the keys that mean "off" here."""
    out = {}
    for key, value in entry.items():
        if key in _OFF:
            allowed, why = _OFF[key]
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise DatasetConfigError(f"{source}: {where}.{key} = {value!r}: {why}")
            continue
        if key in _NO_EFFECT or key == "subsets":
            continue
        out[_RENAMED.get(key, key)] = list(value) if isinstance(value, tuple) else value
    return out


def read_dataset_config(data: dict, source: str = "dataset config") -> tuple[dict, dict]:
    """kohya's dataset config (parsed TOML or JSON) -> (the request's ``dataset`` keys, its top-level keys).

    ``dataset`` holds ``[general]``'s settings and ``datasets``; the top level holds ``batch_size``
    when the file sets one.  Raises DatasetConfigError naming the file and the key."""
    _check(data, ("general", "datasets"), "top level", source)
    general = _translate(_check(data.get("general", {}), GENERAL_KEYS, "[general]", source), "general", source)
    parts = data.get("datasets")
    if not isinstance(parts, list) or not parts:
        raise DatasetConfigError(f"{source}: needs at least one [[datasets]] entry with [[datasets.subsets]]")
    datasets, sizes = [], {}
    for d, part in enumerate(parts):
        where = f"datasets[{d}]"
        _check(part, DATASET_KEYS, f"[[datasets]] #{d + 1}", source)
        entry = _translate(part, where, source)
        for key in _OUR_KEYS:  # [general]'s, as this project's config has no field for them
            if key in general and key not in entry:
                entry[key] = general[key]
        subsets = part.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            raise DatasetConfigError(f"{source}: {where} needs at least one [[datasets.subsets]] (an image_dir)")
        entry["subsets"] = []
        for s, sub in enumerate(subsets):
            sw = f"{where}.subsets[{s}]"
            _check(sub, SUBSET_KEYS, f"[[datasets.subsets]] #{s + 1} of [[datasets]] #{d + 1}", source)
            if "image_dir" not in sub and "metadata_file" not in sub:
                raise DatasetConfigError(f"{source}: {sw}: image_dir is required")
            entry["subsets"].append(_translate(sub, sw, source))
        for key in _PER_RUN:
            value = entry.pop(key, general.get(key))
            if value is not None:
                sizes[d] = value
        datasets.append(entry)
    if len(set(sizes.values())) > 1:
        (a, va), = list(sizes.items())[:1]
        b, vb = next((d, v) for d, v in sizes.items() if v != va)
        raise DatasetConfigError(f"{source}: datasets[{a}] has batch_size {va} but datasets[{b}] {vb}: one batch "
                                 "size serves every dataset here")
    general = {k: v for k, v in general.items() if k not in _OUR_KEYS + _PER_RUN}
    top = {"batch_size": next(iter(sizes.values()))} if sizes else {}
    return {**general, "datasets": datasets}, top


# -- writing ---------------------------------------------------------------------------------------

_FOLDER = re.compile(r"^(\d+)_(.*)$", re.S)
_GENERAL_FIELDS = DATASET_FIELDS + SUBSET_FIELDS


def _kohya_value(key: str, value: Any) -> Any:
    if key == "resolution":
        if isinstance(value, str):
            value = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        if isinstance(value, (list, tuple)):
            value = list(value)
            return value[0] if len(value) == 2 and value[0] == value[1] else value
    if isinstance(value, Path):
        return str(value)
    return value


def _kohya_keys(entry: dict) -> dict:
    return {_KOHYA.get(k, k): _kohya_value(k, v) for k, v in entry.items()}


def folder_subsets(train_dir: Path, reg_dir: Path | None) -> list[dict]:
    """The subsets a training folder of ``<repeats>_<trigger>`` sub-folders (and a regularisation one)
    stands for, as kohya turns ``--train_data_dir`` into a dataset config."""
    out = []
    for root, is_reg in ((train_dir, False), (reg_dir, True)):
        if root is None:
            continue
        if not Path(root).is_dir():
            raise DatasetConfigError(f"'{root}' does not exist or is not a folder")
        for sub in sorted(Path(root).iterdir(), key=lambda p: p.name):
            m = _FOLDER.match(sub.name)
            if sub.is_dir() and not sub.name.startswith(".") and m and int(m.group(1)) >= 1:
                out.append({"image_dir": str(sub), "num_repeats": int(m.group(1)), "class_tokens": m.group(2).strip(),
                            "is_reg": is_reg})
    if not out:
        raise DatasetConfigError(f"'{train_dir}' holds no '<repeats>_<trigger>' sub-folders")
    return out


def dataset_config_data(dataset: Any, batch_size: int) -> dict:
    """A ``DatasetConfig`` as kohya's dataset config: its own settings in ``[general]`` (all of them,
    so kohya, whose defaults differ, reads the same), and its datasets, or its folders as one dataset."""
    general = {k: getattr(dataset, k) for k in _GENERAL_FIELDS}
    general["batch_size"] = batch_size
    if dataset.datasets:
        parts = [{**{k: v for k, v in part.items() if k != "subsets"},
                  "subsets": [_kohya_keys(s) for s in part["subsets"]]} for part in dataset.datasets]
    else:
        parts = [{"subsets": folder_subsets(dataset.train_dir, dataset.reg_dir)}]
    return {"general": _kohya_keys(general), "datasets": [_kohya_keys(p) for p in parts]}


# kohya's keys read into a DatasetConfig option of the same meaning (tests check each is one)
HONOURED = tuple(_RENAMED.get(k, k) for k in dict.fromkeys(GENERAL_KEYS + SUBSET_KEYS)
                 if k not in _OFF and k not in _NO_EFFECT and k not in _PER_RUN + _OUR_KEYS + _SUBSET_DISTINCT)
