"""LBW syntax (lbw=, presets, x=, start/stop/step), unknown arguments, and per-block merging.

Expected block assignments and merged weights are written out by hand from LBW's documented
tables (BASE, IN00-IN11, M00, OUT00-OUT11; 17/12/20/26-value forms) and the kohya LoRA formula.
"""
from __future__ import annotations

import random

import pytest
import torch

from lib_lora import blockweights as bw
from lib_lora.modelmap import ModelMap
from lib_lora.network import parse_state_dict
from lib_lora.params import LoraRequest, parse_args, parse_prompt, split_items
from lib_lora.patcher import Patcher
from loras import activation, kohya_lora
from tiny_models import build_sd1, build_sdxl

MIDD = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"


def req(*items, presets=None) -> LoraRequest:
    return parse_args(*split_items(list(items)), presets=presets)


def slots(**weights) -> tuple[float, ...]:
    """A 26-slot vector: the given blocks, 0 elsewhere."""
    return tuple(float(weights.get(b, 0.0)) for b in bw.BLOCK_IDS)


# -- arguments -------------------------------------------------------------------------------


def test_unknown_named_arguments_keep_the_lora():
    r = req("a", "0.8", "foo=1", "lbwe=ATTNON")
    assert (r.name, r.te, r.unet, r.blocks) == ("a", 0.8, 0.8, None)
    assert r.warnings == ("a: lbwe=ATTNON: 'ATTNON' is not an element-weight preset — applied without element weights",
                          "a: unknown argument foo=1 ignored")
    # the built-in reads only items with exactly one '=' as named; the others stay positional
    assert split_items(["a", "te = 0.5", "x=y=z"]) == (["a", "x=y=z"], {"te": "0.5"})


def test_lbw_named_and_positional_forms():
    mid = slots(BASE=1, IN05=1, IN07=1, IN08=1, M00=1, OUT03=1, OUT04=1, OUT05=1, OUT06=1)
    r = req("a", "1", "lbw=MIDD")
    assert (r.te, r.unet, r.blocks.weights, r.warnings) == (1.0, 1.0, mid, ())
    assert req("a", "0.7", "0.3", "lbw=MIDD").blocks.weights == mid
    assert req("a", "w=MIDD").blocks.weights == mid                      # LBW's alias
    r = req("a", "0.6", "MIDD")                                          # LBW's older positional form
    assert (r.te, r.unet, r.blocks.weights) == (0.6, 0.6, mid)
    assert req("a", "1", MIDD).blocks.weights == mid                      # an explicit vector there too
    _, found = parse_prompt("x <lora:a:0.5:lbw=MIDD:stop=10>")
    assert found[0].blocks.weights == mid and found[0].stop == 10


@pytest.mark.parametrize("spec,expect", [
    ("ALL", slots(BASE=1, IN01=1, IN02=1, IN04=1, IN05=1, IN07=1, IN08=1, M00=1,
                  **{f"OUT{i:02d}": 1 for i in range(3, 12)})),
    ("ALL0.5", slots(BASE=.5, IN01=.5, IN02=.5, IN04=.5, IN05=.5, IN07=.5, IN08=.5, M00=.5,
                     **{f"OUT{i:02d}": .5 for i in range(3, 12)})),
    ("OUTS", slots(BASE=1, OUT07=1, OUT08=1, OUT09=1, OUT10=1, OUT11=1)),
    ("INS", slots(BASE=1, IN01=1, IN02=1, IN04=1)),
    # SDXL 12: BASE IN04 IN05 IN07 IN08 M00 OUT00-OUT05
    ("0.5,1,0,0,0,0.25,0,0,0,0,0,2", slots(BASE=.5, IN04=1, M00=.25, OUT05=2)),
    # SDXL 20: BASE IN00-IN08 M00 OUT00-OUT08
    ("1, 0,0,0,0,0,0,0,0,0.3, 0, 0,0,0,0,0,0,0,0,-1", slots(BASE=1, IN08=.3, OUT08=-1)),
    (",".join(str(i) for i in range(26)), tuple(float(i) for i in range(26))),
])
def test_vector_forms(spec, expect):
    assert bw.parse_block_weights(spec).weights == expect


