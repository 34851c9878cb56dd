"""start=/stop=: scheduled LoRAs ride on forward hooks, or are merged while their gate is open; either
way their output equals the merged model's, a closed gate is bitwise the model without them, and restore
(or an aborted generation) leaves no hook and no merge behind."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib_lora.blockweights import parse_block_weights
from lib_lora.bypass import HOOK_MAX_COST, Gate, hook_cost
from lib_lora.modelmap import ModelMap, Target
from lib_lora.network import parse_state_dict
from lib_lora.patcher import Activation, Patcher
from loras import activation, kohya_lora, same, snapshot
from tiny_models import CLIP_WIDTH, build_sd1

MIDD = parse_block_weights("MIDD")


@pytest.fixture(scope="module")
def tiny():
    return build_sd1(seed=4)


def unet_out(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, CLIP_WIDTH, generator=g)
    with torch.no_grad():
        return tiny.unet(x, torch.tensor([10, 700]), context=ctx)


def lycoris_net(mm):
    """Layers bypassed through their weight delta: LoHa, IA3, Full (+bias) on linears, Norm on a GroupNorm."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    loha = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    ia3 = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    full = "lora_unet_up_blocks_1_attentions_1_proj_out"
    norm = "lora_unet_up_blocks_2_resnets_0_norm1"
    wl, wf = mm.get(loha).weight(), mm.get(full).weight()
    sd = {f"{loha}.hada_w1_a": r(wl.shape[0], 2), f"{loha}.hada_w1_b": r(2, wl.shape[1]),
          f"{loha}.hada_w2_a": r(wl.shape[0], 2), f"{loha}.hada_w2_b": r(2, wl.shape[1]), f"{loha}.alpha": torch.tensor(1.),
          f"{ia3}.weight": r(mm.get(ia3).weight().shape[0]),
          f"{full}.diff": r(*wf.shape), f"{full}.diff_b": r(wf.shape[0]),
          f"{norm}.w_norm": r(mm.get(norm).weight().shape[0]), f"{norm}.b_norm": r(mm.get(norm).weight().shape[0])}
    net = parse_state_dict("lyco", sd, {})
    assert sorted(a.algo for a in net.adapters.values()) == ["full", "ia3", "loha", "norm"]
    return net


def test_scheduled_output_equals_merged_and_closed_gate_is_no_lora(tiny):
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    lora = parse_state_dict("lora", kohya_lora(mm, seed=1, convs=True), {})
    lyco = lycoris_net(mm)
    also = parse_state_dict("static", kohya_lora(mm, seed=2, only=("attn1_to_q",)), {})  # shares layers with lora
    base_out, before = unet_out(tiny), snapshot(tiny.unet)
    p = Patcher(mm)
    p.hook_max_cost = math.inf  # every layer a hook fits is hooked: the hook path under test

    p.apply([activation(lora, 1, 0.8, blocks=MIDD), activation(lyco, 1, 0.7), activation(also, 1, 0.5)])
    merged_out = unet_out(tiny)
    p.restore()

    rep = p.apply([activation(lora, 1, 0.8, blocks=MIDD, stop=5), activation(lyco, 1, 0.7, start=0, stop=5),
                   activation(also, 1, 0.5)])
    assert not rep.messages and rep.applied["lyco"] == 4
    assert {type(t).__name__ for t in p.bypass.terms.values()} == {"LowRank", "DeltaOutput"}
    torch.testing.assert_close(unet_out(tiny), merged_out, rtol=1e-4, atol=1e-5)

    also_only = Patcher(mm)  # reference for the closed gates: just the static network
    p.set_step(5)
    gated_out = unet_out(tiny)
    p.restore()
    also_only.apply([activation(also, 1, 0.5)])
    assert torch.equal(gated_out, unet_out(tiny))
    also_only.restore()

    p.apply([activation(lora, 1, 0.8, blocks=MIDD, start=2)])
    p.set_step(1)
    assert torch.equal(unet_out(tiny), base_out)
    steady = [t._version for t in tiny.unet.state_dict().values()]
    for step in range(2, 6):
        p.set_step(step)
        unet_out(tiny)
    assert [t._version for t in tiny.unet.state_dict().values()] == steady, "a step rewrote a weight"
    assert same(before, snapshot(tiny.unet)), "scheduled networks must not be merged into the UNet"

    p.restore()
    assert not any(m._forward_hooks for m in tiny.unet.modules())
    assert not p.active
    assert same(before, snapshot(tiny.unet))
    assert torch.equal(unet_out(tiny), base_out)


