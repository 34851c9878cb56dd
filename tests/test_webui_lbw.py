"""LoRA Block Weight prompts inside the stand-in WebUI: unknown arguments, lbw= with LBW's presets file,
and start/stop schedules driven by the WebUI's cfg_denoiser callback."""
from __future__ import annotations

import pytest
import torch

from webui_glue_support import TE_KEY, UNET_KEY, lora_delta, make_lora  # first: it puts the stand-in WebUI on sys.path

from modules import extra_networks, paths, script_callbacks, shared  # noqa: E402

from lib_lora.hosts import webui_settings as settings  # noqa: E402

IN01_KEY = UNET_KEY                      # down_blocks_0_attentions_0 = input_blocks_1_1
OUT11_KEY = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def running(webui, model, sd1_map, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "extensions_dir", str(tmp_path / "extensions"))
    path = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    return webui, path


def test_unknown_arguments_warn_and_the_lora_still_applies(running, sd1_map, capsys):
    webui, path = running
    w0 = sd1_map.get(TE_KEY).module.weight.detach().clone()
    p = webui.generate("x <lora:tiny:0.5:foo=3:lbwe=ATTNON>")
    torch.testing.assert_close(sd1_map.get(TE_KEY).module.weight, w0 + 0.5 * lora_delta(path, TE_KEY), rtol=0, atol=1e-6)
    assert "tiny: unknown argument foo=3 ignored" in p.comments
    assert ("tiny: lbwe=ATTNON: 'ATTNON' is not an element-weight preset — applied without element weights"
            in p.comments)
    assert "unknown argument foo=3" in capsys.readouterr().out
    assert p.extra_generation_params["Lora hashes"].startswith("tiny: ")


def test_lbw_presets_come_from_lbws_file(running, sd1_map, tmp_path):
    webui, path = running
    te, in01, out11 = (sd1_map.get(k).module for k in (TE_KEY, IN01_KEY, OUT11_KEY))
    w0 = [m.weight.detach().clone() for m in (te, in01, out11)]

    def deltas():
        return [(m.weight - w).abs().max().item() for m, w in zip((te, in01, out11), w0)]

    webui.generate("x <lora:tiny:1:lbw=OUTS>")   # default OUTS: BASE and OUT07-OUT11
    assert deltas()[0] > 0 and deltas()[1] == 0 and deltas()[2] > 0

    presets = tmp_path / "extensions" / settings.LBW_FOLDER / "scripts" / "lbwpresets.txt"
    presets.parent.mkdir(parents=True)
    presets.write_text("ONLYIN01:0,0.5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n", encoding="utf-8")
    webui.generate("x <lora:tiny:0.8:lbw=ONLYIN01>")
    torch.testing.assert_close(in01.weight, w0[1] + 0.4 * lora_delta(path, IN01_KEY), rtol=0, atol=1e-6)
    assert deltas()[0] == 0 and deltas()[2] == 0

    custom = tmp_path / "mine.txt"
    custom.write_text("ONLYIN01:0,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n", encoding="utf-8")
    shared.opts.data[settings.OPT_LBW_PRESETS] = str(custom)
    webui.generate("x <lora:tiny:0.8:lbw=ONLYIN01>")
    torch.testing.assert_close(in01.weight, w0[1] + 0.8 * lora_delta(path, IN01_KEY), rtol=0, atol=1e-6)

    p = webui.generate("x <lora:tiny:0.8:lbw=MISSING>")
    assert any("'MISSING' is not a block-weight preset" in c for c in p.comments)
    torch.testing.assert_close(te.weight, w0[0] + 0.8 * lora_delta(path, TE_KEY), rtol=0, atol=1e-6)


