"""The ``ss_*`` and ``modelspec.*`` metadata kohya's sd-scripts (v0.10.1) write, so every tool reads our files.

Every key train_network.py writes is written, in its format: a value of None is the string
"None" (sd-scripts writes ``str(value)`` for every key), JSON values are JSON, and the keys
for features this trainer does not have hold sd-scripts' own defaults for them.
tests/data/sd_scripts_v0.10.1_lora_header.json is the reference the tests compare against.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__, families
from .buckets import parse_resolution
from .options import OPTIONS

SAI_MODEL_SPEC = "1.0.1"
VERSION_KEY = "lora_workshop.version"  # our release; ss_sd_scripts_commit_hash holds a commit-like hash

# What sd-scripts writes for features this trainer does not have, at their defaults (which is
# also what this trainer does: MSE loss, plain noise, no validation split).
_NOT_HERE: dict[str, Any] = {
    "ss_num_validation_images": 0, "ss_lowram": False,
    "ss_multires_noise_iterations": None, "ss_multires_noise_discount": 0.3, "ss_adaptive_noise_scale": None,
    "ss_zero_terminal_snr": False, "ss_face_crop_aug_range": None, "ss_scale_weight_norms": None,
    "ss_ip_noise_gamma": None, "ss_noise_offset_random_strength": False,
    "ss_ip_noise_gamma_random_strength": False, "ss_loss_type": "l2", "ss_huber_schedule": "snr",
    "ss_huber_scale": 1.0, "ss_huber_c": 0.1, "ss_fp8_base": False, "ss_fp8_base_unet": False,
    "ss_validation_seed": None, "ss_validation_split": 0.0, "ss_max_validation_steps": None,
    "ss_validate_every_n_epochs": None, "ss_validate_every_n_steps": None, "ss_resize_interpolation": None,
}


# what train_network.py (v0.10.1) writes only without a dataset config: with one, each dataset's
# batch size, resolution, buckets and augmentations are in ss_datasets instead
SINGLE_DATASET_KEYS = (
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_reg_dataset_dirs", "ss_bucket_info",
)


def architecture(family: str, prediction: str) -> str:
    """modelspec.architecture of a LoRA: its base model's, with sd-scripts' "/lora" suffix."""
    return f"{families.modelspec_architecture(family, prediction)}/lora"


def base_model_version(family: str, prediction: str) -> str:
    """sd-scripts' ss_base_model_version: sd_v1 / sd_v2, with "_v" for v-prediction; SDXL's own name."""
    base = families.SS_BASE_MODEL_VERSION[family]
    return base if family == "sdxl" else base + ("_v" if prediction == "v" else "")


@functools.lru_cache(maxsize=1)
def source_revision() -> str:
    """A commit hash for ss_sd_scripts_commit_hash: this extension's git commit when it is a git
    checkout of its own, else the SHA-1 of our version string (still 40 hex digits)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        lines = out.stdout.split()
        # inside another repository (an extension copied into the WebUI's checkout) the commit is not ours
        if out.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == root \
                and re.fullmatch(r"[0-9a-f]{40}", lines[1]):
            return lines[1]
    except (OSError, subprocess.SubprocessError):
        pass  # no git on this machine: the version's hash below says which release wrote the file
    return hashlib.sha1(f"lora-workshop {__version__}".encode()).hexdigest()


# ss_* keys of options sd-scripts does not have -> the option that turns them on: written only when it is
# set, so that a file trained without them has exactly the keys sd-scripts writes
OWN_KEYS = {"ss_ema_decay": "ema_decay", "ss_pivotal_word": "pivotal_word", "ss_pivotal_lr": "pivotal_word",
            "ss_pivotal_steps": "pivotal_word"}


