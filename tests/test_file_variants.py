"""Spellings other tools write for ordinary LoRAs: diffusers' kohya conversion, transformers 5 PEFT keys.

References: diffusers' ``convert_state_dict_to_kohya`` (the file), diffusers' own load + fuse of the
source LoRA (the expected weights), and peft's ``merge_and_unload`` (the text encoder).
"""
from __future__ import annotations

import copy

import pytest
import torch

from lib_lora import families
from lib_lora.fileio import load_file, save_safetensors
from lib_lora.modelmap import ModelMap
from lib_lora.network import load_network, parse_state_dict
from lib_lora.patcher import Patcher, bind
from loras import activation, deltas, kohya_lora
from test_diffusers_equivalence import KOHYA_TARGETS, assert_same_weights, ours_in_diffusers_names
from tiny_models import build_diffusers_pipeline, build_sd1, build_sdxl, diffusers_fused_weights, \
    to_diffusers_text_encoder

pytest.importorskip("peft")


def _peft_sd(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(module, adapter_name=next(iter(module.peft_config)))


def _converted_by_diffusers(tiny, kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya LoRA -> diffusers (PEFT) -> ``convert_state_dict_to_kohya``, as diffusers' training scripts save."""
    from diffusers.utils import convert_state_dict_to_kohya

    pipe = build_diffusers_pipeline(tiny)
    pipe.load_lora_weights({k: v.clone() for k, v in kohya.items()})
    peft = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp, None)
        if m is not None:
            peft.update({f"{comp}.{k}": v for k, v in _peft_sd(m).items()})
    return convert_state_dict_to_kohya(peft)


# -- integer alphas --------------------------------------------------------------------------------


def test_diffusers_kohya_conversion_with_integer_alphas(tmp_path):
    tiny = build_sdxl(seed=4)
    mm = ModelMap.build("sdxl", tiny.unet, tiny.text_encoders)
    kohya = kohya_lora(mm, rank=4, alpha=4.0, seed=22, only=KOHYA_TARGETS)  # the conversion writes alpha = rank
    path = save_safetensors(_converted_by_diffusers(tiny, kohya), tmp_path / "converted.safetensors")
    stored, _ = load_file(path)
    alphas = [v for k, v in stored.items() if k.endswith(".alpha")]
    assert alphas and all(v.dtype == torch.int64 and v.dim() == 0 for v in alphas)
    assert any(k.startswith("lora_te2_") for k in stored) and any(k.startswith("lora_te1_") for k in stored)

    net = load_network(path)
    assert not net.unknown_keys and not net.errors and net.alphas() == [4.0]
    base = ours_in_diffusers_names(tiny, mm)
    ref = diffusers_fused_weights(tiny, kohya, scale=0.7)
    p = Patcher(mm)
    rep = p.apply([activation(net, 0.7, 0.7)])
    assert not rep.messages, rep.messages
    assert assert_same_weights(ours_in_diffusers_names(tiny, mm), ref, base) >= len(net.adapters)
    p.restore()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_integer_alpha_scales_like_float(dtype, shape):
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    w = torch.randn(12, 16, generator=g)
    nets = [parse_state_dict(str(a), {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up,
                                      "lora_unet_x.alpha": a}, {})
            for a in (torch.tensor(2, dtype=dtype).reshape(shape), torch.tensor(2.0))]
    got = [deltas(n.adapters["lora_unet_x"], w, None, 1.0)[0] for n in nets]
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], up @ down * 0.5)


def test_integer_tensors_other_than_alpha_still_refused():
    from lib_lora.fileio import LoraFileError
    sd = {"lora_unet_x.lora_down.weight": torch.ones(4, 16, dtype=torch.int64),
          "lora_unet_x.lora_up.weight": torch.ones(12, 4), "lora_unet_x.alpha": torch.tensor(4)}
    with pytest.raises(LoraFileError, match="non-float"):
        parse_state_dict("x", sd, {})
    with pytest.raises(LoraFileError, match="non-float"):  # a vector is not an alpha
        parse_state_dict("x", {**sd, "lora_unet_x.lora_down.weight": torch.ones(4, 16),
                               "lora_unet_x.alpha": torch.tensor([4, 4])}, {})


