"""LBW's per-element weights (lbwe=): presets, the layer names they match, and merged deltas.

Expected names follow the WebUI's rule for the built-in Lora's layer names (a module's path under
``diffusion_model``, ``cond_stage_model.wrapped`` or ``conditioner.embedders[i].wrapped`` with dots as
underscores, prefixed by ``i_`` on SDXL) and the built-in's conversion of kohya's OpenCLIP names;
expected multipliers are written out by hand from LBW's documented rules (a directive matches when
a block word and an element word occur in the name + block; the last match replaces the block weight).
"""
from __future__ import annotations

import pytest
import torch

from lib_lora import blockweights as bw
from lib_lora import elementweights as ew
from lib_lora.modelmap import ModelMap
from lib_lora.network import parse_state_dict
from lib_lora.params import LoraRequest, parse_args, split_items
from lib_lora.patcher import Patcher
from loras import activation, kohya_lora
from tiny_models import build_sd1, build_sd2, build_sdxl

# LBW's README example, as its Elemental text box / elempresets.txt holds it
PRESETS_TEXT = """ATTNDEEPON:IN05-OUT05:attn:1,IN05-OUT05:attn:12

ATTNDEEPOFF:IN05-OUT05:attn:0
BASE:attn:0.5

PROJDEEPOFF:IN05-OUT05:proj:0

XYZ:::1

no preset here
"""


def req(*items, presets=None):
    return parse_args(*split_items(list(items)), element_presets=presets)


def test_presets_text_and_directives():
    presets = ew.read_element_presets(PRESETS_TEXT)
    assert set(presets) == {"ATTNDEEPON", "ATTNDEEPOFF", "PROJDEEPOFF", "XYZ"}
    off = ew.parse_element_weights("ATTNDEEPOFF", presets)
    in05_out05 = ("IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11", "M00", "OUT00", "OUT01", "OUT02",
                  "OUT03", "OUT04", "OUT05")
    assert off.directives == (ew.Directive(in05_out05, False, ("attn",), False, 0.0),
                              ew.Directive(("BASE",), False, ("attn",), False, 0.5))
    # a range may be written backwards; NOT negates a side; an empty side matches everything
    d, = ew.parse_element_weights("X", {"X": "NOT OUT01-IN11 BASE:NOT attn ff:-0.5"}).directives
    assert d == ew.Directive(("IN11", "M00", "OUT00", "OUT01", "BASE"), True, ("attn", "ff"), True, -0.5)
    assert ew.parse_element_weights("XYZ", presets).directives == (ew.Directive(("",), False, ("",), False, 1.0),)
    # pieces without exactly two ':' are skipped, as in LBW
    assert len(ew.parse_element_weights("X", {"X": "IN05::1,attn:0,a:b:c:1,\n::2"}).directives) == 2


@pytest.mark.parametrize("text,why", [
    ("IN05-OUT99:attn:0", "'IN05-OUT99' is not a range of blocks"),
    ("IN05:attn:half", "'half' is not a number"),
    ("IN05:attn:nan", "is not a finite number"),
])
def test_bad_presets_apply_the_lora_without_element_weights(text, why):
    r = req("a", "0.7", "lbw=MIDD", "lbwe=P", presets={"P": text})
    assert r.elements is None and r.blocks is not None and r.te == 0.7
    assert len(r.warnings) == 1 and why in r.warnings[0] and "applied without element weights" in r.warnings[0]


def test_lbwe_argument_forms():
    r = req("a", "1", "lbwe=ATTNDEEPOFF")   # LBW's default presets when none are given
    assert r.elements.name == "ATTNDEEPOFF" and r.warnings == ()
    r = req("a", "0.5", "MIDD", "ATTNDEEPON")  # LBW's positional form: lbw third, lbwe fourth
    assert (r.te, r.blocks is not None, r.elements.name, r.dyn) == (0.5, True, "ATTNDEEPON", None)
    r = req("a", "0.5", "0.4", "PROJDEEPOFF")  # the built-in's dyn place holds a word: lbwe
    assert (r.te, r.unet, r.elements.name, r.dyn) == (0.5, 0.4, "PROJDEEPOFF", None)
    assert req("a", "1", "1", "8").dyn == 8
    r = req("a", "lbwe=ATTNON")
    assert r.elements is None and r.warnings == (
        "a: lbwe=ATTNON: 'ATTNON' is not an element-weight preset — applied without element weights",)


