"""Prompt arguments, infotext hashes, key spellings and family detection."""
from __future__ import annotations

import pytest

from lib_lora import families
from lib_lora.infotext import format_hashes, parse_hashes, rename_in_prompt
from lib_lora.keymap import split_key
from lib_lora.params import LoraRequest, ParamError, parse_args, parse_prompt, split_items


@pytest.mark.parametrize("items,expect", [
    (["a"], LoraRequest("a", 1.0, 1.0, None)),
    (["a", "0.8"], LoraRequest("a", 0.8, 0.8, None)),
    (["a", "0.8", "0.3"], LoraRequest("a", 0.8, 0.3, None)),
    (["a", "1", "1", "8"], LoraRequest("a", 1.0, 1.0, 8)),
    (["a", "-0.5"], LoraRequest("a", -0.5, -0.5, None)),
    (["a", "0.8", "unet=0.2"], LoraRequest("a", 0.8, 0.2, None)),
    (["a", "te=0.4"], LoraRequest("a", 0.4, 0.4, None)),
    (["a", "0.9", "0.7", "te=0.1"], LoraRequest("a", 0.1, 0.7, None)),
    (["a", "dyn=16"], LoraRequest("a", 1.0, 1.0, 16)),
])
def test_parse_args(items, expect):
    assert parse_args(*split_items(items)) == expect


def test_bad_numbers():
    with pytest.raises(ParamError, match="te='x' is not a number"):
        parse_args(*split_items(["a", "x"]))


def test_parse_prompt_strips_tokens():
    text, reqs = parse_prompt("a cat <lora:style:0.6> and <lyco:hero:1:0.5> <hypernet:x:1>")
    assert text == "a cat  and  <hypernet:x:1>"
    assert reqs == [LoraRequest("style", 0.6, 0.6), LoraRequest("hero", 1.0, 0.5)]


def test_infotext_round_trip():
    value = format_hashes([("my:lora", "0123456789ab"), ("b,c", "abcdefabcdef"), ("skip", "")])
    assert value == "mylora: 0123456789ab, bc: abcdefabcdef"
    assert parse_hashes(f'"{value}"') == {"mylora": "0123456789ab", "bc": "abcdefabcdef"}
    prompt = "x <lora:mylora:0.5> <lora:unknown:1>"
    assert rename_in_prompt(prompt, {"mylora": "0123456789ab"}, {"0123456789ab": "local_name"}.get) == \
        "x <lora:local_name:0.5> <lora:unknown:1>"


@pytest.mark.parametrize("key,dual,expect", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", False,
     ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down.weight")),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", True,
     ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "hada_w1_a")),
    ("lycoris_unet_input_blocks_4_1_proj_in.lokr_w1", True, ("lora_unet_input_blocks_4_1_proj_in", "lokr_w1")),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight", False,
     ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "lora_down.weight")),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight", False,
     ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0", "lora_up.weight")),
    ("text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_B.weight", True,
     ("lora_te1_text_model_encoder_layers_3_self_attn_q_proj", "lora_up.weight")),
    ("text_encoder_2.text_model.encoder.layers.3.self_attn.to_v_lora.down.weight", True,
     ("lora_te2_text_model_encoder_layers_3_self_attn_v_proj", "lora_down.weight")),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.up.weight", False,
     ("lora_te_text_model_encoder_layers_0_mlp_fc2", "lora_up.weight")),
    ("base_model.model.unet.conv_in.lora_A.weight", False, ("lora_unet_conv_in", "lora_down.weight")),
    ("diffusion_model.input_blocks.1.1.proj_in.lora.down.weight", False,
     ("lora_unet_input_blocks_1_1_proj_in", "lora_down.weight")),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", False,
     ("lora_unet_down_blocks_0_attentions_0_proj_in", "dora_scale")),
    ("first_stage_model.decoder.conv_in.weight", False, None),
])
def test_split_key(key, dual, expect):
    assert split_key(key, dual) == expect


def test_family_detection():
    assert families.detect_family({}, {"lora_te1_x"}, {}) == "sdxl"
    assert families.detect_family({}, {"lora_unet_input_blocks_4_1_proj_in"}, {}) == "sdxl"
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert families.detect_family({}, {k}, {f"{k}.lora_down.weight": (4, 768)}) == "sd1"
    assert families.detect_family({}, {k}, {f"{k}.lora_down.weight": (4, 1024)}) == "sd2"
    assert families.detect_family({"ss_base_model_version": "sdxl_base_v1-0"}, {k}, {}) == "sdxl"
    assert families.detect_family({"ss_v2": "True"}, {k}, {}) == "sd2"
    assert families.detect_family({"modelspec.architecture": "stable-diffusion-v1/lora"}, {k}, {}) == "sd1"
    assert families.detect_family({}, {k}, {f"{k}.lora_down.weight": (4, 32)}) is None


def test_ldm_spelled_sd1_and_sd2_files_are_not_taken_for_sdxl():
    """The built-in Lora applies an SD1 file spelled the LDM way (its names become ``diffusion_model_*``);
    its 768-wide cross-attention says SD1 whatever the spelling. Without such a layer the spelling decides."""
    ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    for width, family in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl")):
        assert families.detect_family({}, {ldm}, {f"{ldm}.lora_down.weight": (4, width)}) == family
    proj = "lora_unet_input_blocks_1_1_proj_in"
    assert families.detect_family({}, {proj}, {f"{proj}.lora_down.weight": (4, 320, 1, 1)}) == "sdxl"


def test_captions_are_escaped_for_the_webui_prompt_parser():
    from lib_lora.params import literal_caption
    # checked against the WebUI's own parse_prompt_attention in tests/test_e2e_webui.py
    assert literal_caption(r"miku (vocaloid), [sketch], a\b, (red:1.2)") == \
        r"miku \(vocaloid\), \[sketch\], a\\b, \(red:1.2\)"
    assert literal_caption("plain, tags") == "plain, tags"
