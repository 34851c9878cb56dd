"""Merging and exact restore on tiny real-structure models, checked against hand-computed deltas."""
from __future__ import annotations

import copy

import pytest
import torch

from lib_lora.network import parse_state_dict
from lib_lora.patcher import Patcher
from loras import activation, kohya_lora, same, snapshot
from tiny_models import build_sd1, build_sd2, build_sdxl

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def model_map(tiny):
    from lib_lora.modelmap import ModelMap
    return ModelMap.build(tiny.family, tiny.unet, tiny.text_encoders)


def modules(tiny):
    return [tiny.unet] + [m for _, m in tiny.text_encoders]


@pytest.fixture(scope="module")
def sd1():
    return build_sd1(seed=0)


def hand_delta(sd, key, mult):
    down = sd[f"{key}.lora_down.weight"].double().flatten(1)
    up = sd[f"{key}.lora_up.weight"].double().flatten(1)
    alpha = float(sd[f"{key}.alpha"])
    return mult * alpha / down.shape[0] * (up @ down)


def test_merge_matches_hand_computed_delta(sd1):
    mm = model_map(sd1)
    sd = kohya_lora(mm, rank=4, alpha=3.0, seed=1)
    net = parse_state_dict("a", sd, {})
    w0 = mm.get(Q).module.weight.detach().double().clone()
    p = Patcher(mm)
    rep = p.apply([activation(net, 0.7, 0.7)])
    assert not rep.messages
    got = mm.get(Q).module.weight.detach().double()
    torch.testing.assert_close(got - w0, hand_delta(sd, Q, 0.7), rtol=1e-5, atol=1e-6)
    # text encoder uses the te multiplier, unet its own
    p.apply([activation(net, 0.0, 0.5)])
    te_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert torch.equal(mm.get(te_key).module.weight, sd1.text_encoders[0][1].text_model.encoder.layers[0].self_attn.q_proj.weight)
    p.restore()


def test_thousand_cycles_restore_bitwise(sd1):
    mm = model_map(sd1)
    before = snapshot(*modules(sd1))
    # a cross-section (linear, 1x1 and 3x3 conv, text encoder) keeps 1000 cycles quick
    only = ("attn1_to", "attn2_to_k", "proj_in", "resnets_0_conv1", "lora_te_text_model_encoder_layers_0")
    nets = [parse_state_dict(f"n{i}", kohya_lora(mm, rank=2, seed=i, convs=True, only=only), {}) for i in range(3)]
    p = Patcher(mm)
    for i in range(1000):
        acts = [activation(nets[i % 3], 1.0 + i % 5 * 0.1, -0.5)]
        if i % 7 == 0:
            acts.append(activation(nets[(i + 1) % 3], 0.3, 0.9))
        p.apply(acts)
        if i % 2:
            p.restore()
    p.restore()
    assert same(before, snapshot(*modules(sd1)))


def test_weight_zero_is_exactly_no_lora(sd1):
    mm = model_map(sd1)
    before = snapshot(*modules(sd1))
    net = parse_state_dict("a", kohya_lora(mm, seed=3, convs=True), {})
    p = Patcher(mm)
    p.apply([activation(net, 0.0, 0.0)])
    assert same(before, snapshot(*modules(sd1)))
    assert not p.active


def test_two_loras_sum_and_negative_weight(sd1):
    mm = model_map(sd1)
    a, b = kohya_lora(mm, seed=4), kohya_lora(mm, seed=5)
    w0 = mm.get(Q).module.weight.detach().double().clone()
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("a", a, {}), 1, 0.8), activation(parse_state_dict("b", b, {}), 1, -0.6)])
    expect = hand_delta(a, Q, 0.8) + hand_delta(b, Q, -0.6)
    torch.testing.assert_close(mm.get(Q).module.weight.double() - w0, expect, rtol=1e-5, atol=1e-6)
    p.restore()


