"""Named errors and the rules every tool's output follows."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch


class ToolError(ValueError):
    """A tool refused its input; the message says why in one line."""


class FamilyMismatchError(ToolError):
    """Inputs made for different model families (SD1/SD2/SDXL)."""


class CheckpointMismatchError(ToolError):
    """Two checkpoints that are not the same architecture (extract)."""


class UnknownKeysError(ToolError):
    """A LoRA names layers the model does not have, or tensors no adapter understands."""


class NeedsBaseError(ToolError):
    """The algorithm's delta depends on the base weight (DoRA, OFT, IA3): pass --base CKPT."""


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool) -> Path:
    """The output path, refused when it is an input (even with ``force``) or exists without ``force``."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ToolError(f"{out}: outputs are written as .safetensors; name the file NAME.safetensors")
    for p in inputs:
        p = Path(p)
        if out.resolve() == p.resolve() or (out.exists() and p.exists() and os.path.samefile(out, p)):
            raise ToolError(f"{out}: the output would overwrite an input; choose another name")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and out.is_dir():
        raise IsADirectoryError(f"{out} is a folder")
    return out


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Float tensors to ``dtype`` (None: as they are), contiguous on the CPU."""
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.detach().contiguous().cpu()


# header entries that describe the old tensors, not the new ones
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "lora_adapter_metadata")
# what says which model a LoRA is for; merge keeps the first input's
FAMILY_KEYS = ("ss_base_model_version", "ss_v2", "ss_v_parameterization", "modelspec.architecture",
               "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type",
               "modelspec.sai_model_spec", "ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash")


def network_meta(meta: dict[str, str], ranks: list[int], conv_ranks: list[int], dynamic: bool,
                 note: str) -> dict[str, str]:
    """``meta`` updated for a plain LoRA/LoCon of these ranks (alpha = rank: scale 1), with ``note``
    put in front of ``ss_training_comment`` (kohya's resize does the same)."""
    out = {k: v for k, v in meta.items() if k not in STALE_KEYS}
    dim = "Dynamic" if dynamic or len(set(ranks)) > 1 else str(ranks[0]) if ranks else "0"
    out.update(ss_network_module="networks.lora", ss_network_dim=dim, ss_network_alpha=dim)
    if conv_ranks:
        c = "Dynamic" if dynamic or len(set(conv_ranks)) > 1 else str(conv_ranks[0])
        out["ss_network_args"] = json.dumps({"conv_dim": c, "conv_alpha": c})
    else:
        out.pop("ss_network_args", None)
    old = meta.get("ss_training_comment", "")
    out["ss_training_comment"] = f"{note}; {old}" if old and old != "None" else note
    return out
