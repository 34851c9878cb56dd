"""The ``ss_*`` and ``modelspec.*`` metadata kohya's sd-scripts write, so every tool reads our files."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from .. import __version__
from .options import OPTIONS

_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def architecture(family: str, prediction: str) -> str:
    arch = _ARCH[family]
    if family == "sd2" and prediction == "v":
        arch = "stable-diffusion-v2-768-v"
    return f"{arch}/lora"


def option_metadata(cfg: Any) -> dict[str, Any]:
    """The ss_* keys that hold one option's value as it is (options.py names them)."""
    out = {}
    for o in OPTIONS:
        if o.ss:
            out[o.ss] = getattr(getattr(cfg, o.section) if o.section else cfg, o.name)
    return out


def build_metadata(*, family: str, prediction: str, session_id: str, started_at: float, output_name: str,
                   cfg: Any, dataset: Any, model_name: str, model_hash: str, legacy_hash: str,
                   steps: int, epoch: int, num_batches_per_epoch: int, max_steps: int, optimizer_desc: str,
                   resolution: tuple[int, int], finished: bool, comment: str = "",
                   world_size: int = 1) -> dict[str, str]:
    """Everything as strings (safetensors metadata is str -> str), kohya's key names and formats."""
    n = cfg.network
    reg_dirs = dataset.dataset_dirs(reg=True) if dataset.config.reg_dir else {}
    meta: dict[str, Any] = {
        **option_metadata(cfg),
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_unet_lr": cfg.learning_rate if n.train_unet else None,
        "ss_text_encoder_lr": (cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate)
        if n.train_text_encoder else None,
        "ss_num_train_images": sum(1 for i in dataset.items if not i.is_reg),
        "ss_num_reg_images": sum(1 for i in dataset.items if i.is_reg),
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": -(-max_steps // max(num_batches_per_epoch, 1)),
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": max_steps,
        "ss_network_module": "networks.lora",
        "ss_network_dropout": n.dropout or None,
        "ss_network_args": json.dumps({"conv_dim": str(n.conv_rank), "conv_alpha": str(n.conv_alpha)})
        if n.conv_rank > 0 else None,
        "ss_full_fp16": False,
        "ss_v2": family == "sd2",
        "ss_v_parameterization": prediction == "v",
        "ss_base_model_version": _BASE_VERSION[family],
        "ss_clip_skip": None,
        "ss_max_token_length": None,
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_optimizer": optimizer_desc,
        "ss_prior_loss_weight": 1.0,
        "ss_total_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world_size,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_color_aug": False,
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_bucket_info": json.dumps(dataset.summary(cfg.batch_size).get("buckets", {}), default=str),
        "ss_sd_model_name": model_name,
        "ss_new_sd_model_hash": model_hash,
        "ss_sd_model_hash": legacy_hash,
        "ss_training_comment": comment or None,
        "ss_sd_scripts_commit_hash": f"lora-workshop {__version__}",
        "ss_training_finished_at": time.time() if finished else None,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture(family, prediction),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.fromtimestamp(started_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
    }
    return {k: _s(v) for k, v in meta.items() if v is not None}


def _s(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    return str(v)
