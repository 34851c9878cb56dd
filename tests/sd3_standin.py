"""A stand-in for the WebUI's SD3 (modules/models/sd3), module names only, for CI.

The WebUI's classes cannot be imported here (they pull in the whole WebUI), so these mirror
their attribute names and shapes: MMDiT (mmdit.py: joint_blocks.N.{context,x}_block with
attn.qkv fused (QkvLinear), attn.proj, mlp.fc1/fc2, adaLN_modulation.1; the last block's
context stream is "pre_only"), the CLIP text models and T5 of other_impls.py, held by an
SD3Cond-like object as clip_l / clip_g / t5xxl, each with .transformer.  No forward passes:
LoRAs are checked on weights.  tests/test_sd3.py checks these names against the real classes
when WEBUI_DIR is set.

Default sizes equal a real ``MMDiT(depth=2, patch_size=2, in_channels=4, adm_in_channels=64,
context 32 -> 128)`` (hidden = 64 * depth) and diffusers' ``SD3Transformer2DModel`` with
``num_layers=2, attention_head_dim=64, num_attention_heads=2``.
"""
from __future__ import annotations

import torch
from torch import nn


class QkvLinear(nn.Linear):  # mmdit.QkvLinear: a plain Linear the built-in recognises by type
    pass


def _mlp(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, o), nn.SiLU(), nn.Linear(o, o))


class DismantledBlock(nn.Module):
    def __init__(self, hidden: int, pre_only: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = QkvLinear(hidden, 3 * hidden)
        if not pre_only:
            self.attn.proj = nn.Linear(hidden, hidden)
            self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(hidden, 4 * hidden)
            self.mlp.fc2 = nn.Linear(4 * hidden, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, (2 if pre_only else 6) * hidden))


class JointBlock(nn.Module):
    def __init__(self, hidden: int, last: bool):
        super().__init__()
        self.context_block = DismantledBlock(hidden, pre_only=last)
        self.x_block = DismantledBlock(hidden, pre_only=False)


class MMDiT(nn.Module):
    def __init__(self, depth: int = 2, hidden: int = 128, in_channels: int = 4, patch: int = 2,
                 adm_in: int = 64, context_in: int = 32):
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden, patch, patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = _mlp(256, hidden)
        self.y_embedder = nn.Module()
        self.y_embedder.mlp = _mlp(adm_in, hidden)
        self.context_embedder = nn.Linear(context_in, hidden)
        self.joint_blocks = nn.ModuleList([JointBlock(hidden, i == depth - 1) for i in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden, patch * patch * in_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))


class T5LayerNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class T5(nn.Module):
    """other_impls.T5: encoder.embed_tokens, encoder.block.N.layer.{0: SelfAttention, 1: DenseReluDense}."""

    def __init__(self, d_model: int = 16, d_ff: int = 32, layers: int = 2, vocab: int = 50, heads: int = 2):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.embed_tokens = nn.Embedding(vocab, d_model)
        self.encoder.block = nn.ModuleList()
        for i in range(layers):
            block = nn.Module()
            attn, ff = nn.Module(), nn.Module()
            attn.SelfAttention = nn.Module()
            for n in "qkvo":
                setattr(attn.SelfAttention, n, nn.Linear(d_model, d_model, bias=False))
            if i == 0:
                attn.SelfAttention.relative_attention_bias = nn.Embedding(32, heads)
            attn.layer_norm = T5LayerNorm(d_model)
            ff.DenseReluDense = nn.Module()
            ff.DenseReluDense.wi_0 = nn.Linear(d_model, d_ff, bias=False)
            ff.DenseReluDense.wi_1 = nn.Linear(d_model, d_ff, bias=False)
            ff.DenseReluDense.wo = nn.Linear(d_ff, d_model, bias=False)
            ff.layer_norm = T5LayerNorm(d_model)
            block.layer = nn.ModuleList([attn, ff])
            self.encoder.block.append(block)
        self.encoder.final_layer_norm = T5LayerNorm(d_model)


def tiny_clip(width: int, seed: int) -> nn.Module:
    """other_impls.CLIPTextModel has HF's names (text_model.encoder.layers..., text_projection)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=width, intermediate_size=2 * width,
                                                      num_hidden_layers=2, num_attention_heads=2, vocab_size=1000,
                                                      projection_dim=width))


class ClipHolder(nn.Module):  # other_impls.SDClipModel / T5XXLModel: the model is .transformer
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


class SD3Cond(nn.Module):
    def __init__(self, t5: bool = True):
        super().__init__()
        self.clip_g = ClipHolder(tiny_clip(32, 5))
        self.clip_l = ClipHolder(tiny_clip(16, 6))
        self.t5xxl = ClipHolder(T5()) if t5 else None  # None when "sd3_enable_t5" is off


class BaseModel(nn.Module):  # sd3_impls.BaseModel: the MMDiT is .diffusion_model
    def __init__(self, mmdit: nn.Module):
        super().__init__()
        self.diffusion_model = mmdit


class SD3Inferencer(nn.Module):
    """sd3_model.SD3Inferencer with the flags sd_models.set_model_type sets."""

    def __init__(self, seed: int = 0, t5: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.model = BaseModel(MMDiT())
        self.text_encoders = SD3Cond(t5)
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = False, False, False, True

    @property
    def cond_stage_model(self) -> nn.Module:
        return self.text_encoders


def text_encoder_roots(model: SD3Inferencer) -> list[tuple[str, nn.Module]]:
    cond = model.cond_stage_model
    roots = [("te1", cond.clip_l.transformer), ("te2", cond.clip_g.transformer)]
    return roots + ([("te3", cond.t5xxl.transformer)] if cond.t5xxl is not None else [])