def test_text_encoder_part_of_a_scheduled_lora_is_merged(tiny):
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    net = parse_state_dict("a", kohya_lora(mm, seed=5, only=("lora_te_", "attn2_to_k")), {})
    te = [m for _, m in tiny.text_encoders]
    te_before, unet_before = snapshot(*te), snapshot(tiny.unet)
    p = Patcher(mm)
    p.hook_max_cost = math.inf  # the UNet part hooked, so its weights stay as they were
    p.apply([activation(net, 0.6, 1.0, stop=3)])
    assert not same(te_before, snapshot(*te))       # te runs before sampling: merged at its weight
    assert same(unet_before, snapshot(tiny.unet))
    assert sum(len(m._forward_hooks) for m in tiny.unet.modules()) == sum("attn2_to_k" in k for k in net.adapters)
    p.restore()
    assert same(te_before, snapshot(*te))


def test_gate_counts_steps_done():
    g = Gate(start=3, stop=6)
    seen = []
    for step in range(8):
        g.set_step(step)
        seen.append(g.factor)
    assert seen == [0, 0, 0, 1, 1, 1, 0, 0]
    g = Gate(stop=0)
    g.set_step(0)
    assert g.factor == 0


def test_hook_cost_is_the_branch_over_the_layer():
    lin, conv = nn.Linear(320, 640), nn.Conv2d(320, 640, 3, padding=1)
    lora = lambda down, up: parse_state_dict("n", {"lora_unet_x.lora_down.weight": torch.zeros(down),  # noqa: E731
                                                   "lora_unet_x.lora_up.weight": torch.zeros(up)}, {}).adapters["lora_unet_x"]
    assert hook_cost(Target("k", lin, "unet"), lora((16, 320), (640, 16)), None) == 16 * (320 + 640) / (320 * 640)
    assert hook_cost(Target("k", lin, "unet"), lora((16, 320), (640, 16)), 4) == 4 * (320 + 640) / (320 * 640)
    # LoCon: the down projection takes the 3x3 kernel, the up one is 1x1
    assert hook_cost(Target("k", conv, "unet"), lora((8, 320, 3, 3), (640, 8, 1, 1)), None) == \
        8 * (320 * 9 + 640) / (640 * 320 * 9)
    loha = parse_state_dict("n", {f"lora_unet_x.hada_{w}": torch.zeros(s) for w, s in
                                  (("w1_a", (640, 2)), ("w1_b", (2, 320)), ("w2_a", (640, 2)), ("w2_b", (2, 320)))},
                            {}).adapters["lora_unet_x"]
    assert hook_cost(Target("k", lin, "unet"), loha, None) == 1.0  # the layer's operation once more
    assert hook_cost(Target("k", lin, "unet", rows=slice(0, 320)), lora((16, 320), (320, 16)), None) == math.inf
    assert hook_cost(Target("k", nn.Embedding(4, 320), "unet"), loha, None) == math.inf


ORDER = ("lora", "lyco", "static")