def test_random_and_x_values():
    r = req("a", "0.5", "lbw=X,X+0.25,X-1,R,U," + ",".join(["0"] * 12), "x=0.7")
    w = dict(zip(bw.BLOCK_IDS, r.blocks.weights))
    assert (w["BASE"], w["IN01"], w["IN02"]) == (0.7, pytest.approx(0.95), pytest.approx(-0.3))
    assert 0 <= w["IN04"] <= 1 and -0.5 <= w["IN05"] <= 1.5
    assert w["IN04"] == round(w["IN04"], 3)
    seeded = bw.parse_block_weights("R," + ",".join(["1"] * 16), rng=random.Random(5))
    assert seeded.weights[0] == round(random.Random(5).random(), 3)
    # README form: <lora:name:te:PRESET:x>
    assert req("a", "0.5", "XOUT", "0.3", presets={"XOUT": "X," + ",".join(["1"] * 16)}).blocks.weights[0] == 0.3


@pytest.mark.parametrize("spec,why", [
    ("1,1,1", "3 block weights given, expected 12/17/20/26"),
    ("NOPE", "'NOPE' is not a block-weight preset"),
    ("midd", "'midd' is not a block-weight preset"),   # case-sensitive, as in LBW
    ("1,a," + ",".join(["1"] * 15), "'a' is not a number"),
    (",".join(["1"] * 61), "61 is LBW's FLUX form"),
])
def test_bad_vectors_apply_the_lora_without_block_weights(spec, why):
    r = req("a", "0.9", f"lbw={spec}")
    assert (r.te, r.unet, r.blocks) == (0.9, 0.9, None)
    assert len(r.warnings) == 1 and why in r.warnings[0] and "applied without block weights" in r.warnings[0]


def test_schedule_arguments():
    assert (req("a", "start=5").start, req("a", "start=5").stop) == (5, None)
    assert (req("a", "stop=12").start, req("a", "stop=12").stop) == (None, 12)
    r = req("a", "start=1", "stop=2", "step=5-10")       # step= wins, as in LBW
    assert (r.start, r.stop, r.warnings) == (5, 10, ())
    r = req("a", "step=7", "stop=x")
    assert (r.start, r.stop) == (None, None) and len(r.warnings) == 2
    assert r.scheduled is False and req("a", "stop=3").scheduled


# -- presets file ---------------------------------------------------------------------------


def test_presets_file(tmp_path):
    text = "\n".join([
        "MINE:0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        " XLIN : 1,1,1,1,1,0,0,0,0,0,0,0",
        "# COMMENT:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        "HASH:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1 # note",   # LBW drops any line with a '#'
        "SHORT:1,1,1",
        "no colon here",
        "ALL:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    ])
    assert set(bw.read_presets(text)) == {"MINE", "XLIN", "ALL"}
    path = tmp_path / bw.PRESETS_FILE
    path.write_text(text, encoding="utf-8")
    presets = bw.load_presets([tmp_path / "missing.txt", path])
    assert presets["MIDD"] == MIDD                       # defaults stay available
    assert req("a", "lbw=XLIN", presets=presets).blocks.weights == slots(BASE=1, IN04=1, IN05=1, IN07=1, IN08=1)
    assert req("a", "lbw=ALL", presets=presets).blocks.weights[0] == 0.5   # the file wins
    assert req("a", "lbw=MINE", presets=presets).blocks.weights[0] == 0.0


# -- which block a layer is in ----------------------------------------------------------------

SD1_BLOCKS = {
    "lora_unet_conv_in": "IN00",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
    "lora_unet_down_blocks_0_resnets_1_conv1": "IN02",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q": "IN05",
    "lora_unet_down_blocks_3_resnets_1_conv2": "IN11",
    "lora_unet_mid_block_attentions_0_proj_out": "M00",
    "lora_unet_mid_block_resnets_1_conv1": "M00",
    "lora_unet_up_blocks_0_resnets_2_conv1": "OUT02",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
    "lora_unet_up_blocks_1_attentions_0_proj_in": "OUT03",
    "lora_unet_up_blocks_2_upsamplers_0_conv": "OUT08",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "OUT11",
    "lora_unet_time_embedding_linear_1": None,
    "lora_unet_conv_out": None,
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "BASE",
    "lora_te_text_model_final_layer_norm": None,
    "lora_unet_input_blocks_4_1_proj_in": "IN04",
    "lora_unet_output_blocks_10_1_proj_in": "OUT10",
    "lora_unet_output_blocks_1_0_in_layers_2": "OUT01",
    "lora_unet_middle_block_1_proj_in": "M00",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_label_emb_0_0": None,
}


@pytest.mark.parametrize("key,block", list(SD1_BLOCKS.items()))
def test_block_of(key, block):
    assert bw.block_of(key) == block


@pytest.mark.parametrize("build", [build_sd1, build_sdxl])
def test_both_unet_spellings_agree(build):
    tiny = build(seed=0)
    mm = ModelMap.build(tiny.family, tiny.unet, tiny.text_encoders)
    checked = 0
    for t in mm.targets:
        names = [t.key, *t.aliases]
        ldm = [n for n in names if n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                                 "lora_unet_output_blocks_"))]
        diff = [n for n in names if n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_",
                                                  "lora_unet_up_blocks_", "lora_unet_conv_in"))]
        if ldm and diff:
            assert bw.block_of(ldm[0]) == bw.block_of(diff[0]) is not None, (ldm[0], diff[0])
            checked += 1
    assert checked > 100