def option_metadata(cfg: Any) -> dict[str, Any]:
    """The ss_* keys that hold one option's value as it is (options.py names them), in the option's type."""
    out = {}
    for o in OPTIONS:
        if o.ss:
            value = getattr(getattr(cfg, o.section) if o.section else cfg, o.name)
            if o.ss in OWN_KEYS and getattr(cfg, OWN_KEYS[o.ss]) in (None, ""):
                continue
            if o.type in (float, float | None) and value is not None:
                value = float(value)  # sd-scripts' float options read "8.0", never "8"
            out[o.ss] = value
    return out


def bucket_info(dataset: Any) -> dict[str, Any] | None:
    """sd-scripts' ss_bucket_info: {"buckets": {index: {"resolution": [w, h], "count": images x repeats}},
    "mean_img_ar_error": mean |bucket ratio - image ratio| over the images}; None without buckets.

    The index is the bucket's place among all bucket sizes, sorted, as sd-scripts numbers them."""
    return _bucket_info(dataset.items, dataset.config)


def _bucket_info(items: list, cfg: Any) -> dict[str, Any] | None:
    if not cfg.enable_buckets:
        return None
    counts: dict[tuple[int, int], int] = {}
    for item in items:
        counts[item.bucket] = counts.get(item.bucket, 0) + item.repeats
    sizes = sorted(set(cfg.bucketer().resolutions) | set(counts))
    errors = [abs(i.bucket[0] / i.bucket[1] - i.size[0] / i.size[1]) for i in items]
    return {"buckets": {i: {"resolution": list(size), "count": counts[size]}
                        for i, size in enumerate(sizes) if counts.get(size)},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def datasets_info(dataset: Any, batch_size: int) -> list[dict[str, Any]]:
    """sd-scripts' ss_datasets, written when a dataset config is trained: per dataset its size,
    bucketing, tag frequency and bucket info, and per subset its folder (by name) and settings."""
    subsets = dataset.config.subsets()
    folders = {f.subset: f for f in dataset.folders}
    out = []
    for d in sorted({s.dataset for s in subsets}):
        subs = [s for s in subsets if s.dataset == d]
        st, own = subs[0].settings, {s.index for s in subs}

        def images(reg: bool) -> int:
            return sum(folders[s.index].images * s.num_repeats for s in subs if s.index in folders and s.is_reg == reg)

        out.append({
            "is_dreambooth": True, "batch_size_per_device": batch_size,
            "num_train_images": images(False), "num_reg_images": images(True), "resolution": list(st.reso),
            "enable_bucket": st.enable_buckets,
            "min_bucket_reso": st.min_bucket_reso if st.enable_buckets else None,
            "max_bucket_reso": st.max_bucket_reso if st.enable_buckets else None,
            "tag_frequency": dataset.tag_frequency(own),
            "bucket_info": _bucket_info([i for i in dataset.items if i.subset in own], st),
            "resize_interpolation": None,
            "subsets": [{"img_count": folders[s.index].images if s.index in folders else 0,
                         "num_repeats": s.num_repeats, "color_aug": s.settings.color_aug, "flip_aug": s.settings.flip_aug,
                         "random_crop": s.settings.random_crop, "shuffle_caption": s.settings.shuffle_caption,
                         "keep_tokens": s.settings.keep_tokens,
                         "keep_tokens_separator": s.settings.keep_tokens_separator, "secondary_separator": None,
                         "enable_wildcard": False, "caption_prefix": None, "caption_suffix": None,
                         "resize_interpolation": None, "image_dir": s.image_dir.name,
                         "class_tokens": s.class_tokens or None, "is_reg": s.is_reg} for s in subs],
        })
    return out


def optimizer_text(class_path: str, cfg: Any) -> str:
    """ss_optimizer: the class, then the arguments given to it as sd-scripts lists them."""
    args = dict(cfg.optimizer_args)
    if cfg.weight_decay != 0.01:  # kohya passes weight decay through optimizer_args, the default unnamed
        args = {"weight_decay": cfg.weight_decay, **args}
    return class_path + (f"({','.join(f'{k}={v}' for k, v in args.items())})" if args else "")


def build_metadata(*, family: str, prediction: str, session_id: str, started_at: float, output_name: str,
                   cfg: Any, dataset: Any, model_name: str, model_hash: str, legacy_hash: str,
                   steps: int, epoch: int, num_batches_per_epoch: int, max_steps: int, optimizer_desc: str,
                   resolution: tuple[int, int], comment: str = "", world_size: int = 1,
                   saved_at: float | None = None) -> dict[str, str]:
    """Every key as a string (safetensors metadata is str -> str), in sd-scripts' names and formats.

    ``epoch`` is the ss_epoch of this save (see outputs.saves_due / final_epoch); ``saved_at`` is
    ss_training_finished_at, which sd-scripts writes at every save.

    With a dataset config, sd-scripts writes each dataset's resolution in ss_datasets and no
    ss_resolution, and takes modelspec.resolution from --resolution (what the datasets fall back
    to), not from a dataset: so does this, whatever ``resolution`` (the first dataset's) says.
    """
    n, d = cfg.network, cfg.dataset
    saved_at = time.time() if saved_at is None else saved_at
    reg_dirs = dataset.dataset_dirs(reg=True) if d.reg_dir else {}
    updates_per_epoch = max(1, math.ceil(num_batches_per_epoch / cfg.gradient_accumulation_steps))
    buckets = bucket_info(dataset)
    if d.datasets:
        resolution = parse_resolution(d.resolution)
    meta: dict[str, Any] = {
        **_NOT_HERE,
        **option_metadata(cfg),
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        # images x repeats, as the folders declare them (sd-scripts counts reg images before balancing)
        "ss_num_train_images": sum(f.images * f.repeats for f in dataset.folders if not f.is_reg),
        "ss_num_reg_images": sum(f.images * f.repeats for f in dataset.folders if f.is_reg),
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": math.ceil(max_steps / updates_per_epoch),
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": max_steps,
        "ss_network_dropout": n.dropout or None,
        "ss_v2": family == "sd2",
        "ss_base_model_version": base_model_version(family, prediction),
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_optimizer": optimizer_text(optimizer_desc, cfg),
        "ss_total_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world_size,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        # sd-scripts' dataset has no bucket sizes or no-upscale without buckets
        "ss_min_bucket_reso": d.min_bucket_reso if d.enable_buckets else None,
        "ss_max_bucket_reso": d.max_bucket_reso if d.enable_buckets else None,
        "ss_bucket_no_upscale": bool(d.enable_buckets and d.bucket_no_upscale),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_bucket_info": json.dumps(buckets),
        "ss_sd_model_name": model_name,
        "ss_new_sd_model_hash": model_hash,
        "ss_sd_model_hash": legacy_hash,
        "ss_training_comment": comment or None,
        "ss_sd_scripts_commit_hash": source_revision(),
        "ss_training_finished_at": saved_at,
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": architecture(family, prediction),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.fromtimestamp(int(saved_at), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
        "modelspec.implementation_version": f"lora-workshop/{source_revision()}",
        VERSION_KEY: __version__,
    }
    if d.datasets:  # sd-scripts' dataset-config branch: these facts per dataset, in ss_datasets, instead
        meta["ss_datasets"] = json.dumps(datasets_info(dataset, cfg.batch_size))
        for key in SINGLE_DATASET_KEYS:
            meta.pop(key, None)
    if n.conv_rank > 0:  # what kohya's --network_args "conv_dim=…" "conv_alpha=…" record, with its dropout
        meta["ss_network_args"] = json.dumps({"conv_dim": str(n.conv_rank), "conv_alpha": f"{n.conv_alpha:g}",
                                              "dropout": n.dropout or None})
    if cfg.clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(cfg.clip_skip)
    return {k: _s(v) for k, v in meta.items()}


def _s(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return str(v)
