"""SD3: the WebUI's MMDiT and text encoders under the kohya and diffusers spellings.

References: diffusers' own SD3Transformer2DModel loading and fusing a diffusers-format file
(its q/k/v are separate Linears, ours are row thirds of one fused Linear), and the kohya
formula ``up @ down * alpha / rank`` for sd-scripts' ``lora_unet_joint_blocks_...`` files.
With WEBUI_DIR set, the stand-in's names and shapes are checked against the WebUI's classes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_lora import families
from lib_lora.fileio import save_safetensors
from lib_lora.modelmap import ModelMap
from lib_lora.network import load_network
from lib_lora.patcher import Patcher
from loras import activation
from sd3_standin import SD3Inferencer, text_encoder_roots
from webui_server import WEBUI_SD3_IMPORTS

RANK = 4


@pytest.fixture(scope="module")
def sd3():
    m = SD3Inferencer(seed=0)
    return m, ModelMap.build("sd3", m.model.diffusion_model, text_encoder_roots(m))


def tiny_diffusers_transformer():
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(1)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                 pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8)


def test_map_names_kohya_and_diffusers_layers(sd3):
    _, mm = sd3
    qkv = mm.get("lora_unet_joint_blocks_0_x_block_attn_qkv")
    assert qkv.rows is None and qkv.weight().shape == (384, 128)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        t = mm.get(f"lora_transformer_transformer_blocks_0_attn_{name}")
        assert t.module is qkv.module and t.rows == slice(128 * i, 128 * (i + 1))
    ctx = mm.get("lora_unet_joint_blocks_1_context_block_attn_qkv").module
    assert mm.get("lora_transformer_transformer_blocks_1_attn_add_v_proj").module is ctx
    assert mm.get("lora_transformer_transformer_blocks_0_attn_to_add_out").key == \
        "lora_unet_joint_blocks_0_context_block_attn_proj"
    assert mm.get("lora_transformer_transformer_blocks_1_attn_to_add_out") is None  # last context block: pre_only
    assert mm.get("lora_te1_text_model_encoder_layers_1_mlp_fc2") is not None
    assert mm.get("lora_te2_text_model_encoder_layers_0_self_attn_k_proj").weight().shape == (32, 32)
    assert mm.get("lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0") is not None
    assert mm.components() == {"unet", "te1", "te2", "te3"}


def test_every_diffusers_layer_has_its_counterpart_but_the_swapped_two(sd3):
    _, mm = sd3
    tr = tiny_diffusers_transformer()
    layers = {n: tuple(m.weight.shape) for n, m in tr.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    missing = [n for n in layers if mm.get("lora_transformer_" + n.replace(".", "_")) is None]
    assert missing == ["transformer_blocks.1.norm1_context.linear", "norm_out.linear"]
    for n, shape in layers.items():
        t = mm.get("lora_transformer_" + n.replace(".", "_"))
        assert t is None or tuple(t.weight().shape) == shape, n


def test_diffusers_file_matches_diffusers_fuse(sd3, tmp_path):
    model, mm = sd3
    tr = tiny_diffusers_transformer()
    g = torch.Generator().manual_seed(7)
    sd = {}
    for n, m in tr.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.") or n in ("proj_out", "norm_out.linear"):
            sd[f"transformer.{n}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * 0.1
            sd[f"transformer.{n}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.1
    path = save_safetensors(sd, tmp_path / "diffusers_sd3.safetensors")
    before = {n: m.weight.detach().clone() for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    tr.load_lora_adapter({k: v.clone() for k, v in sd.items()}, prefix="transformer", adapter_name="x")
    tr.fuse_lora(lora_scale=0.7)
    fused = {n: m.weight.detach() for n, m in tr.named_modules() if n in before and hasattr(m, "weight")}

    net = load_network(path)
    assert net.family == "sd3"
    p = Patcher(mm)
    originals = {t.key: t.weight().detach().clone() for t in mm.targets if t.weight() is not None}
    rep = p.apply([activation(net, 0.7, 0.7)])
    assert len(rep.messages) == 1 and rep.messages[0].startswith(
        f"diffusers_sd3: 2 of {len(net.adapters)} layers have no counterpart in the loaded model")
    assert "norm_out_linear" in rep.messages[0] or "blocks_1_norm1_context_linear" in rep.messages[0]
    compared = 0
    for n in before:
        t = mm.get("lora_transformer_" + n.replace(".", "_"))
        if t is None or f"transformer.{n}.lora_A.weight" not in sd:
            continue
        torch.testing.assert_close(t.weight() - originals[t.key], fused[n] - before[n], rtol=1e-4, atol=1e-6, msg=n)
        compared += 1
    assert compared == len(net.adapters) - 2 and compared >= 20
    p.restore()
    for t in mm.targets:
        assert t.key not in originals or torch.equal(t.weight(), originals[t.key])


def test_kohya_file_fused_qkv_and_all_three_text_encoders(sd3, tmp_path):
    """sd-scripts' lora_sd3 names: lora_unet_<MMDiT path> (qkv fused), lora_te1/te2/te3."""
    model, mm = sd3
    keys = {"lora_unet_joint_blocks_0_x_block_attn_qkv": (384, 128),
            "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1": (256, 128),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (16, 16),
            "lora_te2_text_model_encoder_layers_1_mlp_fc1": (64, 32),
            "lora_te3_encoder_block_0_layer_0_SelfAttention_v": (16, 16)}
    g = torch.Generator().manual_seed(9)
    sd, alpha = {}, 2.0
    for k, (o, i) in keys.items():
        sd[f"{k}.lora_down.weight"] = torch.randn(RANK, i, generator=g)
        sd[f"{k}.lora_up.weight"] = torch.randn(o, RANK, generator=g)
        sd[f"{k}.alpha"] = torch.tensor(alpha)
    path = save_safetensors(sd, tmp_path / "kohya_sd3.safetensors", metadata={"ss_base_model_version": "sd3"})
    net = load_network(path)
    assert net.family == "sd3" and set(net.adapters) == set(keys)
    originals = {k: mm.get(k).weight().detach().clone() for k in keys}
    p = Patcher(mm)
    rep = p.apply([activation(net, 0.5, 1.5)])
    assert not rep.messages and rep.applied == {"kohya_sd3": 5}
    for k in keys:
        mult = 1.5 if k.startswith("lora_unet_") else 0.5
        ref = sd[f"{k}.lora_up.weight"] @ sd[f"{k}.lora_down.weight"] * (alpha / RANK) * mult
        torch.testing.assert_close(mm.get(k).weight() - originals[k], ref, rtol=1e-5, atol=1e-5, msg=k)
    p.restore()

    # LBW has no SD3 blocks: the MMDiT keeps its weight, BASE scales the text encoders, and the user is told
    from lib_lora.blockweights import parse_block_weights
    rep = p.apply([activation(net, 1.0, 1.0, blocks=parse_block_weights("0.5," + ",".join(["0"] * 16)))])
    assert any("no blocks for SD3" in m for m in rep.messages)
    for k in keys:
        mult = 1.0 if k.startswith("lora_unet_") else 0.5
        ref = sd[f"{k}.lora_up.weight"] @ sd[f"{k}.lora_down.weight"] * (alpha / RANK) * mult
        torch.testing.assert_close(mm.get(k).weight() - originals[k], ref, rtol=1e-5, atol=1e-5, msg=k)
    p.restore()


