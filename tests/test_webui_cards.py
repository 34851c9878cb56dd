"""Lora cards in the stand-in WebUI.  Files that name no model family: the badge says whether the
file's layers fit the loaded model (the reference for "fits" is the patcher itself: such a file
applies to every one of its layers without a message, and one that "does not fit" gets one).
Which cards the page shows, the notes' "sd version" and the prompt a click inserts: the reference
is the built-in Lora's page (WebUI v1.10.1, extensions-builtin/Lora/ui_extra_networks_lora.py)."""
from __future__ import annotations

import json
import os

import torch

from webui_glue_support import SD1_META, card_click, make_lora  # first: it puts the stand-in WebUI on sys.path

from modules import script_callbacks, shared  # noqa: E402
from modules.options import OptionInfo  # noqa: E402

from lib_lora import fit as fit_module  # noqa: E402
from lib_lora import library as library_module  # noqa: E402
from lib_lora.fileio import save_safetensors  # noqa: E402
from lib_lora.hosts import webui_settings as settings  # noqa: E402
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


def builtin_filter_settings(show_all=False, hide_unknown_for=()) -> None:
    """The built-in Lora's two card settings, registered with its defaults (scripts/lora_script.py) and set."""
    shared.opts.add_option("lora_show_all", OptionInfo(False, "Always show all networks on the Lora page"))
    shared.opts.add_option("lora_hide_unknown_for_versions",
                           OptionInfo([], "Hide networks of unknown versions for model versions"))
    shared.opts.set("lora_show_all", show_all)
    shared.opts.set("lora_hide_unknown_for_versions", list(hide_unknown_for))


def test_cards_of_files_without_family_say_whether_they_fit(webui, model, sd1_map):
    d = files(webui, sd1_map)
    builtin_filter_settings(show_all=True)  # cards for other models are shown, dimmed
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
    builtin_filter_settings(show_all=True)
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


def test_cards_for_other_models_are_hidden_as_the_builtin_settings_say(webui, model, sd1_map):
    """The built-in leaves a card out when a model is loaded, ``lora_show_all`` is off and the card's version
    is not the model's; a card of unknown version only when the model's version is ticked in
    ``lora_hide_unknown_for_versions``.  Without a model every card shows.  We also know which "unknown"
    files do not fit the loaded model: those are left out like other models' cards."""
    d = files(webui, sd1_map)
    make_lora(d / "sd2.safetensors", sd1_map, metadata={"ss_v2": "True"}, only=("attn1",))
    everything = {"fits", "labelled", "misfit", "xl_keys", "sd2"}
    webui.load_script()
    webui.start_ui()
    page = webui.workshop.page
    # the built-in disabled: its settings are not registered and their defaults apply
    assert set(cards(webui)) == everything  # no model loaded
    webui.workshop.model_loaded(model)
    assert set(cards(webui)) == {"fits", "labelled"}
    assert page.create_item("xl_keys") is None  # the page's own listing filters
    redrawn = page.create_item("xl_keys", enable_filter=False)  # the WebUI redrawing one card after an edit
    assert redrawn["sort_keys"]["lwfamily"] == "SDXL" and redrawn["sort_keys"]["lwcompat"] == "no"
    shared.opts.data["lora_show_all"] = True  # saved in config.json while the built-in was enabled
    assert set(cards(webui)) == everything
    del shared.opts.data["lora_show_all"]

    builtin_filter_settings(hide_unknown_for=["SD2", "SDXL"])  # other versions than the loaded SD1
    assert set(cards(webui)) == {"fits", "labelled"}
    builtin_filter_settings(hide_unknown_for=["SD1"])
    assert set(cards(webui)) == {"labelled"}
    builtin_filter_settings(show_all=True, hide_unknown_for=["SD1"])
    keys = cards(webui)
    assert set(keys) == everything
    assert keys["sd2"]["lwfamily"] == "SD2" and keys["sd2"]["lwcompat"] == "no"  # shown, dimmed