def test_lbwe_presets_come_from_lbws_file(running, sd1_map, tmp_path):
    webui, path = running
    te, in01, out11 = (sd1_map.get(k).module for k in (TE_KEY, IN01_KEY, OUT11_KEY))
    w0 = [m.weight.detach().clone() for m in (te, in01, out11)]
    presets = tmp_path / "extensions" / settings.LBW_FOLDER / "scripts" / "elempresets.txt"
    presets.parent.mkdir(parents=True)
    # IN01's to_k at 0.25, every other attention layer of the UNet off, the text encoder untouched
    presets.write_text("KONLY:NOT BASE:attn:0\nIN01:to_k:0.25\n\nOTHER:::0\n", encoding="utf-8")
    p = webui.generate("x <lora:tiny:0.8:lbwe=KONLY>")
    assert not [c for c in p.comments if "tiny" in c]
    torch.testing.assert_close(te.weight, w0[0] + 0.8 * lora_delta(path, TE_KEY), rtol=0, atol=1e-6)
    torch.testing.assert_close(in01.weight, w0[1] + 0.2 * lora_delta(path, IN01_KEY), rtol=0, atol=1e-6)
    assert torch.equal(out11.weight, w0[2])
    webui.generate("x <lora:tiny:0.8:lbw=OUTS:lbwe=ATTNDEEPON>")  # not in the file: LBW's default stays
    torch.testing.assert_close(out11.weight, w0[2] + 0.8 * lora_delta(path, OUT11_KEY), rtol=0, atol=1e-6)
    assert torch.equal(in01.weight, w0[1])  # OUTS leaves IN01 out

    custom = tmp_path / "mine.txt"
    custom.write_text("KONLY:::0.5", encoding="utf-8")
    shared.opts.data[settings.OPT_LBW_ELEMENT_PRESETS] = str(custom)
    webui.generate("x <lora:tiny:0.8:lbwe=KONLY>")
    torch.testing.assert_close(in01.weight, w0[1] + 0.4 * lora_delta(path, IN01_KEY), rtol=0, atol=1e-6)


def denoise(sampling_step: int) -> None:
    """What CFGDenoiser.forward does before each UNet evaluation."""
    script_callbacks.cfg_denoiser_callback(script_callbacks.CFGDenoiserParams(
        None, None, None, sampling_step, 20, None, None))


def test_start_stop_follow_the_denoiser_like_lbw(running, sd1_map):
    webui, path = running
    to_k, q_proj = sd1_map.get(UNET_KEY).module, sd1_map.get(TE_KEY).module
    w0, te0 = to_k.weight.detach().clone(), q_proj.weight.detach().clone()
    x = torch.randn(3, to_k.in_features)
    plain = to_k(x)
    with_lora = x @ (w0 + 0.5 * lora_delta(path, UNET_KEY)).T

    def lora_on() -> bool:
        out = to_k(x)
        if torch.equal(out, plain):
            return False
        torch.testing.assert_close(out, with_lora, rtol=1e-5, atol=1e-6)
        return True

    p = webui.generate("x <lora:tiny:0.5:stop=3>")
    # a rank-4 branch costs a quarter of this 32-wide layer: merged while its gate is open, not hooked
    torch.testing.assert_close(to_k.weight, w0 + 0.5 * lora_delta(path, UNET_KEY), rtol=0, atol=1e-6)
    torch.testing.assert_close(q_proj.weight, te0 + 0.5 * lora_delta(path, TE_KEY), rtol=0, atol=1e-6)
    seen = []
    for s in (0, 0, 1, 2, 3):          # shared.state.sampling_step during steps 1..5 (k-diffusion)
        denoise(s)
        seen.append(lora_on())
    assert seen == [True, True, True, False, False]   # LBW: off once sampling_step > stop - 2
    assert torch.equal(to_k.weight, w0) and not to_k._forward_hooks, "a closed gate restores the layer bitwise"

    # hires pass: LBW's ranges are spent, the LoRA is merged at its weight (the default)
    webui.generate("x <lora:tiny:0.5:stop=3>", hr=True, p=p)
    torch.testing.assert_close(to_k.weight, w0 + 0.5 * lora_delta(path, UNET_KEY), rtol=0, atol=1e-6)
    assert not to_k._forward_hooks

    p = webui.generate("x <lora:tiny:0.5:start=2>")
    seen = []
    for s in (0, 0, 1, 2):
        denoise(s)
        seen.append(lora_on())
    assert seen == [False, False, True, True]
    extra_networks.deactivate(p, p.extra_network_data)
    assert not to_k._forward_hooks and torch.equal(to_k.weight, w0)

    shared.opts.data[settings.OPT_SCHEDULE_HIRES] = True
    p = webui.generate("x <lora:tiny:0.5:step=2-3>", hr=True)
    seen = []
    for s in (0, 0, 1, 2):
        denoise(s)
        seen.append(lora_on())
    assert seen == [False, False, True, False]
    webui.workshop.restore()
    assert not to_k._forward_hooks