def test_sd1_conversion_uses_te1_and_still_applies(tmp_path):
    """For SD1 the conversion also writes ``lora_te1_``; the built-in applies those to the one encoder."""
    tiny = build_sd1(seed=5)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    kohya = kohya_lora(mm, rank=4, alpha=4.0, seed=23, only=KOHYA_TARGETS)
    converted = _converted_by_diffusers(tiny, kohya)
    assert any(k.startswith("lora_te1_") for k in converted) and not any(k.startswith("lora_te_") for k in converted)
    net = parse_state_dict("converted", converted, {})
    assert not bind(net, mm).unmatched
    # the tiny model's widths say nothing about the family; real SD1 widths do (below)
    net.family = None
    base = ours_in_diffusers_names(tiny, mm)
    ref = diffusers_fused_weights(tiny, kohya, scale=1.0)
    p = Patcher(mm)
    assert not p.apply([activation(net)]).messages
    assert assert_same_weights(ours_in_diffusers_names(tiny, mm), ref, base) >= len(net.adapters)
    p.restore()


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_te1_keys_with_real_context_width(width, family):
    keys = {"lora_te1_text_model_encoder_layers_0_mlp_fc1",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"}
    shapes = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, width)}
    assert families.detect_family({}, keys, shapes) == family
    assert families.detect_family({}, keys, {}) == "sdxl"


# -- transformers 5 PEFT keys ----------------------------------------------------------------------


def _peft_text_encoder(hf: torch.nn.Module, seed: int):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,  # random B: a non-trivial delta
                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    return get_peft_model(copy.deepcopy(hf), cfg)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_transformers5_text_encoder_keys(family):
    tiny = (build_sd1 if family == "sd1" else build_sdxl)(seed=6)
    mm = ModelMap.build(family, tiny.unet, tiny.text_encoders)
    comps = ["text_encoder"] if family == "sd1" else ["text_encoder", "text_encoder_2"]
    sd4, peft_models = {}, {}
    for i, comp in enumerate(comps):
        pm = _peft_text_encoder(to_diffusers_text_encoder(tiny.text_encoders[i]), seed=7 + i)
        peft_models[comp] = pm
        for k, v in _peft_sd(pm).items():
            assert k.startswith("base_model.model.text_model.")
            sd4[f"{comp}.{k[len('base_model.model.'):]}"] = v
    sd5 = {k.replace(".text_model.", ".", 1): v for k, v in sd4.items()}  # transformers 5 spelling
    assert not any("text_model" in k for k in sd5)

    merged = {}
    for name, sd in (("tf4", sd4), ("tf5", sd5)):
        net = parse_state_dict(name, sd, {})
        b = bind(net, mm)
        assert not net.unknown_keys and not b.unmatched and len(b.pairs) == len(sd) // 2
        p = Patcher(mm)
        assert not p.apply([activation(net)]).messages
        merged[name] = ours_in_diffusers_names(tiny, mm)
        p.restore()
    changed = 0
    for k, v in merged["tf4"].items():
        assert torch.equal(v, merged["tf5"][k]), k
    # and both are what peft itself merges (HF encoders compare directly; te2 is OpenCLIP in our model)
    ref = peft_models["text_encoder"].merge_and_unload().state_dict()
    for k, v in ref.items():
        ours = merged["tf5"].get(f"text_encoder.{k}")
        if ours is not None:
            torch.testing.assert_close(ours, v, rtol=1e-5, atol=1e-6, msg=k)
            changed += not torch.equal(v, to_diffusers_text_encoder(tiny.text_encoders[0]).state_dict()[k])
    assert changed == len([k for k in sd4 if k.startswith("text_encoder.")]) // 2
