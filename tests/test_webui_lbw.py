"""LoRA Block Weight prompts inside the stand-in WebUI: unknown arguments, lbw= with LBW's presets file,
and start/stop schedules driven by the WebUI's cfg_denoiser callback."""
from __future__ import annotations

import pytest
import torch

from test_webui_glue import (TE_KEY, UNET_KEY, lora_delta, make_lora, model, sd1, sd1_map,  # noqa: F401
                             webui)  # first: it puts the stand-in WebUI on sys.path

from modules import paths, script_callbacks, shared  # noqa: E402

from lib_lora.hosts import webui as host  # noqa: E402

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
    assert "tiny: LBW per-element weights (lbwe=) are not supported — ignored" in p.comments
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

    presets = tmp_path / "extensions" / host.LBW_FOLDER / "scripts" / "lbwpresets.txt"
    presets.parent.mkdir(parents=True)
    presets.write_text("ONLYIN01:0,0.5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n", encoding="utf-8")
    webui.generate("x <lora:tiny:0.8:lbw=ONLYIN01>")
    torch.testing.assert_close(in01.weight, w0[1] + 0.4 * lora_delta(path, IN01_KEY), rtol=0, atol=1e-6)
    assert deltas()[0] == 0 and deltas()[2] == 0

    custom = tmp_path / "mine.txt"
    custom.write_text("ONLYIN01:0,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n", encoding="utf-8")
    shared.opts.data[host.OPT_LBW_PRESETS] = str(custom)
    webui.generate("x <lora:tiny:0.8:lbw=ONLYIN01>")
    torch.testing.assert_close(in01.weight, w0[1] + 0.8 * lora_delta(path, IN01_KEY), rtol=0, atol=1e-6)

    p = webui.generate("x <lora:tiny:0.8:lbw=MISSING>")
    assert any("'MISSING' is not a block-weight preset" in c for c in p.comments)
    torch.testing.assert_close(te.weight, w0[0] + 0.8 * lora_delta(path, TE_KEY), rtol=0, atol=1e-6)
