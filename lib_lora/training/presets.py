"""Training presets: the starting values a request gets for a model family before its own keys apply."""
from __future__ import annotations

from typing import Any

# Starting points after kohya-ss/sd-scripts' documentation for LoRA on SD1.5 and SDXL.  Keys are
# request keys (options.py; tests check each against the schema); anything given explicitly in a
# request wins.
PRESETS: dict[str, dict[str, Any]] = {
    "sd15": {
        "dataset": {"resolution": 512, "enable_buckets": True, "min_bucket_reso": 256, "max_bucket_reso": 1024,
                    "bucket_reso_steps": 64},
        "network": {"rank": 32, "alpha": 16, "train_unet": True, "train_text_encoder": True},
        "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "optimizer": "AdamW", "lr_scheduler": "cosine",
        "lr_warmup_steps": 0, "batch_size": 1, "max_train_epochs": 10, "save_every_n_epochs": 0,
        "save_precision": "fp16", "mixed_precision": "auto", "min_snr_gamma": 5.0, "noise_offset": 0.0,
        "cache_latents": True, "cache_text_encoder_outputs": True, "seed": 42,
    },
    "sdxl": {
        "dataset": {"resolution": 1024, "enable_buckets": True, "min_bucket_reso": 512, "max_bucket_reso": 2048,
                    "bucket_reso_steps": 64},
        "network": {"rank": 32, "alpha": 16, "train_unet": True, "train_text_encoder": False},
        "learning_rate": 1e-4, "text_encoder_lr": None, "optimizer": "AdamW", "lr_scheduler": "cosine",
        "lr_warmup_steps": 0, "batch_size": 1, "max_train_epochs": 10, "save_every_n_epochs": 0,
        "save_precision": "fp16", "mixed_precision": "auto", "min_snr_gamma": 5.0, "noise_offset": 0.0,
        "cache_latents": True, "cache_text_encoder_outputs": True, "seed": 42,
    },
    # the toy world (lib_lora/toyworld, ``python -m lib_lora demo``): 64 px, a UNet-only LoCon at the
    # settings benchmarks/concept.py compares against kohya's, and pivotal tuning of the trigger (README, "The toy world and the demo":
    # its "Training quality on the toy world" item)
    "toy": {
        "dataset": {"resolution": 64, "enable_buckets": False},
        "network": {"rank": 16, "alpha": 16, "conv_rank": 16, "conv_alpha": 16, "train_unet": True,
                    "train_text_encoder": False},
        "learning_rate": 1e-3, "text_encoder_lr": None, "optimizer": "AdamW", "lr_scheduler": "constant",
        "lr_warmup_steps": 0, "batch_size": 8, "max_train_steps": 500, "max_train_epochs": None,
        "save_every_n_epochs": 0, "save_precision": "fp16", "mixed_precision": "auto", "min_snr_gamma": 5.0,
        "noise_offset": 0.0, "cache_latents": True, "cache_text_encoder_outputs": True, "seed": 42,
        # pivotal tuning, once the tab or the request names the trigger as pivotal_word (the demo does)
        "pivotal_lr": 5e-3, "pivotal_steps": 150,
    },
}
PRESET_LABELS = {"sd15": "SD1.5 (512, rank 32/16, TE on)", "sdxl": "SDXL (1024, rank 32/16, UNet only)",
                 "toy": "Toy world (64 px, LoCon 16/16, UNet only, pivotal tuning; the demo's)"}


def preset_for_family(family: str | None) -> str:
    return "sdxl" if family == "sdxl" else "sd15"