def webui_names(prefix: str, root: torch.nn.Module) -> dict[int, str]:
    """id(module) -> the WebUI's network_layer_name for modules under ``root``."""
    return {id(m): prefix + n.replace(".", "_") for n, m in root.named_modules() if n}


def test_layer_names_are_the_builtins_sd1():
    tiny = build_sd1(seed=0)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    want = {**webui_names("diffusion_model_", tiny.unet), **webui_names("transformer_", tiny.text_encoders[0][1])}
    for t in mm.targets:
        assert ew.lbw_layer_name([t.key, *t.aliases], "sd1") == want[id(t.module)], t.key
    q = mm.get("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")
    assert ew.lbw_layer_name([q.key, *q.aliases], "sd1") == "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def test_layer_names_are_the_builtins_sdxl_and_sd2():
    tiny = build_sdxl(seed=0)
    mm = ModelMap.build("sdxl", tiny.unet, tiny.text_encoders)
    want = {**webui_names("diffusion_model_", tiny.unet), **webui_names("0_transformer_", tiny.text_encoders[0][1]),
            **webui_names("1_model_", tiny.text_encoders[1][1])}
    qkv = 0
    for t in mm.targets:
        name = ew.lbw_layer_name([t.key, *t.aliases], "sdxl")
        if t.rows is not None:  # q/k/v of the fused in_proj: the built-in's conversion of kohya's name
            qkv += 1
            i, proj = t.key.split("_")[6], t.key.split("_")[-2]
            assert t.key == f"lora_te2_text_model_encoder_layers_{i}_self_attn_{proj}_proj"
            assert name == f"1_model_transformer_resblocks_{i}_attn_{proj}_proj"
        else:
            assert name == want[id(t.module)], t.key
    assert qkv >= 6
    sd2 = build_sd2(seed=0)
    mm2 = ModelMap.build("sd2", sd2.unet, sd2.text_encoders)
    want = {**webui_names("diffusion_model_", sd2.unet), **webui_names("model_", sd2.text_encoders[0][1])}
    for t in mm2.targets:
        if t.rows is None:
            assert ew.lbw_layer_name([t.key, *t.aliases], "sd2") == want[id(t.module)], t.key
    t = mm2.get("lora_te_text_model_encoder_layers_0_self_attn_k_proj")
    assert ew.lbw_layer_name([t.key, *t.aliases], "sd2") == "model_transformer_resblocks_0_attn_k_proj"
    assert ew.lbw_layer_name(["lora_unet_joint_blocks_0_x_block_attn_qkv"], "sd3") is None


# lbw=MIDD with the presets above, by hand: (block, MIDD weight) -> weight after lbwe
SD1_CASES = {
    # key: (block weight under MIDD, ATTNDEEPOFF, ATTNDEEPON, NOTS)
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (0, 0, 0, 0),      # IN04: outside IN05-OUT05
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": (1, 0, 12, 1),     # IN05 attn
    "lora_unet_down_blocks_1_attentions_1_proj_in": (1, 1, 1, 1),                              # IN05, no attn
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0": (1, 0, 12, 1),   # OUT03
    "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn1_to_v": (1, 1, 1, 0.25),     # OUT06: after OUT05
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": (0, 0, 0, 0.25),       # OUT11, no attn
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1, 0.5, 1, 1),                    # BASE attn
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (1, 1, 1, 1),                               # BASE, no attn
    "lora_unet_time_embedding_linear_1": (1, 1, 1, 0.5),                                       # outside every block
}
# not attention, outside IN05-OUT05 and BASE; OUT06's attention; outside every block, "ff": words match
# anywhere in the name, so "ff" matches every UNet layer through "diffusion_model" (as in LBW)
NOT_PRESET = "NOT IN05-OUT05 BASE:NOT attn:0.25,OUT06:attn:0.25,NOT IN00-OUT11 BASE:ff:0.5"


@pytest.mark.parametrize("column,preset", [(1, "ATTNDEEPOFF"), (2, "ATTNDEEPON"), (3, "NOTS")])
def test_sd1_multipliers_by_hand(column, preset):
    tiny = build_sd1(seed=0)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    presets = {**ew.read_element_presets(PRESETS_TEXT), "NOTS": NOT_PRESET}
    r = req("a", "0.8", "0.6", "lbw=MIDD", f"lbwe={preset}", presets=presets)
    act = LoraRequest("a", r.te, r.unet, blocks=r.blocks, elements=r.elements)
    p = Patcher(mm)
    for key, weights in SD1_CASES.items():
        t = mm.get(key)
        mult = 0.8 if t.is_text_encoder else 0.6
        assert act.multiplier(t, p.block(t), p.lbw_name(t)) == pytest.approx(mult * weights[column]), key
        no_lbwe = LoraRequest("a", r.te, r.unet, blocks=r.blocks)
        assert no_lbwe.multiplier(t, p.block(t)) == pytest.approx(mult * weights[0]), key


