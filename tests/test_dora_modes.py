"""The two DoRA strategies through the patcher: LyCORIS's (default) and the built-in Lora's.

Default: lycoris-lora's own LoCon module with weight_decompose (its forward's weight delta).
"webui": WebUI 1.10.1's built-in (extensions-builtin/Lora/network.py) transcribed here
independently: updown = up @ down * alpha / rank; merged = W + updown; each *input* channel's
norm of merged; final change = (merged * dora_scale / norm - W) * multiplier.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("lycoris")
from lycoris.modules.locon import LoConModule  # noqa: E402

from lib_lora.adapters import dora  # noqa: E402
from lib_lora.modelmap import ModelMap  # noqa: E402
from lib_lora.network import parse_state_dict  # noqa: E402
from lib_lora.patcher import Patcher  # noqa: E402
from loras import activation, deltas, same, snapshot  # noqa: E402
from test_adapters_lycoris import assert_close, forward_delta, randomise, saved  # noqa: E402
from tiny_models import build_hf_clip  # noqa: E402

KEY = "lora_te_text_model_encoder_layers_1_mlp_fc1"  # [4*width, width]: not square, orientations differ


def builtin_webui_dora(w, sd, multiplier):
    up, down = sd["lora_up.weight"].float(), sd["lora_down.weight"].float()
    rank = down.shape[0]
    updown = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (float(sd["alpha"]) / rank)
    merged = w + updown
    dims = [d for d in range(w.dim()) if d != 1]
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)  # one value per input channel
    return (merged * (sd["dora_scale"] / norm) - w) * multiplier


@pytest.fixture
def te_model():
    te = build_hf_clip()
    return te, ModelMap.build("sd1", None, [("te", te)])


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_modes_through_the_patcher(te_model, wd_on_out):
    te, mm = te_model
    layer = mm.get(KEY).module
    w0 = layer.weight.detach().clone()
    module = LoConModule(KEY, layer, 1.0, lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=wd_on_out)
    randomise(module, seed=21)
    sd = saved(module)
    assert sd["dora_scale"].shape == ((w0.shape[0], 1) if wd_on_out else (1, w0.shape[1]))
    lycoris_ref = {m: forward_delta(module, layer, m)[0] for m in (1.0, 0.6)}
    net = parse_state_dict("dora", {f"{KEY}.{k}": v for k, v in sd.items()}, {})
    before = snapshot(te)
    p = Patcher(mm)
    assert p.dora_mode == dora.DEFAULT == "lycoris"
    for m in (1.0, 0.6):
        for mode in ("lycoris", "webui", "lycoris"):  # switching re-merges the DoRA layer each time
            p.dora_mode = mode
            assert not p.apply([activation(net, m)]).messages
            ref = lycoris_ref[m] if mode == "lycoris" else builtin_webui_dora(w0, sd, m)
            assert_close(layer.weight.detach() - w0, ref)
    p.restore()
    assert same(before, snapshot(te))


def test_webui_mode_differs_from_lycoris_where_the_definitions_do(te_model):
    """Guards against two names for one formula: away from weight 1 and for [out, 1] magnitudes they disagree."""
    _, mm = te_model
    layer = mm.get(KEY).module
    w = layer.weight.detach().clone()
    module = LoConModule(KEY, layer, 1.0, lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False)
    randomise(module, seed=22)
    adapter = parse_state_dict("d", {f"{KEY}.{k}": v for k, v in saved(module).items()}, {}).adapters[KEY]
    at = lambda mode, m: deltas(adapter, w, None, m, dora=dora.strategy(mode))[0]  # noqa: E731
    torch.testing.assert_close(at("webui", 1.0), at("lycoris", 1.0), rtol=1e-4, atol=1e-5)  # same at 1, per input
    assert (at("webui", 0.5) - at("lycoris", 0.5)).abs().max() > 1e-3


def test_webui_mode_refuses_what_the_builtin_cannot_broadcast():
    from lib_lora.adapters import AdapterError, make_adapter
    with pytest.raises(AdapterError):  # refused when the file is read, at the latest when it is merged
        a = make_adapter("x", {"lora_down.weight": torch.randn(2, 16), "lora_up.weight": torch.randn(12, 2),
                               "dora_scale": torch.rand(5, 1)})
        deltas(a, torch.randn(12, 16), None, 1.0, dora=dora.strategy("webui"))
    with pytest.raises(ValueError, match="unknown DoRA mode"):
        dora.strategy("kohya")


def test_conv_shaped_magnitude_on_a_linear_layer_never_broadcasts():
    """[out, 1, 1, 1] (a 1x1-conv file) on a Linear weight: the same change as [out, 1], never a
    [out, 1, out, in] tensor; the built-in's broadcasting cannot place it, so that mode refuses it."""
    from lib_lora.adapters import AdapterError, make_adapter
    g = torch.Generator().manual_seed(3)
    down, up, w = torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), torch.randn(12, 16, generator=g)
    mag = torch.rand(12, 1, generator=g) + 0.5
    flat = make_adapter("x", {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": mag})
    conv = make_adapter("x", {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": mag.reshape(12, 1, 1, 1)})
    want, _ = deltas(flat, w, None, 0.7)
    got, _ = deltas(conv, w, None, 0.7)
    assert got.shape == w.shape
    torch.testing.assert_close(got, want)
    with pytest.raises(AdapterError, match="broadcast"):
        deltas(conv, w, None, 0.7, dora=dora.strategy("webui"))
