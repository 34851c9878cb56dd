"""start=/stop=: scheduled LoRAs ride on forward hooks; their output equals the merged model's, a closed
gate is bitwise the model without them, steps never touch a weight, and restore leaves no hook behind."""
from __future__ import annotations

import pytest
import torch

from lib_lora.blockweights import parse_block_weights
from lib_lora.bypass import Gate
from lib_lora.modelmap import ModelMap
from lib_lora.network import parse_state_dict
from lib_lora.patcher import Activation, Patcher
from loras import kohya_lora, same, snapshot
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

    p.apply([Activation(lora, 1, 0.8, blocks=MIDD), Activation(lyco, 1, 0.7), Activation(also, 1, 0.5)])
    merged_out = unet_out(tiny)
    p.restore()

    rep = p.apply([Activation(lora, 1, 0.8, blocks=MIDD, stop=5), Activation(lyco, 1, 0.7, start=0, stop=5),
                   Activation(also, 1, 0.5)])
    assert not rep.messages and rep.applied["lyco"] == 4
    assert {type(t).__name__ for t in p.bypass.terms.values()} == {"LowRank", "DeltaOutput"}
    torch.testing.assert_close(unet_out(tiny), merged_out, rtol=1e-4, atol=1e-5)

    also_only = Patcher(mm)  # reference for the closed gates: just the static network
    p.set_step(5)
    gated_out = unet_out(tiny)
    p.restore()
    also_only.apply([Activation(also, 1, 0.5)])
    assert torch.equal(gated_out, unet_out(tiny))
    also_only.restore()

    p.apply([Activation(lora, 1, 0.8, blocks=MIDD, start=2)])
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
    p.apply([Activation(net, 0.6, 1.0, stop=3)])
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