def gated_setup(tiny):
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    nets = {"lora": parse_state_dict("lora", kohya_lora(mm, seed=1, convs=True), {}), "lyco": lycoris_net(mm),
            "static": parse_state_dict("static", kohya_lora(mm, seed=2, only=("attn1_to_q",)), {})}
    mults = {"lora": dict(te=1, unet=0.8, blocks=MIDD), "lyco": dict(te=1, unet=0.7), "static": dict(te=1, unet=0.5)}

    def acts(ranges: dict) -> list[Activation]:
        """The three networks in prompt order; ``ranges`` gives a scheduled one its (start, stop), a
        missing name leaves that network out."""
        return [activation(nets[n], **mults[n], **dict(zip(("start", "stop"), ranges[n] or (None, None))))
                for n in ORDER if n in ranges]
    return mm, acts


def test_merged_while_open_is_bitwise_the_merged_model_at_every_step(tiny):
    """hook_max_cost 0: every scheduled layer is merged while its gate is open.  Weights and output at
    each step equal (bitwise) the model with the open networks plainly merged in the same order."""
    mm, acts = gated_setup(tiny)
    before = snapshot(tiny.unet)
    ref = Patcher(mm)
    refs = {}
    for on in ((), ("lora",), ("lyco",), ("lora", "lyco")):
        ref.apply(acts({n: None for n in (*on, "static")}))
        refs[on] = (snapshot(tiny.unet), unet_out(tiny))
    ref.restore()
    assert same(before, snapshot(tiny.unet))

    p = Patcher(mm)
    p.hook_max_cost = 0
    schedule = {"lora": (None, 3), "lyco": (1, 4), "static": None}
    expected = [("lora",), ("lora", "lyco"), ("lora", "lyco"), ("lyco",), (), ()]
    for generation in range(3):
        rep = p.apply(acts(schedule))
        assert not rep.messages and rep.applied["lyco"] == 4
        assert not p.bypass.terms and not any(m._forward_hooks for m in tiny.unet.modules())
        for step, on in enumerate(expected):
            versions = [t._version for t in tiny.unet.state_dict().values()]
            p.set_step(step)
            w, out = refs[on]
            assert same(w, snapshot(tiny.unet)), (generation, step)
            assert torch.equal(unet_out(tiny), out)
            if step and on == expected[step - 1]:
                assert [t._version for t in tiny.unet.state_dict().values()] == versions, "no flip, no write"
        if generation == 1:
            p.set_step(1)  # the generation ends with gates open: dropping its schedule un-merges them
        p.drop_schedules()
        assert same(refs[()][0], snapshot(tiny.unet))
    p.restore()
    assert same(before, snapshot(tiny.unet)) and not p.active


def test_mixed_policy_hooks_cheap_layers_and_merges_the_others(tiny):
    mm, acts = gated_setup(tiny)
    before = snapshot(tiny.unet)
    ref = Patcher(mm)
    ref.apply(acts({"lora": None, "lyco": None, "static": None}))
    merged_out = unet_out(tiny)
    ref.apply(acts({"static": None}))
    static_w, static_out = snapshot(tiny.unet), unet_out(tiny)
    ref.restore()

    p = Patcher(mm)
    p.hook_max_cost = 0.1  # rank 4: 128-wide layers (cost 1/16) hooked, 32-wide ones (1/4) merged
    rep = p.apply(acts({"lora": (None, 2), "lyco": (None, 2), "static": None}))
    assert not rep.messages
    hooked = {k[1] for k in p.bypass.terms}  # adapter ids
    gated = {id(c[1]) for lst in p._contribs.values() for c, g in lst if g is not None}
    assert hooked and gated and not hooked & gated
    for name in ("lora", "lyco"):
        for key, a in acts({name: None})[0].network.adapters.items():
            t = mm.get(key)
            # the text encoders are always merged, and MIDD zeroes most of lora's UNet blocks
            if not t.is_text_encoder and (name == "lyco" or MIDD.weight(p.block(t))):
                assert (id(a) in hooked, id(a) in gated) == ((True, False) if hook_cost(t, a, None) <= 0.1
                                                             else (False, True)), key
    torch.testing.assert_close(unet_out(tiny), merged_out, rtol=1e-4, atol=1e-5)
    p.set_step(2)
    assert same(static_w, snapshot(tiny.unet)) and torch.equal(unet_out(tiny), static_out)
    p.restore()
    assert same(before, snapshot(tiny.unet)) and not any(m._forward_hooks for m in tiny.unet.modules())


