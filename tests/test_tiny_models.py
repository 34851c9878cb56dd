"""Checks for tests/tiny_models.py: real module layouts and numerical equality with diffusers."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tiny_models as tm

BUILDERS = {"sd1": tm.build_sd1, "sd2": tm.build_sd2, "sdxl": tm.build_sdxl}


@functools.cache
def tiny(family: str) -> tm.TinyModel:
    return BUILDERS[family]()


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


# --------------------------------------------------------------------------- build / layout


def test_deterministic_and_seeded() -> None:
    a, b, c = tm.build_sd1(0).unet.state_dict(), tm.build_sd1(0).unet.state_dict(), tm.build_sd1(1).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_blocks.1.1.proj_in.weight"], c["input_blocks.1.1.proj_in.weight"])
    # zero-initialised ldm layers were re-randomised
    assert a["out.2.weight"].any() and a["input_blocks.1.1.proj_out.weight"].any()


def test_sd1_layout() -> None:
    m = tiny("sd1")
    assert m.family == "sd1" and [p for p, _ in m.text_encoders] == ["te"]
    mods = _modules(m.unet)
    for name in ["time_embed.0", "input_blocks.0.0", "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                 "input_blocks.7.1.transformer_blocks.0.attn2.to_k", "middle_block.1.proj_in",
                 "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj", "output_blocks.2.1.conv", "out.2"]:
        assert name in mods, name
    assert "input_blocks.10.1" not in mods  # level 3 has no attention
    assert "input_blocks.1.1.transformer_blocks.1.attn1" not in mods  # depth 1
    assert isinstance(mods["input_blocks.1.1.proj_in"], nn.Conv2d)
    assert mods["input_blocks.1.1.transformer_blocks.0.attn2.to_k"].in_features == tm.CLIP_WIDTH
    te = _modules(m.text_encoders[0][1])
    assert isinstance(te["text_model.encoder.layers.0.self_attn.q_proj"], nn.Linear)
    assert "text_model.encoder.layers.1.mlp.fc2" in te


def test_sd2_layout() -> None:
    m = tiny("sd2")
    mods = _modules(m.unet)
    assert isinstance(mods["input_blocks.1.1.proj_in"], nn.Linear)
    assert isinstance(mods["output_blocks.11.1.proj_out"], nn.Linear)
    assert mods["input_blocks.1.1.transformer_blocks.0.attn2.to_k"].in_features == tm.OPENCLIP_WIDTH
    assert mods["input_blocks.1.1.transformer_blocks.0.attn1"].heads == 2  # 32 ch / 16 head channels
    prefix, te = m.text_encoders[0]
    assert prefix == "te" and not hasattr(te, "visual")
    te_mods = _modules(te)
    attn = te_mods["transformer.resblocks.0.attn"]
    assert isinstance(attn, nn.MultiheadAttention)
    assert attn.in_proj_weight.shape == (3 * tm.OPENCLIP_WIDTH, tm.OPENCLIP_WIDTH)  # fused q/k/v
    for name in ["transformer.resblocks.0.attn.out_proj", "transformer.resblocks.1.mlp.c_fc",
                 "transformer.resblocks.1.mlp.c_proj", "transformer.resblocks.0.ln_1",
                 "transformer.resblocks.0.ln_2", "ln_final", "token_embedding"]:
        assert name in te_mods, name
    assert {"positional_embedding", "text_projection"} <= {n for n, _ in te.named_parameters()}


def test_sdxl_layout() -> None:
    m = tiny("sdxl")
    assert [p for p, _ in m.text_encoders] == ["te1", "te2"]
    mods = _modules(m.unet)
    assert isinstance(m.unet, tm.UNetModel)
    for name in ["input_blocks.4.1.transformer_blocks.1.attn1.to_q", "input_blocks.8.1.transformer_blocks.1.attn2.to_v",
                 "middle_block.1.transformer_blocks.1.ff.net.2", "output_blocks.2.2.conv",
                 "output_blocks.5.1.proj_out", "label_emb.0.0", "label_emb.0.2"]:
        assert name in mods, name
    assert "input_blocks.1.1" not in mods and "output_blocks.6.1" not in mods and "input_blocks.9.0" not in mods
    assert isinstance(mods["input_blocks.4.1.proj_in"], nn.Linear)
    assert mods["input_blocks.4.1.transformer_blocks.0.attn2.to_k"].in_features == tm.CLIP_WIDTH + tm.OPENCLIP_WIDTH
    assert mods["label_emb.0.0"].in_features == tm.SDXL_ADM_IN
    assert list(m.unet.state_dict())[4] == "label_emb.0.0.weight"  # sgm key order
    assert m.config["num_classes"] == "sequential"
    rebuilt = tm.build_ldm_unet(m.config)
    assert rebuilt.state_dict().keys() == m.unet.state_dict().keys()


# --------------------------------------------------------------------------- diffusers equality


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_unet_matches_diffusers(family: str) -> None:
    m = tiny(family)
    dunet = tm.to_diffusers_unet(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, tm.LATENT_SIZE, tm.LATENT_SIZE, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, dunet.config.cross_attention_dim, generator=g)
    kw, dkw = {}, {}
    if family == "sdxl":
        text_embeds = torch.randn(2, tm.OPENCLIP_EMBED_DIM, generator=g)
        time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 64]] * 2)
        kw["y"] = tm.sdxl_y(text_embeds, time_ids)
        dkw["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    ours = m.unet(x, t, context=ctx, **kw)
    theirs = dunet(x, t, encoder_hidden_states=ctx, **dkw).sample
    assert ours.abs().mean() > 1e-3  # not a degenerate all-zero network
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    tok = torch.randint(3, tm.VOCAB_SIZE - 2, (2, tm.CONTEXT_LENGTH), generator=g)
    tok[0, 6], tok[1, 30] = tm.VOCAB_SIZE - 1, tm.VOCAB_SIZE - 1  # "eos" = argmax, pooled position
    return tok


@pytest.mark.parametrize("family,index", [("sd1", 0), ("sd2", 0), ("sdxl", 0), ("sdxl", 1)])
@torch.no_grad()
def test_text_encoder_matches_diffusers(family: str, index: int) -> None:
    prefix, te = tiny(family).text_encoders[index]
    hf = tm.to_diffusers_text_encoder((prefix, te))
    tok = _tokens()
    out = hf(tok, output_hidden_states=True)
    if prefix in tm._OPEN_CLIP_PREFIX and not hasattr(te, "text_model"):
        ref = tm.open_clip_forward(te, tok)
        assert len(out.hidden_states) == len(ref["hidden_states"]) == tm.TEXT_LAYERS + 1
        for a, b in zip(out.hidden_states, ref["hidden_states"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.last_hidden_state, ref["last_hidden_state"], rtol=1e-4, atol=1e-5)
        if prefix == "te2":
            torch.testing.assert_close(out.text_embeds, ref["text_embeds"], rtol=1e-4, atol=1e-5)
    else:
        assert hf is not te
        ref = te(tok, output_hidden_states=True)
        for a, b in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(a, b)


def test_ldm_name_map_covers_unet() -> None:
    m = tiny("sdxl")
    mp = tm.ldm_name_to_diffusers_map(m)
    dsd = tm.to_diffusers_unet(m).state_dict()
    sd = m.unet.state_dict()
    assert mp.keys() == sd.keys() and set(mp.values()) == dsd.keys()
    assert mp["input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight"] == \
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight"
    assert mp["label_emb.0.0.weight"] == "add_embedding.linear_1.weight"
    assert all(sd[k].shape == dsd[v].shape for k, v in mp.items())


# --------------------------------------------------------------------------- LoRA via diffusers

RANK, ALPHA = 4, 2.0

# kohya name -> fused diffusers key. SD1/SD2 kohya UNet names are diffusers-style, SDXL ones sgm-style.
LORA_TARGETS = {
    "sd1": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_up_blocks_1_attentions_2_proj_in": "unet.up_blocks.1.attentions.2.proj_in.weight",  # 1x1 conv
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj":  # diffusers needs it, see tiny_models
            "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.weight",
        "lora_te_text_model_encoder_layers_1_mlp_fc1": "text_encoder.text_model.encoder.layers.1.mlp.fc1.weight",
    },
    "sdxl": {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
        "lora_unet_output_blocks_0_1_proj_out": "unet.up_blocks.0.attentions.0.proj_out.weight",
        "lora_unet_input_blocks_4_0_in_layers_2": "unet.down_blocks.1.resnets.0.conv1.weight",  # 3x3 conv (LoCon)
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_out_proj":
            "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.weight",
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj":
            "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj.weight",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj":
            "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc2": "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.weight",
    },
}


def _base_weights(m: tm.TinyModel) -> dict[str, torch.Tensor]:
    names = ["text_encoder", "text_encoder_2"]
    out = {f"unet.{k}": v for k, v in tm.to_diffusers_unet(m).state_dict().items()}
    for name, pm in zip(names, m.text_encoders):
        out.update({f"{name}.{k}": v for k, v in tm.to_diffusers_text_encoder(pm).state_dict().items()})
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_fused_weights(family: str) -> None:
    m = tiny(family)
    base = _base_weights(m)
    g = torch.Generator().manual_seed(3)
    lora, expected = {}, {}
    for kohya, key in LORA_TARGETS[family].items():
        w = base[key]
        down = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g) * 0.1
        up = torch.randn(w.shape[0], RANK, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        lora |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                 f"{kohya}.alpha": torch.tensor(ALPHA)}
        expected[key] = w + 0.5 * ((up.flatten(1) @ down.flatten(1)) * ALPHA / RANK).reshape(w.shape)
    fused = tm.diffusers_fused_weights(m, lora, scale=0.5)
    assert fused.keys() == base.keys()
    for key, v in fused.items():
        if key in expected:
            torch.testing.assert_close(v, expected[key], rtol=1e-5, atol=1e-6)
            assert not torch.equal(v, base[key])
        else:
            assert torch.equal(v, base[key]), key


def test_diffusers_fused_weights_rejects_te_attention_without_out_proj() -> None:
    lora = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, tm.CLIP_WIDTH),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(tm.CLIP_WIDTH, 1)}
    with pytest.raises(ValueError, match="out_proj"):
        tm.diffusers_fused_weights(tiny("sd1"), lora)