def test_only_changed_layers_are_remerged(sd1):
    mm = model_map(sd1)
    unet_only = parse_state_dict("u", kohya_lora(mm, seed=6, only=("lora_unet_",)), {})
    te_only = parse_state_dict("t", kohya_lora(mm, seed=7, only=("lora_te_",)), {})
    p = Patcher(mm)
    first = p.apply([activation(unet_only), activation(te_only)])
    again = p.apply([activation(unet_only), activation(te_only)])
    assert first.changed_slots > 0 and again.changed_slots == 0
    te_change = p.apply([activation(unet_only), activation(te_only, te=0.5)])
    n_te = sum(1 for k in te_only.adapters)
    assert 0 < te_change.changed_slots <= 2 * n_te  # weights (+ biases) of the te layers only
    p.restore()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    tiny = build_sd1(seed=1)
    for m in modules(tiny):
        m.to(dtype)
    mm = model_map(tiny)
    before = snapshot(*modules(tiny))
    sd = kohya_lora(mm, seed=8)
    w0 = mm.get(Q).module.weight.detach().clone()
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("a", sd, {}))])
    w = mm.get(Q).module.weight
    assert w.dtype == dtype
    expect = (w0.double() + hand_delta(sd, Q, 1.0)).to(dtype)  # computed wide, cast once
    assert torch.equal(w, expect)
    p.restore()
    assert same(before, snapshot(*modules(tiny)))


def test_fp8_weights_get_every_lora():
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        pytest.skip("no float8 in this torch")
    tiny = build_sd1(seed=2)
    mm = model_map(tiny)
    lin = mm.get(Q).module
    lin.weight.data = lin.weight.data.to(fp8)
    before = lin.weight.detach().clone()
    a, b = kohya_lora(mm, seed=9, scale=1.0, only=(Q,)), kohya_lora(mm, seed=10, scale=1.0, only=(Q,))
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("a", a, {})), activation(parse_state_dict("b", b, {}))])
    expect = (before.double() + hand_delta(a, Q, 1) + hand_delta(b, Q, 1)).to(fp8)
    assert torch.equal(lin.weight.view(torch.uint8), expect.view(torch.uint8))
    p.restore()
    assert torch.equal(lin.weight.view(torch.uint8), before.view(torch.uint8))


def test_checkpoint_change_while_active_keeps_new_weights(sd1):
    mm = model_map(sd1)
    other = copy.deepcopy(sd1.unet.state_dict())
    for v in other.values():
        v.add_(0.25) if v.is_floating_point() else None
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("a", kohya_lora(mm, seed=11), {}))])
    sd1.unet.load_state_dict(other)  # the WebUI loading another checkpoint into the same modules
    expect = snapshot(sd1.unet)
    p.restore()  # must not write the previous checkpoint's originals back
    assert same(expect, snapshot(sd1.unet))


def test_failure_mid_apply_leaves_model_untouched(sd1, monkeypatch):
    mm = model_map(sd1)
    before = snapshot(*modules(sd1))
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("a", kohya_lora(mm, seed=12), {}))])
    patched = snapshot(*modules(sd1))
    calls = {"n": 0}
    real = Patcher._write

    def flaky(self, slot, value):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # an interrupt half-way through re-merging
        return real(self, slot, value)

    monkeypatch.setattr(Patcher, "_write", flaky)
    with pytest.raises(KeyboardInterrupt):
        p.apply([activation(parse_state_dict("b", kohya_lora(mm, seed=13), {}))])
    monkeypatch.setattr(Patcher, "_write", real)
    assert not same(patched, before)
    assert same(before, snapshot(*modules(sd1)))
    assert not p.active


def test_shape_mismatch_and_unknown_layers_are_reported(sd1):
    mm = model_map(sd1)
    sd = kohya_lora(mm, seed=14, only=("attn1_to_q", "attn1_to_k"))
    sd[f"{Q}.lora_down.weight"] = torch.randn(4, 7)  # wrong input width
    sd["lora_unet_no_such_block_0.lora_down.weight"] = torch.randn(4, 8)
    sd["lora_unet_no_such_block_0.lora_up.weight"] = torch.randn(8, 4)
    before = mm.get(Q).module.weight.detach().clone()
    p = Patcher(mm)
    rep = p.apply([activation(parse_state_dict("odd", sd, {}))])
    text = " | ".join(rep.messages)
    assert "1 layers did not match" in text and "(7" not in text or "shape" in text
    assert "no counterpart" in text and "lora_unet_no_such_block_0" in text
    assert torch.equal(mm.get(Q).module.weight, before)
    assert rep.applied["odd"] > 0
    p.restore()


