"""SD3's MMDiT (the WebUI's ``modules/models/sd3/mmdit.py``, SAI layout) in diffusers' names.

kohya (sd-scripts ``networks/lora_sd3``) names MMDiT layers by their own paths
(``lora_unet_joint_blocks_0_x_block_attn_qkv``), with q/k/v fused in one Linear.  diffusers'
``SD3Transformer2DModel`` splits that Linear into ``attn.to_q/to_k/to_v`` (image stream) and
``attn.add_q_proj/add_k_proj/add_v_proj`` (text stream), so those names are row thirds of it.

Two diffusers layers are the SAI layer with its two halves swapped (the last block's
``norm1_context.linear`` and ``norm_out.linear``, "swap_scale_shift" in diffusers' converter);
no row slice expresses that, so they are left unmapped and reported as such.
"""
from __future__ import annotations

from torch import nn

_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
# (stream, SAI path inside the stream's DismantledBlock) -> diffusers path inside transformer_blocks.N
_BLOCK = {
    ("x_block", "attn.proj"): "attn.to_out.0",
    ("x_block", "mlp.fc1"): "ff.net.0.proj",
    ("x_block", "mlp.fc2"): "ff.net.2",
    ("x_block", "adaLN_modulation.1"): "norm1.linear",
    ("context_block", "attn.proj"): "attn.to_add_out",
    ("context_block", "mlp.fc1"): "ff_context.net.0.proj",
    ("context_block", "mlp.fc2"): "ff_context.net.2",
    ("context_block", "adaLN_modulation.1"): "norm1_context.linear",
}
QKV = {"x_block": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "context_block": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def is_mmdit(root: nn.Module) -> bool:
    return isinstance(getattr(root, "joint_blocks", None), nn.ModuleList)


def mmdit_diffusers_names(mmdit: nn.Module) -> dict[str, str | tuple[str, str, str]]:
    """SAI module path -> diffusers path; a fused ``attn.qkv`` maps to its (q, k, v) paths."""
    out: dict[str, str | tuple[str, str, str]] = {}
    names = {name for name, _ in mmdit.named_modules()}
    for sai, diff in _TOP.items():
        if sai in names:
            out[sai] = diff
    last = len(mmdit.joint_blocks) - 1
    for i in range(last + 1):
        for stream in ("x_block", "context_block"):
            head = f"joint_blocks.{i}.{stream}"
            if f"{head}.attn.qkv" in names:
                out[f"{head}.attn.qkv"] = tuple(f"transformer_blocks.{i}.{p}" for p in QKV[stream])
            for (s, sai), diff in _BLOCK.items():
                if s != stream or f"{head}.{sai}" not in names:
                    continue
                if i == last and stream == "context_block" and sai == "adaLN_modulation.1":
                    continue  # halves swapped in diffusers (see module docstring)
                out[f"{head}.{sai}"] = f"transformer_blocks.{i}.{diff}"
    return out