def test_notes_sd_version_decides_the_badge_and_the_filter(webui, model, sd1_map, gradio_standin):
    """The notes' "sd version" (the built-in's key and names) overrides the file's family for the badge
    and the filter; a name that is not a version is ignored; "Unknown" leaves it to the file."""
    d = files(webui, sd1_map)
    make_lora(d / "sd2.safetensors", sd1_map, metadata={"ss_v2": "True"}, only=("attn1",))
    for name, version in {"xl_keys": "SD1", "labelled": "SDXL", "misfit": "SD1", "xl_unknown": "Unknown"}.items():
        (d / f"{name}.json").write_text(json.dumps({"sd version": version}), encoding="utf-8")
    (d / "sd2.json").write_text(json.dumps({"sd version": "SD15", "mine": 1}), encoding="utf-8")
    save_safetensors(lora_module("lora_te2_text_model_encoder_layers_0_mlp_fc2", 8, 8), d / "xl_unknown.safetensors")
    webui.load_script()
    webui.start_ui()
    webui.workshop.model_loaded(model)
    page = webui.workshop.page
    keys = cards(webui)
    assert set(keys) == {"xl_keys", "misfit", "fits"}
    assert keys["xl_keys"]["lwfamily"] == "SD1" and keys["xl_keys"]["lwcompat"] == "yes"
    assert keys["misfit"]["lwfamily"] == "SD1" and "lwfit" not in keys["misfit"]
    assert page.items["xl_keys"]["sd_version"] == "SD1" and "SD1" in page.items["xl_keys"]["search_terms"]

    builtin_filter_settings(show_all=True)
    keys = cards(webui)
    assert keys["labelled"]["lwfamily"] == "SDXL" and keys["labelled"]["lwcompat"] == "no"
    assert keys["xl_unknown"]["lwfamily"] == "SDXL"  # "Unknown": the keys decide
    assert keys["sd2"]["lwfamily"] == "SD2"          # "SD15" is no version name

    # the editor opens with the card's version and saves it under the same key, the notes' other keys kept
    editor = page.create_user_metadata_editor(None, "txt2img")
    assert editor.put_values_into_components("labelled")[5] == "SDXL"
    assert editor.put_values_into_components("sd2")[5] == "SD2"
    editor.save_lora_user_metadata("sd2", "", "SD1", "", 0.0, "", "")
    assert json.loads((d / "sd2.json").read_text(encoding="utf-8"))["sd version"] == "SD1"
    assert json.loads((d / "sd2.json").read_text(encoding="utf-8"))["mine"] == 1
    editor.save_lora_user_metadata("fits", "", "SD9", "", 0.0, "", "")  # not a choice: stored as Unknown
    assert json.loads((d / "fits.json").read_text(encoding="utf-8"))["sd version"] == "Unknown"
    builtin_filter_settings()
    assert set(cards(webui)) == {"xl_keys", "misfit", "fits", "sd2"}


def test_card_without_preferred_weight_inserts_the_webuis_default_multiplier(webui, sd1_map):
    """The built-in's card prompt reads ``opts.extra_networks_default_multiplier`` in the browser when clicked;
    our ``<lora:name>`` default weight is for tokens written without a weight, not for cards."""
    d = webui.lora_dir
    for name in ("plain", "zero", "weighted"):
        make_lora(d / f"{name}.safetensors", sd1_map, metadata=SD1_META, only=("attn1",))
    (d / "zero.json").write_text(json.dumps({"preferred weight": 0, "activation text": "zkx"}), encoding="utf-8")
    (d / "weighted.json").write_text(json.dumps({"preferred weight": 0.8, "activation text": "zkx"}), encoding="utf-8")
    webui.load_script()
    webui.start_ui()
    script_callbacks.ui_settings_callback()
    shared.opts.set(settings.OPT_DEFAULT_WEIGHT, 0.25)
    page = webui.workshop.page
    page.create_html("txt2img")
    browser = {"extra_networks_default_multiplier": 0.7}
    assert card_click(page.items["plain"]["prompt"], browser) == "<lora:plain:0.7>"
    assert card_click(page.items["zero"]["prompt"], browser) == "<lora:zero:0.7> zkx"
    assert card_click(page.items["weighted"]["prompt"], browser) == "<lora:weighted:0.8> zkx"
    # the value the browser has when clicked: a changed setting needs no new page
    assert card_click(page.items["plain"]["prompt"], {"extra_networks_default_multiplier": 1.5}) == "<lora:plain:1.5>"


def test_editor_lists_training_tags_and_a_random_prompt(webui, sd1_map, gradio_standin):
    """The built-in's editor lists the top 24 training tags (the words of sentence captions), shows a random
    prompt drawn from them, and hides both for a file without tags."""
    d = webui.lora_dir
    tags = {f"tag{i:02d}": 30 - i for i in range(26)}
    make_lora(d / "tagged.safetensors", sd1_map, only=("attn1",),
              metadata={**SD1_META, "ss_tag_frequency": json.dumps({"5_x": tags})})
    make_lora(d / "bare.safetensors", sd1_map, metadata=SD1_META, only=("attn1",))
    webui.load_script()
    webui.start_ui()
    page = webui.workshop.page
    page.create_html("txt2img")
    editor = page.create_user_metadata_editor(None, "txt2img")
    values = editor.put_values_into_components("tagged")
    assert values[6] == gradio_standin.update(value=[(f"tag{i:02d}", str(30 - i)) for i in range(24)], visible=True)
    assert values[10] == gradio_standin.update(visible=True)
    drawn = values[11]["value"].split(", ")
    assert "tag00" in drawn and set(drawn) <= set(tags) and drawn == sorted(drawn)
    assert set(editor.random_prompt("tagged").split(", ")) <= set(tags)
    bare = editor.put_values_into_components("bare")
    assert bare[6]["visible"] is False and bare[10]["visible"] is False and bare[11]["visible"] is False
    assert "Top tags:" not in dict(editor.get_metadata_table("tagged"))