def test_default_policy_keeps_low_rank_wide_layers_hooked():
    assert HOOK_MAX_COST < 0.1  # a rank-16 hook on SD1.5's narrowest (320-wide) layers costs 0.1 of it
    assert 16 * (1280 + 1280) / 1280 ** 2 <= HOOK_MAX_COST < 128 * (1280 + 1280) / 1280 ** 2


def test_a_flip_that_fails_puts_everything_back(tiny, monkeypatch):
    """An interrupt (or OOM) while a gate's layers re-merge restores the whole model and drops the hooks."""
    mm, acts = gated_setup(tiny)
    before = snapshot(tiny.unet)
    p = Patcher(mm)
    p.hook_max_cost = 0.1
    p.apply(acts({"lora": (2, None), "lyco": None, "static": None}))
    assert p.bypass.terms
    adapter = next(c[1] for lst in p._contribs.values() for c, g in lst if g is not None)  # merged at the flip

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter, "add_delta_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        p.set_step(2)
    assert same(before, snapshot(tiny.unet))
    assert not p.active and not any(m._forward_hooks for m in tiny.unet.modules())


def test_scheduled_network_that_would_overflow_while_closed_is_left_out():
    """A gate closed at activation (start=) is checked then, with every contribution merged, so no flip
    during sampling can make a weight non-finite."""
    tiny = build_sd1(seed=0)
    for m in (tiny.unet, *(te for _, te in tiny.text_encoders)):
        m.half()
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    a = parse_state_dict("a", kohya_lora(mm, rank=4, seed=1), {})
    b = parse_state_dict("b", kohya_lora(mm, rank=4, seed=2, scale=3.0), {})
    before = snapshot(tiny.unet)
    p = Patcher(mm)
    p.hook_max_cost = 0
    rep = p.apply([activation(a, 0, 0.5, start=3), activation(b, 0, 1e6, start=2)])
    assert rep.skipped == ["b"] and any(m.startswith("b: merging it would") for m in rep.messages)
    assert same(before, snapshot(tiny.unet))  # both gates closed: nothing merged yet
    p.set_step(3)
    assert not same(before, snapshot(tiny.unet))
    assert all(torch.isfinite(t).all() for t in tiny.unet.state_dict().values())
    p.restore()
    assert same(before, snapshot(tiny.unet))


def test_a_fused_qkv_third_follows_its_range_by_merging(tmp_path):
    """No hook fits a row third of SD3's fused qkv: even with hooks preferred it is merged while open."""
    from lib_lora.fileio import save_safetensors
    from lib_lora.network import load_network
    from sd3_standin import SD3Inferencer, text_encoder_roots

    m = SD3Inferencer(seed=0)
    mm = ModelMap.build("sd3", m.model.diffusion_model, text_encoder_roots(m))
    g = torch.Generator().manual_seed(3)
    sd = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(4, 128, generator=g),
          "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(128, 4, generator=g)}
    net = load_network(save_safetensors(sd, tmp_path / "k.safetensors"))
    w = mm.get("lora_unet_joint_blocks_0_x_block_attn_qkv").module.weight
    w0 = w.detach().clone()
    p = Patcher(mm)
    p.hook_max_cost = math.inf
    rep = p.apply([activation(net, 1.0, 0.5, stop=2)])
    assert not rep.messages and rep.applied == {"k": 1} and not p.bypass.terms
    delta = torch.zeros_like(w0)
    delta[128:256] = 0.5 * sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] @ \
        sd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    torch.testing.assert_close(w - w0, delta, rtol=1e-5, atol=1e-5)
    p.set_step(2)
    assert torch.equal(w, w0)
    p.restore()
