"""Lora cards of files that name no model family, in the stand-in WebUI: the badge says whether the
file's layers fit the loaded model.  The reference for "fits" is the patcher itself: such a file
applies to every one of its layers without a message, and one that "does not fit" gets one."""
from __future__ import annotations

import os

import torch

from webui_glue_support import SD1_META, make_lora  # first: it puts the stand-in WebUI on sys.path

from lib_lora import fit as fit_module  # noqa: E402
from lib_lora import library as library_module  # noqa: E402
from lib_lora.fileio import save_safetensors  # noqa: E402
from lib_lora.network import load_network  # noqa: E402
from lib_lora.patcher import Patcher  # noqa: E402
from loras import activation  # noqa: E402

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def lora_module(key: str, out_f: int, in_f: int, rank: int = 2) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": torch.randn(rank, in_f) * 0.1, f"{key}.lora_up.weight": torch.randn(out_f, rank) * 0.1}


def files(webui, sd1_map):
    d = webui.lora_dir
    make_lora(d / "fits.safetensors", sd1_map, only=("attn1",))                 # no metadata, tiny SD1 widths
    make_lora(d / "labelled.safetensors", sd1_map, metadata=SD1_META, only=("attn1",))
    w = sd1_map.get(Q).module.weight
    save_safetensors({**lora_module(Q, w.shape[0], w.shape[1]),               # fits
                      **lora_module(K, w.shape[0], w.shape[1] + 16),          # one input width too many
                      **lora_module("lora_unet_no_such_layer", 8, 8)}, d / "misfit.safetensors")
    te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"                      # only SDXL has a te2
    save_safetensors(lora_module(te2, 8, 8), d / "xl_keys.safetensors")
    return d


def cards(webui) -> dict[str, dict[str, str]]:
    page = webui.workshop.page
    page.create_html("txt2img")
    return {name: item["sort_keys"] for name, item in page.items.items()}


def test_cards_of_files_without_family_say_whether_they_fit(webui, model, sd1_map):
    d = files(webui, sd1_map)
    webui.load_script()
    webui.start_ui()
    before = cards(webui)  # no model loaded yet: nothing to fit
    assert before["fits"]["lwfamily"] == "unknown" and before["fits"]["lwcompat"] == "yes"
    assert "lwfit" not in before["fits"]

    webui.workshop.model_loaded(model)
    keys = cards(webui)
    n = sum(1 for t in sd1_map.targets if "attn1" in t.key and t.weight().dim() == 2)
    assert keys["fits"]["lwfamily"] == "fits loaded model" and keys["fits"]["lwcompat"] == "yes"
    assert keys["fits"]["lwfit"] == f"{n} layers, all in the loaded model"
    assert keys["misfit"]["lwfamily"] == "does not fit" and keys["misfit"]["lwcompat"] == "no"
    assert keys["misfit"]["lwfit"].startswith("1 of 3 layers fit: ")
    assert keys["labelled"] == {**keys["labelled"], "lwfamily": "SD1", "lwcompat": "yes"}
    assert "lwfit" not in keys["labelled"]
    assert keys["xl_keys"]["lwfamily"] == "SDXL" and keys["xl_keys"]["lwcompat"] == "no"  # the keys tell
    assert webui.workshop.page.items["xl_keys"]["sd_version"] == "SDXL"

    # the verdicts agree with what applying the files does
    p = Patcher(sd1_map)
    rep = p.apply([activation(load_network(d / "fits.safetensors"))])
    assert not rep.messages and rep.applied == {"fits": n}
    rep = p.apply([activation(load_network(d / "misfit.safetensors"))])
    assert rep.applied == {"misfit": 1} and len(rep.messages) == 2
    p.restore()


def test_cards_read_no_file_and_keep_their_verdicts(webui, model, sd1_map, monkeypatch):
    """The scan reads each header once per file version; the card pages read no file, and a new model
    map only costs new verdicts."""
    d = files(webui, sd1_map)
    reads: list[str] = []
    real = library_module.read_header
    monkeypatch.setattr(library_module, "read_header", lambda path: reads.append(os.path.basename(path)) or real(path))
    webui.load_script()
    webui.start_ui()
    assert sorted(reads) == ["fits.safetensors", "labelled.safetensors", "misfit.safetensors", "xl_keys.safetensors"]
    assert webui.workshop.library.resolve("labelled").layout is None  # its metadata names the family
    webui.workshop.model_loaded(model)
    computed = []
    real_fit = fit_module.fit
    monkeypatch.setattr(fit_module, "fit", lambda layout, mm: computed.append(mm) or real_fit(layout, mm))
    cards(webui)
    cards(webui)
    assert len(reads) == 4 and len(computed) == 2  # fits and misfit, once
    webui.workshop.model_loaded(model)  # a new model map: verdicts again, from the kept layouts
    assert cards(webui)["fits"]["lwfamily"] == "fits loaded model"
    assert len(reads) == 4 and len(computed) == 4

    # a file rewritten in place is read again by the scan, and its card follows
    w = sd1_map.get(Q).module.weight
    save_safetensors(lora_module(Q, w.shape[0], w.shape[1] + 1), d / "fits.safetensors", overwrite=True)
    st = (d / "fits.safetensors").stat()
    os.utime(d / "fits.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    webui.workshop.library.refresh()
    assert cards(webui)["fits"]["lwfamily"] == "does not fit" and reads.count("fits.safetensors") == 2