def test_sdxl_lora_on_sd1_model_is_refused(sd1):
    mm = model_map(sd1)
    sdxl = build_sdxl(seed=0)
    xl_net = parse_state_dict("xl", kohya_lora(model_map(sdxl), seed=15), {})
    assert xl_net.family == "sdxl"
    before = snapshot(*modules(sd1))
    rep = Patcher(mm).apply([activation(xl_net)])
    assert rep.messages == ["xl is an SDXL LoRA, the loaded model is SD1 — skipped"]
    assert same(before, snapshot(*modules(sd1)))


def test_sd2_qkv_deltas_land_in_in_proj_slices():
    tiny = build_sd2(seed=0)
    mm = model_map(tiny)
    te = tiny.text_encoders[0][1]
    attn = te.transformer.resblocks[1].attn
    d = attn.embed_dim
    base = attn.in_proj_weight.detach().double().clone()
    keys = {c: f"lora_te_text_model_encoder_layers_1_self_attn_{c}_proj" for c in "qkv"}
    sd = kohya_lora(mm, seed=16, only=tuple(keys.values()))
    assert len(sd) == 9
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("qkv", sd, {}), te=0.9)])
    got = attn.in_proj_weight.double() - base
    for i, c in enumerate("qkv"):
        torch.testing.assert_close(got[i * d:(i + 1) * d], hand_delta(sd, keys[c], 0.9), rtol=1e-5, atol=1e-6)
    p.restore()
    assert torch.equal(attn.in_proj_weight.double(), base)


def test_device_or_dtype_move_keeps_originals(sd1):
    """--medvram/offload move modules while LoRAs are merged; restore must still undo them."""
    tiny = build_sd1(seed=3)
    mm = model_map(tiny)
    before = snapshot(*modules(tiny))
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("a", kohya_lora(mm, seed=17, convs=True), {}))])
    for m in modules(tiny):
        m.double()  # stands in for .to(device): same Parameter objects, new storage
    p.restore()
    assert same([t.double() for t in before], snapshot(*modules(tiny)))


def test_ia3_and_lora_on_one_layer_both_use_the_original_weight(sd1):
    mm = model_map(sd1)
    w0 = mm.get(Q).module.weight.detach().double().clone()
    lora_sd = kohya_lora(mm, seed=18, only=(Q,))
    scale = torch.rand(w0.shape[0], generator=torch.Generator().manual_seed(0))
    ia3 = parse_state_dict("ia3", {f"{Q}.weight": scale}, {})
    assert ia3.adapters[Q].algo == "ia3"
    p = Patcher(mm)
    p.apply([activation(parse_state_dict("l", lora_sd, {})), activation(ia3, 1, 0.5)])
    expect = w0 + hand_delta(lora_sd, Q, 1.0) + 0.5 * w0 * scale.double()[:, None]
    torch.testing.assert_close(mm.get(Q).module.weight.double(), expect, rtol=1e-5, atol=1e-6)
    p.restore()


def test_webui_wrapped_token_embedding_is_found():
    from lib_lora.modelmap import ModelMap

    class Wrapper(torch.nn.Module):  # what the WebUI's EmbeddingsWithFixes does to the layer
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

    tiny = build_sd1(seed=0)
    te = tiny.text_encoders[0][1]
    emb = te.text_model.embeddings.token_embedding
    te.text_model.embeddings.token_embedding = Wrapper(emb)
    mm = ModelMap.build("sd1", None, [("te", te)])
    assert mm.get("lora_te_text_model_embeddings_token_embedding").module is emb


