"""Modules from an architecture config, as the WebUI's own classes, and filled from a state dict.

They are built on the meta device: the weights come from the file, so random init is wasted time.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import vae
from .config import SGM_ONLY_UNET_OPTIONS, ArchitectureError


def build_unet(ucfg: dict[str, Any]) -> nn.Module:
    """ldm ``UNetModel`` (SD1/SD2), or :class:`.sdxl_unet.SDXLUNetModel` for ``num_classes='sequential'``."""
    import inspect

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    kw = {k: v for k, v in ucfg.items() if k not in SGM_ONLY_UNET_OPTIONS}
    allowed = set(inspect.signature(UNetModel.__init__).parameters) | {"adm_in_channels", "transformer_depth_middle"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ArchitectureError(f"unsupported UNet options {unknown}")
    if kw.get("num_classes") == "sequential":
        from .sdxl_unet import SDXLUNetModel
        return SDXLUNetModel(**kw)
    if isinstance(kw.get("transformer_depth"), list) or "adm_in_channels" in kw or "transformer_depth_middle" in kw:
        raise ArchitectureError("per-level transformer depths / adm_in_channels need num_classes='sequential' (SDXL)")
    return UNetModel(**kw)


def build_text_encoder(tcfg: dict[str, Any]) -> nn.Module:
    """HF ``CLIPTextModel`` (SD1, SDXL te1) or open_clip ``CLIP`` without ``.visual`` (SD2, SDXL te2)."""
    if tcfg["kind"] == "hf_clip":
        import transformers

        # bos/eos/pad 0/2/1 as openai/clip-vit-large-patch14's config: eos_token_id == 2 selects the
        # legacy argmax-of-ids pooling (what ldm's FrozenCLIPEmbedder and open_clip do).
        cfg = transformers.CLIPTextConfig(
            vocab_size=tcfg["vocab_size"], hidden_size=tcfg["width"], intermediate_size=tcfg["intermediate"],
            num_hidden_layers=tcfg["layers"], num_attention_heads=tcfg["heads"],
            max_position_embeddings=tcfg["context_length"], hidden_act=tcfg.get("act", "quick_gelu"),
            projection_dim=tcfg["width"], bos_token_id=0, eos_token_id=2, pad_token_id=1)
        return transformers.CLIPTextModel(cfg).eval()
    if tcfg["kind"] == "open_clip":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        # FrozenOpenCLIPEmbedder keeps open_clip's CLIP and deletes .visual; build a toy vision tower to delete.
        vision = CLIPVisionCfg(layers=1, width=32, head_width=16, image_size=8, patch_size=4)
        text = CLIPTextCfg(context_length=tcfg["context_length"], vocab_size=tcfg["vocab_size"], width=tcfg["width"],
                           heads=tcfg["heads"], layers=tcfg["layers"], mlp_ratio=tcfg.get("mlp_ratio", 4.0))
        model = CLIP(tcfg["embed_dim"], vision, text)
        del model.visual
        return model.eval()
    raise ArchitectureError(f"unknown text encoder kind {tcfg['kind']!r}")


def build_vae(vcfg: dict[str, Any], scale_factor: float) -> nn.Module:
    """diffusers ``AutoencoderKL`` with the sizes of an ldm VAE config."""
    from diffusers import AutoencoderKL

    dd = vcfg["ddconfig"]
    if not dd.get("double_z", True) or vcfg["embed_dim"] != dd["z_channels"] or dd.get("attn_resolutions"):
        raise ArchitectureError(f"VAE ddconfig {dd} / embed_dim {vcfg['embed_dim']} "
                                "has no diffusers AutoencoderKL equivalent")
    return AutoencoderKL(in_channels=dd["in_channels"], out_channels=dd["out_ch"],
                         block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
                         layers_per_block=dd["num_res_blocks"], latent_channels=dd["z_channels"],
                         sample_size=dd.get("resolution", 256), scaling_factor=scale_factor,
                         **vae.block_types(vcfg)).eval()


def materialize(module: nn.Module, sd: dict[str, Tensor], dtype: torch.dtype, what: str,
                 source: str, optional: dict[str, Callable[[], Tensor]] | None = None) -> nn.Module:
    """Load ``sd`` into a meta-built ``module`` by assignment (no copy, no init); re-create
    non-persistent buffers; fail clearly on any mismatch."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    expected = module.state_dict().keys()
    for k, make in (optional or {}).items():
        if k in expected and k not in sd:
            sd[k] = make().to(dtype)
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ArchitectureError(f"{what} weights do not match the {source} config: {e}") from e
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf == "position_ids":       # HF CLIP
            value = torch.arange(buf.shape[-1]).expand(buf.shape)
        elif leaf == "attn_mask":        # open_clip causal mask
            value = torch.full(buf.shape, float("-inf")).triu_(1).to(dtype)
        else:
            raise ArchitectureError(f"{what}: buffer {name!r} is not in the checkpoint and cannot be rebuilt")
        owner._buffers[leaf] = value
    return module
