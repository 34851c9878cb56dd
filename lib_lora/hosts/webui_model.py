"""What the WebUI's loaded model looks like to us: its family and where it keeps the UNet and text encoders.

A leaf (torch, and ``bundled.token_table``): the runtime's model map (``webui_host.WebUIHost.model_map``)
and training (``webui_trainable``) both find the modules here.
"""
from __future__ import annotations

from typing import Any

import torch

from ..bundled import token_table


def model_family(sd_model: Any) -> str | None:
    """The WebUI's own flags (sd_models.set_model_type)."""
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    return "sd1"


def _unwrap(m: Any) -> Any:
    # sd_hijack wraps each text encoder in a *WithCustomWords object holding the original in .wrapped
    return getattr(m, "wrapped", m)


def text_encoder_roots(sd_model: Any, family: str) -> list[tuple[str, torch.nn.Module]]:
    """(kohya prefix, root module) for each text encoder, where the WebUI keeps them.

    SD1: cond_stage_model[.wrapped].transformer (HF CLIPTextModel);
    SD2: cond_stage_model[.wrapped].model (OpenCLIP);
    SDXL: conditioner.embedders[i][.wrapped] with .transformer (HF, te1) or .model (OpenCLIP, te2);
    SD3: cond_stage_model (SD3Cond) .clip_l / .clip_g / .t5xxl, each with .transformer (HF-style names).
    """
    if family == "sd3":
        return sd3_text_encoder_roots(sd_model)
    if family == "sdxl":
        roots = []
        for emb in getattr(getattr(sd_model, "conditioner", None), "embedders", []):
            inner = _unwrap(emb)
            if isinstance(getattr(inner, "transformer", None), torch.nn.Module):
                roots.append(("te1", inner.transformer))
            elif isinstance(getattr(inner, "model", None), torch.nn.Module):
                roots.append(("te2", inner.model))
        return roots
    cond = _unwrap(getattr(sd_model, "cond_stage_model", None))
    for attr in ("transformer", "model"):
        root = getattr(cond, attr, None)
        if isinstance(root, torch.nn.Module):
            return [("te", root)]
    return []


def sd3_text_encoder_roots(sd_model: Any) -> list[tuple[str, torch.nn.Module]]:
    cond = _unwrap(getattr(sd_model, "cond_stage_model", None))
    roots = []
    for prefix, attr in (("te1", "clip_l"), ("te2", "clip_g"), ("te3", "t5xxl")):  # t5xxl is None when disabled
        root = getattr(getattr(cond, attr, None), "transformer", None)
        if isinstance(root, torch.nn.Module):
            roots.append((prefix, root))
    return roots


def unet_root(sd_model: Any) -> torch.nn.Module | None:
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def token_widths(sd_model: Any, family: str) -> dict[str, int] | None:
    """The token-embedding width of each text encoder, keyed as bundled embeddings key their vectors
    (``""`` for SD1/SD2, ``clip_l``/``clip_g`` for SDXL); None where one cannot be found."""
    if family not in ("sd1", "sd2", "sdxl"):
        return None
    parts = {"te": "", "te1": "clip_l", "te2": "clip_g"}
    widths = {}
    for prefix, root in text_encoder_roots(sd_model, family):
        weight = getattr(token_table(root), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        widths[parts[prefix]] = int(weight.shape[1])
    want = {""} if family != "sdxl" else {"clip_l", "clip_g"}
    return widths if set(widths) == want else None
