"""Real Stable Diffusion layer layouts, built from their published configs.

Used where the library needs a model's exact module names and shapes without a
checkpoint: sample files, benchmarks, and tests.  Building on the ``meta`` device
costs no memory.  Needs Stability-AI's ``ldm`` package (the WebUI has it; outside
it, ``pip install --no-deps stable-diffusion-sdkit``), transformers and open_clip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modelmap import ModelMap

# UNet kwargs of v1-inference.yaml / v2-inference-v.yaml
SD1_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=768, legacy=False)
SD2_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
                use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, legacy=False)
# sd_xl_base.yaml's network_config (sgm UNetModel), built as lib_lora.hosts.cli.sdxl_unet.SDXLUNetModel
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
                 num_classes="sequential", adm_in_channels=2816, legacy=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
OPEN_CLIP_H = dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24)
OPEN_CLIP_BIGG = dict(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32, output_dim=1280)


@dataclass
class Parts:
    family: str
    unet: nn.Module
    text_encoders: list[tuple[str, nn.Module]]

    def model_map(self) -> ModelMap:
        return ModelMap.build(self.family, self.unet, self.text_encoders)


def build(family: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> Parts:
    """Full-size SD1.5, SD2.x or SDXL UNet + text encoder(s) (random weights, or shapes only on 'meta')."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device(device):
        if family == "sd1":
            from transformers import CLIPTextConfig, CLIPTextModel
            unet = UNetModel(**SD1_UNET)
            te: nn.Module = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        elif family == "sd2":
            from open_clip.transformer import TextTransformer
            unet = UNetModel(**SD2_UNET)
            te = TextTransformer(**OPEN_CLIP_H)
        elif family == "sdxl":
            from open_clip.transformer import TextTransformer
            from transformers import CLIPTextConfig, CLIPTextModel

            from .hosts.cli.sdxl_unet import SDXLUNetModel
            unet = SDXLUNetModel(**SDXL_UNET)
            te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            te2 = TextTransformer(**OPEN_CLIP_BIGG)
            return Parts(family, unet.to(dtype), [("te1", te1.to(dtype)), ("te2", te2.to(dtype))])
        else:
            raise ValueError(f"no full-size layout for {family!r} (sd1, sd2, sdxl)")
    return Parts(family, unet.to(dtype), [("te", te.to(dtype))])