# -- merging ------------------------------------------------------------------------------------


def hand_delta(sd, key, mult):
    down = sd[f"{key}.lora_down.weight"].double().flatten(1)
    up = sd[f"{key}.lora_up.weight"].double().flatten(1)
    return mult * float(sd[f"{key}.alpha"]) / down.shape[0] * (up @ down)


# SD1 layers in every kind of place; conv_out is outside every block
MERGE_KEYS = [k for k in SD1_BLOCKS if k.startswith(("lora_unet_down", "lora_unet_mid_block", "lora_unet_up",
                                                    "lora_unet_conv", "lora_te_text_model_encoder"))]


def test_block_weights_scale_each_layer_like_lbw():
    """delta = te|unet multiplier x block weight x up@down x alpha/rank; layers outside blocks keep 1."""
    tiny = build_sd1(seed=0)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    a_sd = kohya_lora(mm, seed=1, convs=True, only=tuple(MERGE_KEYS))
    b_sd = kohya_lora(mm, seed=2, convs=True, only=tuple(MERGE_KEYS))
    assert {k.split(".")[0] for k in a_sd} == set(MERGE_KEYS)
    w0 = {k: mm.get(k).module.weight.detach().double().clone() for k in MERGE_KEYS}
    # a: MIDD (17 values: IN00/IN03/IN11/OUT02 get 0); b: fractional 26-value vector
    b_vec = [round(0.1 * i - 0.5, 2) for i in range(26)]
    b_weight = dict(zip(bw.BLOCK_IDS, b_vec))
    a_weight = {"BASE": 1, "IN05": 1, "M00": 1, "OUT03": 1}
    a = req("a", "0.8", "0.6", "lbw=MIDD")
    b = req("b", "1", "0.5", "lbw=" + ",".join(map(str, b_vec)))
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("a", a_sd, {}), a.te, a.unet, blocks=a.blocks),
             activation(parse_state_dict("b", b_sd, {}), b.te, b.unet, blocks=b.blocks)])
    for key in MERGE_KEYS:
        block = SD1_BLOCKS[key]
        te = key.startswith("lora_te")
        wa = (0.8 if te else 0.6) * (1.0 if block is None else a_weight.get(block, 0.0))
        wb = (1.0 if te else 0.5) * (1.0 if block is None else b_weight[block])
        expect = w0[key] + (hand_delta(a_sd, key, wa) + hand_delta(b_sd, key, wb)).reshape(w0[key].shape)
        torch.testing.assert_close(mm.get(key).module.weight.double(), expect, rtol=1e-5, atol=1e-6, msg=key)
    p.restore()
    for key in MERGE_KEYS:
        assert torch.equal(mm.get(key).module.weight.double(), w0[key])
