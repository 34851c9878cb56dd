"""A small, valid kohya-format LoRA for a real SD layout, for trying the tools without downloads."""
from __future__ import annotations

from pathlib import Path

import torch

from . import families
from .architectures import build
from .fileio import save_safetensors

_ATTN = ("to_q", "to_k", "to_v", "to_out_0", "q_proj", "k_proj", "v_proj", "out_proj")


def sample_state_dict(family: str = "sd1", rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Attention-only LoRA with real key names and shapes for ``family``."""
    mm = build(family, "meta").model_map()
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for t in mm.targets:
        if not t.key.endswith(_ATTN):
            continue
        w = t.weight()
        out_f, in_f = w.shape[0], w.shape[1]
        sd[f"{t.key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).half()
        sd[f"{t.key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).half()
        sd[f"{t.key}.alpha"] = torch.tensor(float(rank) / 2).half()
    return sd


def write_sample_lora(out: Path, family: str = "sd1", rank: int = 4, overwrite: bool = False) -> Path:
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
        "ss_output_name": out.stem, "ss_base_model_version": families.SS_BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        # SD2 samples are for the published 768-v layout
        "modelspec.architecture": families.modelspec_architecture(family, "v") + "/lora",
        "modelspec.title": out.stem, "ss_training_comment": "random sample written by `python -m lib_lora sample`",
    }
    return save_safetensors(sample_state_dict(family, rank), out, meta, overwrite=overwrite)
