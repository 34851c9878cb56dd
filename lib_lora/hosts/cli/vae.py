"""The VAE in its two namings: ldm's, as single-file checkpoints store it (``first_stage_model.*``),
and diffusers' ``AutoencoderKL``, which this host runs (ldm's autoencoder module needs pytorch_lightning).

ldm -> diffusers is diffusers' own ``convert_ldm_vae_checkpoint``; diffusers -> ldm is that converter
run backwards on marker tensors, so the two directions agree by construction.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
from typing import Any

import torch
from torch import Tensor, nn

from .config import VAE_PREFIX, ArchitectureError


def block_types(vcfg: dict[str, Any]) -> dict[str, Any]:
    """The diffusers block types of an ldm VAE config (every level a plain down/up block)."""
    n = len(vcfg["ddconfig"]["ch_mult"])
    return {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


@functools.lru_cache(maxsize=8)
def _ldm_layout(key: str) -> dict[str, torch.Size]:
    """ldm VAE parameter names -> shapes, from ldm's own Encoder/Decoder built on the meta device."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    vcfg = json.loads(key)
    dd = dict(vcfg["ddconfig"], attn_type="vanilla")  # xformers variants have the same parameter names
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):  # ldm prints shapes while building
        enc, dec = Encoder(**dd), Decoder(**dd)
    z, e = dd["z_channels"], vcfg["embed_dim"]
    out = {f"encoder.{k}": v.shape for k, v in enc.state_dict().items()}
    out |= {f"decoder.{k}": v.shape for k, v in dec.state_dict().items()}
    out |= {"quant_conv.weight": torch.Size([2 * e, 2 * z, 1, 1]), "quant_conv.bias": torch.Size([2 * e]),
            "post_quant_conv.weight": torch.Size([z, e, 1, 1]), "post_quant_conv.bias": torch.Size([z])}
    return out


def ldm_vae_layout(vcfg: dict[str, Any]) -> dict[str, torch.Size]:
    """ldm VAE parameter names (without ``first_stage_model.``) -> shapes, for the VAE config ``vcfg``."""
    return _ldm_layout(json.dumps(vcfg, sort_keys=True))


def _vae_name_map(vcfg: dict[str, Any]) -> dict[str, str]:
    """diffusers VAE name -> ldm name, found by running diffusers' converter on 1-element marker tensors."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    names = list(ldm_vae_layout(vcfg))
    # 1-D markers: the converter's conv->linear slicing only touches 3-D/4-D tensors
    markers = {VAE_PREFIX + n: torch.tensor([i]) for i, n in enumerate(names)}
    converted = convert_ldm_vae_checkpoint(markers, block_types(vcfg))
    return {d: names[int(t[0])] for d, t in converted.items()}


def ldm_to_diffusers(ldm_sd: dict[str, Tensor], vcfg: dict[str, Any]) -> dict[str, Tensor]:
    """A VAE state dict in ldm names (without ``first_stage_model.``) -> diffusers names and shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm_sd.items()}, block_types(vcfg))


def diffusers_to_ldm(vae_sd: dict[str, Tensor], vcfg: dict[str, Any]) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict -> ldm names and shapes (without ``first_stage_model.``)."""
    layout = ldm_vae_layout(vcfg)
    names = _vae_name_map(vcfg)
    if set(names) != set(vae_sd):
        raise ArchitectureError("VAE cannot be written in ldm layout: diffusers names "
                                f"{sorted(set(vae_sd) ^ set(names))[:5]} have no ldm counterpart")
    # attention: Linear [C,C] -> conv [C,C,1,1]
    return {ldm: vae_sd[dk].reshape(layout[ldm]) for dk, ldm in names.items()}


def ldm_vae_config(vae: nn.Module) -> dict[str, Any]:
    """The ldm VAE config (``{"embed_dim", "ddconfig"}``) of a diffusers ``AutoencoderKL``."""
    c = vae.config
    if (c.get("norm_num_groups", 32) != 32 or not c.get("mid_block_add_attention", True)
            or not c.get("use_quant_conv", True) or not c.get("use_post_quant_conv", True)
            or c.get("act_fn", "silu") != "silu"):
        raise ArchitectureError("this AutoencoderKL variant has no ldm single-file layout")
    ch = c["block_out_channels"][0]
    dd = dict(double_z=True, z_channels=c["latent_channels"], resolution=256, in_channels=c["in_channels"],
              out_ch=c["out_channels"], ch=ch, ch_mult=[b // ch for b in c["block_out_channels"]],
              num_res_blocks=c["layers_per_block"], attn_resolutions=[], dropout=0.0)
    return {"embed_dim": c["latent_channels"], "ddconfig": dd}