def test_kohya_and_diffusers_q_on_one_fused_weight_add_up(sd3, tmp_path):
    """Two files on the same qkv Linear: the whole-weight delta and a row-third delta both land."""
    _, mm = sd3
    g = torch.Generator().manual_seed(11)
    whole = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(RANK, 128, generator=g),
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(384, RANK, generator=g)}
    third = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(RANK, 128, generator=g),
             "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(128, RANK, generator=g)}
    a = load_network(save_safetensors(whole, tmp_path / "a.safetensors"))
    b = load_network(save_safetensors(third, tmp_path / "b.safetensors"))
    w = mm.get("lora_unet_joint_blocks_0_x_block_attn_qkv").module.weight
    w0 = w.detach().clone()
    p = Patcher(mm)
    p.apply([activation(a), activation(b, 1.0, 0.5)])
    ref = whole["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"] @ \
        whole["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"]
    ref[128:256] += 0.5 * third["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] @ \
        third["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    torch.testing.assert_close(w - w0, ref, rtol=1e-5, atol=1e-5)
    p.restore()
    assert torch.equal(w, w0)


@pytest.mark.parametrize("keys, meta, family", [
    (["lora_unet_joint_blocks_3_x_block_attn_qkv", "lora_te2_text_model_encoder_layers_0_mlp_fc1"], {}, "sd3"),
    (["lora_transformer_transformer_blocks_0_attn_to_q"], {}, "sd3"),
    (["lora_te3_encoder_block_0_layer_0_SelfAttention_q"], {}, "sd3"),
    ([], {"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),
    ([], {"ss_base_model_version": "sd3"}, "sd3"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1"], {}, "sdxl"),
])
def test_family_of_sd3_files(keys, meta, family):
    assert families.detect_family(meta, set(keys), {}) == family


# -- against the WebUI's own classes ------------------------------------------------------------

_DUMP_REAL = r"""
import json, sys, types
import torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]
""" + WEBUI_SD3_IMPORTS + r"""from lib_lora.modelmap import ModelMap
torch.set_grad_enabled(False)  # the WebUI builds these under no_grad
mmdit = MMDiT(input_size=None, pos_embed_max_size=8, patch_size=2, in_channels=4, depth=2, adm_in_channels=64,
              context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
              num_patches=64, dtype=torch.float32, device="cpu")
clip = lambda w: other_impls.CLIPTextModel({"hidden_act": "gelu", "hidden_size": w, "intermediate_size": 2 * w,
                                            "num_attention_heads": 2, "num_hidden_layers": 2}, torch.float32, "cpu")
t5 = other_impls.T5({"d_ff": 32, "d_model": 16, "num_heads": 2, "num_layers": 2, "vocab_size": 50}, torch.float32, "cpu")
mm = ModelMap.build("sd3", mmdit, [("te1", clip(16)), ("te2", clip(32)), ("te3", t5)])
print(json.dumps({n: [type(t.module).__name__, list(t.weight().shape)] for t in mm.targets if t.weight() is not None
                  for n in [t.key, *t.aliases]}))
"""


@pytest.mark.skipif(not os.environ.get("WEBUI_DIR"), reason="WEBUI_DIR (a WebUI v1.10.1 checkout with its venv) not set")
def test_standin_names_and_shapes_match_the_webui_classes(sd3):
    webui = Path(os.environ["WEBUI_DIR"])
    python = os.environ.get("WEBUI_PYTHON") or str(webui / "venv" / "bin" / "python")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([python, "-c", _DUMP_REAL, str(root), str(webui)], capture_output=True, text=True,
                         cwd=str(webui), timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    real = json.loads(out.stdout.strip().splitlines()[-1])
    _, mm = sd3
    ours = {n: list(t.weight().shape) for t in mm.targets if t.weight() is not None for n in [t.key, *t.aliases]}
    assert set(ours) <= set(real), sorted(set(ours) - set(real))
    # CLIP's token/position tables: same names, sizes from the vocabulary / context length in the config
    sized = {n for n in ours if "_embeddings_" in n}
    assert {n: s for n, s in ours.items() if n not in sized} == {n: real[n][1] for n in ours if n not in sized}
    assert real["lora_unet_joint_blocks_0_x_block_attn_qkv"][0] == "QkvLinear"
    assert sys.version_info >= (3, 8)


def test_diffusers_t5_keys_reach_the_t5_layers(sd3):
    """diffusers names SD3's T5 ``text_encoder_3.encoder.block…``: no ``text_model.`` level as CLIP has."""
    from lib_lora.keymap import split_key
    _, mm = sd3
    module, role = split_key("text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight", True)
    assert (module, role) == ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "lora_down.weight")
    assert mm.get(module) is not None
    clip, _ = split_key("text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight", True)
    assert clip == "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # transformers 5's CLIP keys