def test_sdxl_multipliers_by_hand():
    tiny = build_sdxl(seed=0)
    mm = ModelMap.build("sdxl", tiny.unet, tiny.text_encoders)
    # without lbw= every block weight is 1; c_fc exists only in the OpenCLIP encoder's names
    presets = {"E": "BASE:c_fc:0,IN04-IN08:attn2:2,IN07:NOT attn:-1,::0.5\n0_transformer:mlp:3"}
    act = LoraRequest("a", 1.0, 0.5, elements=req("a", "lbwe=E", presets=presets).elements)
    p = Patcher(mm)
    cases = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": 1.0 * 3,            # te1: the last directive
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": 1.0 * 0.5,
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": 1.0 * 0.5,         # c_fc -> 0, then ::0.5 wins
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": 0.5 * 0.5,
        "lora_unet_label_emb_0_0": 0.5 * 0.5,
    }
    for key, want in cases.items():
        t = mm.get(key)
        assert t is not None, key
        assert act.multiplier(t, p.block(t), p.lbw_name(t)) == pytest.approx(want), key
    presets = {"E": "BASE:c_fc:0,IN04-IN08:attn2:2,IN07:NOT attn:-1"}
    act = LoraRequest("a", 1.0, 0.5, elements=req("a", "lbwe=E", presets=presets).elements)
    cases = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": 1.0,
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": 0.0,
        "lora_te2_text_model_encoder_layers_0_mlp_fc2": 1.0,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": 0.5 * 2,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": 0.5,
        "lora_unet_input_blocks_7_1_proj_in": 0.5 * -1,
        "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_q": 0.5 * 2,
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_q": 0.5,
    }
    for key, want in cases.items():
        t = mm.get(key)
        assert t is not None, key
        assert act.multiplier(t, p.block(t), p.lbw_name(t)) == pytest.approx(want), key


def hand_delta(sd, key, mult):
    down = sd[f"{key}.lora_down.weight"].double().flatten(1)
    up = sd[f"{key}.lora_up.weight"].double().flatten(1)
    return mult * float(sd[f"{key}.alpha"]) / down.shape[0] * (up @ down)


def test_element_weights_merge_like_lbw():
    tiny = build_sd1(seed=0)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    keys = [k for k in SD1_CASES if "embedding" not in k]  # kohya_lora leaves embeddings out
    sd = kohya_lora(mm, seed=1, only=tuple(keys))
    assert {k.split(".")[0] for k in sd} == set(keys)
    w0 = {k: mm.get(k).module.weight.detach().double().clone() for k in keys}
    r = req("a", "0.8", "0.6", "lbw=MIDD", "lbwe=ATTNDEEPOFF", presets=ew.read_element_presets(PRESETS_TEXT))
    p = Patcher(mm)
    rep = p.apply([activation(parse_state_dict("a", sd, {}), r.te, r.unet, blocks=r.blocks, elements=r.elements)])
    assert not rep.messages
    for key in keys:
        mult = (0.8 if key.startswith("lora_te") else 0.6) * SD1_CASES[key][1]
        expect = w0[key] + hand_delta(sd, key, mult).reshape(w0[key].shape)
        torch.testing.assert_close(mm.get(key).module.weight.double(), expect, rtol=1e-5, atol=1e-6, msg=key)
    p.restore()
    assert all(torch.equal(mm.get(k).module.weight.double(), w0[k]) for k in keys)


def test_presets_file_overlays_lbws_defaults(tmp_path):
    path = tmp_path / ew.ELEMENT_PRESETS_FILE
    path.write_text("ATTNDEEPOFF:IN05:attn:0.3\r\n\r\nMINE:::0\n", encoding="utf-8")
    presets = ew.load_element_presets([tmp_path / "missing.txt", path])
    assert presets["PROJDEEPOFF"] == ew.DEFAULT_ELEMENT_PRESETS["PROJDEEPOFF"]
    assert ew.parse_element_weights("ATTNDEEPOFF", presets).directives[0].weight == 0.3
    src = bw.PresetSource(lambda: [path], ew.load_element_presets, ew.DEFAULT_ELEMENT_PRESETS)
    assert "MINE" in src.current()
    path.unlink()
    assert src.current() == ew.DEFAULT_ELEMENT_PRESETS
