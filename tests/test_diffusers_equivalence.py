"""Our merge equals diffusers' own LoRA loading + fusing, for kohya and diffusers/PEFT files.

diffusers is an independent implementation of both the key conversion (kohya names ->
diffusers modules, SGM block numbering for SDXL) and the LoRA math, so agreeing with it
on every weight of the model checks the model map, key normalisation and merge at once.
"""
from __future__ import annotations

import pytest
import torch

from lib_lora.fileio import load_file
from lib_lora.modelmap import ModelMap
from lib_lora.network import load_network, parse_state_dict
from lib_lora.patcher import Patcher
from loras import activation, kohya_lora
from tiny_models import (build_diffusers_pipeline, build_sd1, build_sdxl, diffusers_fused_weights,
                         ldm_name_to_diffusers_map, to_diffusers_text_encoder)

# what kohya's LoRA/LoCon trainers target: attention blocks, resnets and samplers, text MLP/attention
KOHYA_TARGETS = ("attentions_", "transformer_blocks", "proj_in", "proj_out", "resnets_", "samplers_",
                 "_1_transformer", "_0_in_layers", "_0_out_layers", "_0_emb_layers", "_0_skip", "_op",
                 "_conv", "self_attn", "mlp_fc")
BUILDERS = {"sd1": build_sd1, "sdxl": build_sdxl}


def ours_in_diffusers_names(tiny, mm) -> dict[str, torch.Tensor]:
    """Our (patched) model's weights named as diffusers names them."""
    out = {}
    names = ldm_name_to_diffusers_map(tiny)
    for k, v in tiny.unet.state_dict().items():
        out[f"unet.{names[k]}"] = v
    for i, (prefix, module) in enumerate(tiny.text_encoders):
        comp = "text_encoder" if i == 0 else "text_encoder_2"
        for k, v in to_diffusers_text_encoder((prefix, module)).state_dict().items():
            out[f"{comp}.{k}"] = v
    return out


def assert_same_weights(ours: dict, ref: dict, base: dict) -> int:
    changed = 0
    for k, r in ref.items():
        if k not in ours:
            continue  # e.g. position_ids buffers
        torch.testing.assert_close(ours[k].float(), r.float(), rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(r, base[k])
    return changed


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_matches_diffusers_fuse(family, tmp_path):
    tiny = BUILDERS[family](seed=3)
    mm = ModelMap.build(family, tiny.unet, tiny.text_encoders)
    sd = kohya_lora(mm, rank=4, alpha=3.0, seed=21, convs=True, only=KOHYA_TARGETS)
    assert any(("conv1" in k or "in_layers_2" in k) for k in sd) and any(k.startswith(("lora_te_", "lora_te1_")) for k in sd)
    if family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in sd)  # SGM spelling, as kohya writes
        assert any(k.startswith("lora_te2_") for k in sd)
    base = ours_in_diffusers_names(tiny, mm)
    ref = diffusers_fused_weights(tiny, sd, scale=0.8)

    from lib_lora.fileio import save_safetensors
    path = save_safetensors(sd, tmp_path / "k.safetensors")
    p = Patcher(mm)
    rep = p.apply([activation(load_network(path), 0.8, 0.8)])
    assert not rep.messages
    changed = assert_same_weights(ours_in_diffusers_names(tiny, mm), ref, base)
    assert changed >= len({k.split(".")[0] for k in sd})  # every targeted layer moved, identically
    p.restore()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_peft_file_matches_diffusers_fuse(family, tmp_path):
    """A LoRA file written by diffusers' own save_lora_weights (PEFT lora_A/lora_B keys)."""
    from peft.utils import get_peft_model_state_dict

    tiny = BUILDERS[family](seed=4)
    mm = ModelMap.build(family, tiny.unet, tiny.text_encoders)
    kohya = kohya_lora(mm, rank=4, alpha=2.0, seed=22, only=KOHYA_TARGETS)
    pipe = build_diffusers_pipeline(tiny)
    pipe.load_lora_weights({k: v.clone() for k, v in kohya.items()})
    peft_sd = lambda m: get_peft_model_state_dict(m, adapter_name=next(iter(m.peft_config)))  # noqa: E731
    layers = {"unet_lora_layers": peft_sd(pipe.unet), "text_encoder_lora_layers": peft_sd(pipe.text_encoder)}
    if family == "sdxl":
        layers["text_encoder_2_lora_layers"] = peft_sd(pipe.text_encoder_2)
    # diffusers keeps kohya's alphas as PEFT lora_alpha/alpha_pattern in the header, not in the tensors
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    for comp, m in comps.items():
        if m is not None:
            layers[f"{comp}_lora_adapter_metadata"] = next(iter(m.peft_config.values())).to_dict()
    type(pipe).save_lora_weights(str(tmp_path), **layers)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    keys = list(load_file(path)[0])
    assert any(".lora_A." in k for k in keys) and any(k.startswith("unet.") for k in keys)

    base = ours_in_diffusers_names(tiny, mm)
    ref = diffusers_fused_weights(tiny, kohya, scale=1.0)
    net = load_network(path)
    assert not net.unknown_keys and net.family in (None, family)
    p = Patcher(mm)
    rep = p.apply([activation(net)])
    assert not rep.messages, rep.messages
    assert assert_same_weights(ours_in_diffusers_names(tiny, mm), ref, base) > 0
    p.restore()


def test_legacy_diffusers_attn_processor_keys():
    """Old diffusers files: ``...attn1.processor.to_q_lora.down.weight`` and text ``to_q_lora``."""
    tiny = build_sd1(seed=5)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    kohya = kohya_lora(mm, rank=2, alpha=None, seed=23,
                       only=("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                             "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                             "encoder_layers_0_self_attn_q_proj", "encoder_layers_0_mlp_fc1"))
    legacy = {}
    ren = {"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
           "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
           "text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora",
           "text_model_encoder_layers_0_mlp_fc1": "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer"}
    for k, v in kohya.items():
        mod, role = k.split(".", 1)
        short = mod.replace("lora_unet_", "").replace("lora_te_", "")
        legacy[f"{ren[short]}.{role.replace('lora_down.weight', 'down.weight').replace('lora_up.weight', 'up.weight')}"] = v
    a = parse_state_dict("kohya", kohya, {})
    b = parse_state_dict("legacy", legacy, {})
    assert sorted(a.adapters) == sorted(b.adapters) and not b.unknown_keys
