"""SD3 in the stand-in WebUI: the built-in Lora takes the generations we cannot patch, never both at once."""
from __future__ import annotations

import torch
from torch import nn

from test_webui_glue import (TE_KEY, BuiltinLora, FakeSdModel, lora_delta, make_lora, model, sd1,  # noqa: F401
                             sd1_map, webui)

from modules import extra_networks, script_callbacks, shared  # noqa: E402

NEEDS = "SD3 LoRAs need the WebUI's built-in Lora extension"


def fake_sd3():
    """Only the WebUI's flag and a layer for the built-in to patch (hosts it cannot map natively)."""
    torch.manual_seed(3)
    return FakeSdModel(nn.Sequential(nn.Linear(4, 4)), is_sd3=True)


def started(webui, with_builtin=True):
    builtin = BuiltinLora(webui) if with_builtin else None
    if builtin:
        builtin.load()
    webui.load_script()
    webui.start_ui()
    return builtin


def test_sd3_generation_goes_to_builtin_then_sd1_is_ours_again(webui, model, sd1_map):
    path = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    builtin = started(webui)
    te = sd1_map.get(TE_KEY).module
    w0 = te.weight.detach().clone()
    webui.generate("<lora:tiny:1>")
    assert builtin.activations == [] and not torch.equal(te.weight, w0)

    sd3 = fake_sd3()
    layer = sd3.model.diffusion_model[0]
    sd3_w0 = layer.weight.detach().clone()
    shared.sd_model = sd3  # no model_loaded callback: the activation itself must put ours back
    p = webui.generate("<lora:tiny:0.7:unet=0.2> <lyco:other:te=0.5>")
    assert builtin.activations == [p.extra_network_data["lora"] + p.extra_network_data["lyco"]]
    assert builtin.activations[0][0].items == ["tiny", "0.7", "unet=0.2"]
    assert torch.equal(te.weight, w0), "our merge came out of the SD1 model before the built-in's went in"
    assert not any(NEEDS in c or "not supported" in c for c in p.comments)
    builtin.forward(sd3)
    assert torch.equal(layer.weight, sd3_w0 + 2)
    extra_networks.deactivate(p, p.extra_network_data)
    assert builtin.deactivations == 1, "its own end-of-generation report"

    shared.sd_model = model
    script_callbacks.model_loaded_callback(model)
    p = webui.generate("<lora:tiny:1>")
    assert builtin.networks.loaded_networks == [] and builtin.loads[-1] == []
    assert torch.equal(layer.weight, sd3_w0), "the built-in's layers are restored now, not at their next forward"
    torch.testing.assert_close(te.weight, w0 + lora_delta(path, TE_KEY), rtol=0, atol=1e-6)
    assert len(builtin.activations) == 1
    extra_networks.deactivate(p, p.extra_network_data)
    assert builtin.deactivations == 1


def test_prompt_without_loras_after_sd3_clears_builtin(webui, model, sd1_map):
    builtin = started(webui)
    sd3 = fake_sd3()
    layer = sd3.model.diffusion_model[0]
    sd3_w0 = layer.weight.detach().clone()
    shared.sd_model = sd3
    webui.generate("<lora:a:1>")
    builtin.forward(sd3)
    assert builtin.networks.loaded_networks

    webui.generate("a cat")  # still SD3: the built-in's own activate with no tokens unloads them
    assert builtin.activations[-1] == [] and builtin.networks.loaded_networks == []
    builtin.forward(sd3)
    assert torch.equal(layer.weight, sd3_w0)

    webui.generate("<lora:a:1>")
    shared.sd_model = model
    webui.generate("a dog")  # SD1 without LoRAs: cleared too, and nothing of ours is merged
    assert builtin.networks.loaded_networks == [] and torch.equal(layer.weight, sd3_w0)


def test_sd3_without_builtin_skips_with_one_message(webui, model, sd1_map, capsys):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    started(webui, with_builtin=False)
    shared.sd_model = fake_sd3()
    p = webui.generate("<lora:tiny:1> <lora:b:1>")
    assert [c for c in p.comments if "LoRA" in c or "Lora" in c] == [
        "SD3 LoRAs need the WebUI's built-in Lora extension (Extensions tab: enable \"Lora\"), "
        "LoRA Workshop cannot apply these to SD3 — skipped: tiny, b"]
    assert NEEDS in capsys.readouterr().out
    assert not webui.generate("a cat").comments


def test_disabled_builtin_counts_as_absent(webui, model, sd1_map):
    builtin = started(webui)
    builtin.extension.enabled = False
    shared.sd_model = fake_sd3()
    p = webui.generate("<lora:tiny:1>")
    assert builtin.activations == [] and any(NEEDS in c for c in p.comments)
