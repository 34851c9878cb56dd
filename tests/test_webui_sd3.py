"""SD3 in the stand-in WebUI: ours where we can map the files, else the built-in Lora, never both at once."""
from __future__ import annotations

import torch
from torch import nn

from sd3_standin import SD3Inferencer, text_encoder_roots
from webui_glue_support import SD1_META, TE_KEY, BuiltinLora, FakeSdModel, lora_delta, make_lora  # noqa: E402

from lib_lora.hashes import addnet_hash_safetensors
from lib_lora.modelmap import ModelMap
from modules import extra_networks, script_callbacks, shared  # noqa: E402

NEEDS = "SD3 LoRAs need the WebUI's built-in Lora extension"


def fake_sd3():
    """The WebUI's flag and one layer for the built-in to patch; our SD1 files do not fit it."""
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
    unmapped = FakeSdModel(None, is_sd3=True)  # nothing where we look: every SD3 activation is the built-in's
    unmapped.layer = nn.Linear(4, 4)
    shared.sd_model = unmapped
    webui.generate("<lora:a:1>")
    assert builtin.networks.loaded_networks
    webui.generate("a cat")  # the built-in's own activate with no tokens unloads them
    assert builtin.activations[-1] == [] and builtin.networks.loaded_networks == []

    sd3 = fake_sd3()
    layer = sd3.model.diffusion_model[0]
    sd3_w0 = layer.weight.detach().clone()
    shared.sd_model = sd3
    webui.generate("<lora:a:1>")  # a file we cannot find: the built-in may know it
    assert builtin.activations[-1][0].items == ["a", "1"]
    builtin.forward(sd3)
    assert torch.equal(layer.weight, sd3_w0 + 1)
    webui.generate("a cat")  # ours (nothing to map), so the built-in is unloaded and its layers restored now
    assert builtin.networks.loaded_networks == [] and torch.equal(layer.weight, sd3_w0)

    webui.generate("<lora:a:1>")
    builtin.forward(sd3)
    shared.sd_model = model
    webui.generate("a dog")  # SD1 without LoRAs: cleared too, and nothing of ours is merged
    assert builtin.networks.loaded_networks == [] and torch.equal(layer.weight, sd3_w0)


def test_sd3_without_builtin_skips_with_one_message(webui, model, sd1_map, capsys):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    started(webui, with_builtin=False)
    shared.sd_model = FakeSdModel(None, is_sd3=True)  # no MMDiT or encoders where the WebUI keeps them
    p = webui.generate("<lora:tiny:1> <lora:b:1>")
    assert [c for c in p.comments if "LoRA" in c or "Lora" in c] == [
        "SD3 LoRAs need the WebUI's built-in Lora extension (Extensions tab: enable \"Lora\"), "
        "LoRA Workshop cannot apply these to SD3 — skipped: tiny, b"]
    assert NEEDS in capsys.readouterr().out
    assert not webui.generate("a cat").comments


def test_disabled_builtin_counts_as_absent(webui, model, sd1_map):
    builtin = started(webui)
    builtin.extension.enabled = False
    shared.sd_model = FakeSdModel(None, is_sd3=True)
    p = webui.generate("<lora:tiny:1>")
    assert builtin.activations == [] and any(NEEDS in c for c in p.comments)


# -- native SD3 ------------------------------------------------------------------------------------

SD3_QKV = "lora_unet_joint_blocks_0_x_block_attn_qkv"
SD3_TE3 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"


def sd3_setup(webui):
    model = SD3Inferencer(seed=2)
    mm = ModelMap.build("sd3", model.model.diffusion_model, text_encoder_roots(model))
    path = make_lora(webui.lora_dir / "sd3_style.safetensors", mm, only=("joint_blocks_0_", "lora_te3_", "lora_te1_"),
                     metadata={"ss_base_model_version": "sd3"})
    return model, mm, path


def test_native_sd3_is_ours_even_with_builtin_and_builtin_only_for_files_we_cannot_map(webui, model, sd1_map):
    make_lora(webui.lora_dir / "sd1_style.safetensors", sd1_map, metadata=SD1_META)
    sd3, mm, path = sd3_setup(webui)
    builtin = started(webui)
    qkv, te3 = mm.get(SD3_QKV).module, mm.get(SD3_TE3).module
    w0, t0 = qkv.weight.detach().clone(), te3.weight.detach().clone()
    shared.sd_model = sd3
    script_callbacks.model_loaded_callback(sd3)

    p = webui.generate("<lora:sd3_style:0.5:2>")
    assert builtin.activations == [] and not p.comments
    torch.testing.assert_close(qkv.weight, w0 + 2 * lora_delta(path, SD3_QKV), rtol=0, atol=1e-5)
    torch.testing.assert_close(te3.weight, t0 + 0.5 * lora_delta(path, SD3_TE3), rtol=0, atol=1e-5)
    assert p.extra_generation_params["Lora hashes"] == f"sd3_style: {addnet_hash_safetensors(path)[:12]}"

    p = webui.generate("<lora:sd3_style:1> <lora:sd1_style:1>")  # one file we cannot put on SD3: all to the built-in
    assert [[x.items for x in call] for call in builtin.activations] == [[["sd3_style", "1"], ["sd1_style", "1"]]]
    assert torch.equal(qkv.weight, w0) and torch.equal(te3.weight, t0), "ours came out first"

    webui.generate("<lora:sd3_style:1>")
    assert builtin.networks.loaded_networks == [] and len(builtin.activations) == 1
    torch.testing.assert_close(qkv.weight, w0 + lora_delta(path, SD3_QKV), rtol=0, atol=1e-5)
    webui.generate("a cat")
    assert torch.equal(qkv.weight, w0)


def test_native_sd3_without_builtin_applies_what_fits_and_names_the_rest(webui, model, sd1_map):
    make_lora(webui.lora_dir / "sd1_style.safetensors", sd1_map, metadata=SD1_META)
    sd3, mm, path = sd3_setup(webui)
    started(webui, with_builtin=False)
    shared.sd_model = sd3
    qkv = mm.get(SD3_QKV).module
    w0 = qkv.weight.detach().clone()
    p = webui.generate("<lora:sd3_style:1> <lora:sd1_style:1>")
    torch.testing.assert_close(qkv.weight, w0 + lora_delta(path, SD3_QKV), rtol=0, atol=1e-5)
    assert list(p.comments) == ["sd1_style is an SD1 LoRA, the loaded model is SD3 — skipped"]