def test_merge_inside_autocast_gives_the_same_bits(sd1):
    """Hosts activate inside autocast (the WebUI does); the patcher turns it off, so the delta maths
    stay float32: a bfloat16 autocast would round the up @ down product."""
    sd = kohya_lora(model_map(sd1), rank=4, alpha=3.0, seed=21, convs=True)
    # DoRA magnitudes take the delta path through a matmul (plain LoRA merges with an in-place addmm_)
    g = torch.Generator().manual_seed(22)
    dora_sd = dict(sd, **{k.replace("lora_up.weight", "dora_scale"): torch.rand(v.shape[0], 1, generator=g) + 0.5
                          for k, v in sd.items() if k.endswith("lora_up.weight")})
    before = snapshot(*modules(sd1))
    results = []
    for use_autocast in (False, True):
        tiny = copy.deepcopy(sd1)
        p = Patcher(model_map(tiny))
        p.hook_max_cost = -1.0  # the start= LoRA is merged when its gate opens, re-merged by set_step
        nets = [activation(parse_state_dict("a", sd, {}), 0.7, 0.7),
                activation(parse_state_dict("b", dora_sd, {}), 0.3, 0.6, start=1)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            assert not p.apply(nets).messages
            p.set_step(1)
        results.append(snapshot(*modules(tiny)))
    assert not same(results[0], before)
    assert same(results[0], results[1])


@pytest.mark.parametrize("extra", [5, 4])   # inpainting (4 + mask + masked image), instruct-pix2pix (4 + image)
def test_a_locon_conv_in_applies_to_an_inpainting_models_latent_channels(extra):
    """A LoCon trained on a 4-channel model, on a model whose conv_in takes 9 (or 8) channels: its delta goes to
    the first 4, the latent's, as the built-in Lora pads the delta with zeros; the rest stay as they were."""
    tiny = build_sd1(seed=3)
    key = "lora_unet_conv_in"
    sd = kohya_lora(model_map(tiny), rank=2, alpha=1.0, seed=2, convs=True, only=(key,))
    old = tiny.unet.input_blocks[0][0]
    wide = torch.nn.Conv2d(4 + extra, old.out_channels, old.kernel_size, padding=old.padding)
    with torch.no_grad():
        wide.weight[:, :4] = old.weight
        wide.bias.copy_(old.bias)
    tiny.unet.input_blocks[0][0] = wide
    mm = model_map(tiny)
    before = snapshot(tiny.unet)
    w0 = wide.weight.detach().double().clone()
    p = Patcher(mm)
    rep = p.apply([activation(parse_state_dict("a", sd, {}), 1.0, 0.8)])
    assert not rep.messages
    got = wide.weight.detach().double()
    down, up = sd[f"{key}.lora_down.weight"].double(), sd[f"{key}.lora_up.weight"].double()
    want = 0.8 * 1.0 / 2 * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], 4, *down.shape[2:])
    torch.testing.assert_close(got[:, :4] - w0[:, :4], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:, 4:], w0[:, 4:])
    p.restore()
    assert same(before, snapshot(tiny.unet))


def test_an_fp8_layer_merges_from_the_webuis_fp16_copy_and_restores_its_fp8_bits():
    """WebUI "FP8 weight" with "Cache FP16 weight for LoRA": each layer holds float8 weights and an fp16 copy
    (``fp16_weight``/``fp16_bias``); the merge starts from the copy, as the built-in's does, and the restore
    writes the fp8 bits back."""
    tiny = build_sd1(seed=5)
    mm = model_map(tiny)
    sd = kohya_lora(mm, rank=4, alpha=3.0, seed=1, only=("attn1_to_q",))
    layer = mm.get(Q).module
    layer.fp16_weight = layer.weight.detach().half().clone()
    layer.to(torch.float8_e4m3fn)
    fp8 = layer.weight.detach().clone()
    p = Patcher(mm)
    assert not p.apply([activation(parse_state_dict("a", sd, {}), 1.0, 0.7)]).messages
    want = (layer.fp16_weight.double() + hand_delta(sd, Q, 0.7)).float().to(torch.float8_e4m3fn)
    assert torch.equal(layer.weight.view(torch.uint8), want.view(torch.uint8))
    assert not torch.equal(want.view(torch.uint8),     # what merging from the fp8 value gives: other bits
                           (fp8.double() + hand_delta(sd, Q, 0.7)).float().to(torch.float8_e4m3fn).view(torch.uint8))
    p.restore()
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.view(torch.uint8), fp8.view(torch.uint8))