def test_an_aborted_generation_leaves_no_scheduled_lora_behind(running, sd1_map):
    """The WebUI skips deactivate when a generation raises; the next one's process() drops what the
    aborted one left (its gated merges and hooks), before anything is activated."""
    webui, path = running
    to_k = sd1_map.get(UNET_KEY).module
    w0 = to_k.weight.detach().clone()
    webui.generate("x <lora:tiny:0.5:start=1>")  # rank 4 on a 32-wide layer: merged while open
    denoise(0)
    denoise(0)
    torch.testing.assert_close(to_k.weight, w0 + 0.5 * lora_delta(path, UNET_KEY), rtol=0, atol=1e-6)
    webui.workshop.before_generation()   # what the next generation's process() does first
    assert torch.equal(to_k.weight, w0)
    webui.workshop.runtime.patcher.hook_max_cost = float("inf")  # hooks
    webui.generate("x <lora:tiny:0.5:start=1>")
    denoise(0)
    denoise(0)
    assert to_k._forward_hooks and torch.equal(to_k.weight, w0)
    p = webui.generate("x")              # the next generation, without a LoRA: nothing of it remains
    assert not to_k._forward_hooks and torch.equal(to_k.weight, w0)
    assert not webui.workshop.runtime.patcher.active and "Lora hashes" not in p.extra_generation_params


def test_hosts_without_step_reports_apply_scheduled_loras_throughout(running, sd1_map):
    from lib_lora.library import Library
    from lib_lora.params import parse_prompt
    from lib_lora.runtime import Runtime

    webui, path = running
    rt = Runtime(Library([webui.lora_dir]))
    rt.set_model(sd1_map)
    _, reqs = parse_prompt("<lora:tiny:1:stop=2>")
    res = rt.activate(reqs)
    assert res.messages == ["tiny: start=/stop= need a host that reports sampling steps (the WebUI does) "
                            "— applied at every step"]
    assert not sd1_map.get(UNET_KEY).module._forward_hooks and not rt.set_step(5)
    rt.restore()


def test_warns_when_lbw_runs_without_the_builtin(running, monkeypatch, capsys):
    from modules import extensions

    webui, _ = running
    webui.generate("x <lora:tiny:1>")
    assert "LoRA Block Weight is enabled" not in capsys.readouterr().out
    monkeypatch.setattr(extensions, "extensions", [*extensions.extensions,
                                                   extensions.Extension("sd-webui-lora-block-weight", "/x")])
    webui.generate("x <lora:tiny:1>")
    assert "LoRA Block Weight is enabled while the built-in Lora extension is not" in capsys.readouterr().out


def test_lbws_panel_switched_off_leaves_plain_weights(running, sd1_map):
    """LoRA Block Weight installed with its panel switched off (its second script argument False): it applies
    no lbw=/start=, and neither does the built-in, so neither do we; switched on (or absent), they apply."""
    import types

    webui, path = running
    in01 = sd1_map.get(IN01_KEY).module
    w0 = in01.weight.detach().clone()
    lbw = types.SimpleNamespace(filename="/x/extensions/sd-webui-lora-block-weight/scripts/lora_block_weight.py",
                                args_from=3, args_to=6)
    other = types.SimpleNamespace(filename="/x/scripts/other.py", args_from=0, args_to=3)

    def generate(useblocks):
        from modules import processing
        p = processing.StableDiffusionProcessingTxt2Img(prompt="x")
        p.scripts = types.SimpleNamespace(alwayson_scripts=[other, lbw])
        p.script_args = (None, False, None, "presets", useblocks, None)
        return webui.generate("x <lora:tiny:1:lbw=OUTS:start=2>", p=p)

    p = generate(False)
    torch.testing.assert_close(in01.weight, w0 + lora_delta(path, IN01_KEY), rtol=0, atol=1e-6)  # IN01 at 1
    assert any("LoRA Block Weight is switched off" in c for c in p.comments)
    p = generate(True)
    assert torch.equal(in01.weight, w0)      # OUTS: IN01 at 0 (and start=2 holds the UNet back anyway)
    assert not any("switched off" in c for c in p.comments)
