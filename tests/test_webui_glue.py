"""LoRA Workshop inside a stand-in WebUI (tests/webui_stub mirrors v1.10.1's module API).

The script is loaded the way the WebUI loads extension scripts, on a tiny real SD1 model
(tests/webui_glue_support.py; the fixtures ``webui``, ``model`` and ``sd1_map`` are conftest's).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
STUB = Path(__file__).resolve().parent / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import (call_queue, extra_networks, paths_internal, script_callbacks, script_loading,  # noqa: E402
                     shared, ui_extra_networks)

from lib_lora import fileio  # noqa: E402
from lib_lora.fileio import save_safetensors  # noqa: E402
from lib_lora.hashes import addnet_hash_safetensors  # noqa: E402
from lib_lora.hosts import webui_settings as settings  # noqa: E402
from lib_lora.hosts.webui_host import WebUIHost  # noqa: E402

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from webui_glue_support import (ALPHA, RANK, SD1_META, TE_KEY, UNET_KEY, BuiltinLora, FakeSdModel,  # noqa: E402
                                FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, TinyOpenClip, WebUI, WithCustomWords,
                                card_click, lora_delta, make_lora, tiny_clip)


# -- loading and activation -----------------------------------------------------------------------


def test_script_registers_handler_page_and_callbacks(webui):
    webui.load_script()
    webui.start_ui()
    ws = webui.workshop
    assert extra_networks.extra_network_registry["lora"] is ws.network
    assert extra_networks.extra_network_aliases["lyco"] is ws.network
    assert [pg.name for pg in ui_extra_networks.extra_pages] == ["lora"]
    assert ui_extra_networks.extra_pages[0].title == "Lora"
    assert str(webui.lora_dir) in ui_extra_networks.allowed_dirs
    names = {c.name for cbs in script_callbacks.callback_map.values() for c in cbs}
    for category in ("before_ui", "before_component", "app_started", "ui_settings", "model_loaded",
                     "infotext_pasted", "script_unloaded"):
        assert f"lora-workshop/lora_workshop.py/{category}" in names


def test_activate_applies_delta_and_unmentioned_restores_bitwise(webui, model, sd1_map):
    path = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map, metadata=SD1_META)
    shared.sd_model = model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    webui.load_script()
    webui.start_ui()

    p = webui.generate("a cat <lora:tiny:0.5:1.5>")
    q_proj = model.cond_stage_model.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
    to_k = sd1_map.get(UNET_KEY).module
    te_w0 = original["cond_stage_model.wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    unet_w0 = original["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    torch.testing.assert_close(q_proj.weight, te_w0 + 0.5 * lora_delta(path, TE_KEY), rtol=0, atol=1e-6)
    torch.testing.assert_close(to_k.weight, unet_w0 + 1.5 * lora_delta(path, UNET_KEY), rtol=0, atol=1e-6)
    assert not p.comments

    webui.generate("a cat")  # <lora> not mentioned: the WebUI calls activate(p, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_default_weight_setting_and_restore_after_generation(webui, model, sd1_map):
    path = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    script_callbacks.ui_settings_callback()
    q_proj = sd1_map.get(TE_KEY).module
    w0 = q_proj.weight.detach().clone()

    shared.opts.set(settings.OPT_DEFAULT_WEIGHT, 0.25)
    p = webui.generate("<lora:tiny>")
    torch.testing.assert_close(q_proj.weight, w0 + 0.25 * lora_delta(path, TE_KEY), rtol=0, atol=1e-6)
    extra_networks.deactivate(p, p.extra_network_data)
    assert not torch.equal(q_proj.weight, w0), "default: stays merged after the generation, like the built-in"

    shared.opts.set(settings.OPT_RESTORE_AFTER, True)
    p = webui.generate("<lora:tiny:1>")
    extra_networks.deactivate(p, p.extra_network_data)
    assert torch.equal(q_proj.weight, w0)


# the built-in Lora's settings we follow and their defaults, as extensions-builtin/Lora/scripts/lora_script.py
# of v1.10.1 registers them
BUILTIN_SETTINGS = {"lora_preferred_name": "Alias from file", "lora_add_hashes_to_infotext": True,
                    "lora_bundled_ti_to_infotext": True, "lora_show_all": False,
                    "lora_hide_unknown_for_versions": [], "lora_not_found_gradio_warning": False}


@pytest.mark.parametrize("with_builtin", [False, True])
def test_the_builtins_settings_we_follow_have_a_switch_without_it(webui, model, with_builtin):
    """With the built-in disabled, its settings that we follow are ours to register (its names, its defaults,
    in our section), so each keeps a switch on the Settings page; with it enabled, it registers them itself."""
    if with_builtin:
        BuiltinLora(webui).load()
    webui.load_script()
    script_callbacks.ui_settings_callback()
    ours = {k: v.default for k, v in shared.opts.data_labels.items() if k in BUILTIN_SETTINGS}
    if with_builtin:
        assert ours == {}
    else:
        assert ours == BUILTIN_SETTINGS
        assert {shared.opts.data_labels[k].section for k in ours} == {settings.SECTION}
        assert shared.opts.lora_preferred_name == "Alias from file"


def test_lora_hashes_infotext_and_paste_round_trip(webui, model, sd1_map):
    a = make_lora(webui.lora_dir / "style_a.safetensors", sd1_map, seed=1)
    b = make_lora(webui.lora_dir / "sub" / "b.safetensors", sd1_map, seed=2, only=("attn2",))
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    ha, hb = addnet_hash_safetensors(a)[:12], addnet_hash_safetensors(b)[:12]

    p = webui.generate("x <lora:style_a:0.6> <lyco:sub/b:0.4>")
    assert p.extra_generation_params["Lora hashes"] == f"style_a: {ha}, sub/b: {hb}"

    # the hires pass adds to, rather than replaces, the first pass's hashes
    p2 = webui.generate("x <lora:style_a:0.6>")
    webui.generate("x <lora:b:1>", hr=True, p=p2)
    assert p2.extra_generation_params["Lora hashes"] == f"style_a: {ha}, b: {hb}"

    # pasting an infotext made where the file had another name points the token at the local file
    shutil.move(str(a), str(webui.lora_dir / "renamed.safetensors"))
    webui.workshop.library.refresh()
    params = {"Prompt": "x <lora:style_a:0.6> <lora:b:1> <lora:gone:1>",
              "Lora hashes": f"style_a: {ha}, b: {hb}, gone: 0123456789ab"}
    script_callbacks.infotext_pasted_callback("", params)
    assert params["Prompt"] == "x <lora:renamed:0.6> <lora:b:1> <lora:gone:1>"

    # a file with an alias (ss_output_name) is named by it, or by its file name when the built-in's
    # lora_preferred_name says "Filename", as the cards name it
    c = make_lora(webui.lora_dir / "c_file.safetensors", sd1_map, seed=3, metadata={"ss_output_name": "c_alias"})
    webui.workshop.library.refresh()
    hc = addnet_hash_safetensors(c)[:12]
    for preferred, want in (("Alias from file", "c_alias"), ("Filename", "c_file")):
        shared.opts.data["lora_preferred_name"] = preferred
        params = {"Prompt": "x <lora:elsewhere:1>", "Lora hashes": f"elsewhere: {hc}"}
        script_callbacks.infotext_pasted_callback("", params)
        assert params["Prompt"] == f"x <lora:{want}:1>", preferred
    del shared.opts.data["lora_preferred_name"]


def test_additional_networks_infotext_pastes_as_lora_tokens(webui, model, monkeypatch):
    """An infotext from the sd-webui-additional-networks extension: its LoRA models become ``<lora:>`` tokens
    on a new prompt line (the hash in brackets dropped, weight A), as the built-in's paste callback makes them;
    not by us while the built-in is enabled (it does it itself) or that extension is installed (it fills its
    own fields)."""
    from modules import scripts
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    infotext = {"Prompt": "a cat", "AddNet Enabled": "True", "AddNet Module 1": "LoRA",
                "AddNet Model 1": "style_v2(0123abcd)", "AddNet Weight A 1": "0.7", "AddNet Weight B 1": "0.7",
                "AddNet Module 2": "LoRA", "AddNet Model 2": "plain", "AddNet Module 3": "Other",
                "AddNet Model 3": "not_lora(ffff0000)", "AddNet Weight A 3": "1"}
    params = dict(infotext)
    script_callbacks.infotext_pasted_callback("", params)
    assert params["Prompt"] == "a cat\n<lora:style_v2:0.7><lora:plain:1.0>"

    monkeypatch.setattr(scripts, "scripts_txt2img", types.SimpleNamespace(infotext_fields=[(object(), "AddNet Module 1")]))
    params = dict(infotext)
    script_callbacks.infotext_pasted_callback("", params)
    assert params["Prompt"] == "a cat"
    monkeypatch.setattr(scripts, "scripts_txt2img", None)
    BuiltinLora(webui).load()
    params = dict(infotext)
    script_callbacks.infotext_pasted_callback("", params)
    assert params["Prompt"] == "a cat"


def test_missing_lora_message_in_comments_and_console(webui, model, capsys):
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    p = webui.generate("x <lora:x:1>")
    assert "Lora not found: x" in p.comments
    assert "Lora not found: x" in capsys.readouterr().out

    shared.opts.data[settings.OPT_SHOW_WARNINGS] = False
    p = webui.generate("x <lora:y:1>")
    assert not p.comments
    assert "Lora not found: y" in capsys.readouterr().out


def test_missing_loras_pop_up_when_the_builtins_setting_says_so(webui, model, sd1_map, monkeypatch):
    """The built-in's ``lora_not_found_gradio_warning``: one gradio warning naming every missing file."""
    popups = []
    monkeypatch.setitem(sys.modules, "gradio", types.SimpleNamespace(Warning=popups.append))
    make_lora(webui.lora_dir / "here.safetensors", sd1_map)
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    webui.generate("x <lora:x:1> <lora:here:1> <lora:y:0.5> <lora:x:1>")
    assert popups == []                          # off unless asked, as in the built-in
    shared.opts.data["lora_not_found_gradio_warning"] = True
    webui.generate("x <lora:x:1> <lora:here:1> <lora:y:0.5>")
    webui.generate("x <lora:here:1>")
    assert popups == ["Lora not found: x, y"]


def test_bad_arguments_are_reported_not_raised(webui, model, sd1_map):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    p = webui.generate("<lora:tiny:strong>")
    assert any("is not a number" in c for c in p.comments)


def test_patcher_failure_is_reported_and_generation_continues(webui, model, sd1_map, monkeypatch):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    monkeypatch.setattr(webui.workshop.runtime, "activate", lambda requests: 1 / 0)
    p = webui.generate("<lora:tiny:1>")
    assert any(c.startswith("LoRA Workshop: applying LoRAs failed") for c in p.comments)


# -- coexistence with the built-in Lora extension ------------------------------------------------


@pytest.mark.parametrize("builtin_loads_first", [True, False])
def test_one_handler_one_tab_no_duplicate_routes_with_builtin(webui, model, sd1_map, builtin_loads_first):
    path = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    builtin = BuiltinLora(webui)
    if builtin_loads_first:
        builtin.load()
        webui.load_script()
    else:
        webui.load_script()
        builtin.load()
    app = webui.start_ui()
    ws = webui.workshop

    assert extra_networks.extra_network_registry["lora"] is ws.network
    assert extra_networks.extra_network_aliases["lyco"] is ws.network
    assert [pg for pg in ui_extra_networks.extra_pages if pg.name == "lora"] == [ws.page]
    routes = [(r.path, tuple(sorted(r.methods))) for r in app.routes if hasattr(r, "methods")]
    assert routes.count(("/sdapi/v1/loras", ("GET",))) == 1
    assert TestClient(app).get("/sdapi/v1/loras").json() == ["builtin"], "the built-in keeps its own route"
    assert ("/lora-workshop/v1/loras", ("GET",)) in routes

    w0 = sd1_map.get(TE_KEY).module.weight.detach().clone()
    webui.generate("<lora:tiny:1> <lyco:tiny:0>")
    assert builtin.activations == [] and builtin.networks.loaded_networks == []
    torch.testing.assert_close(sd1_map.get(TE_KEY).module.weight, w0 + lora_delta(path, TE_KEY), rtol=0, atol=1e-6)

    # something registers "lora" again later: the next generation takes it back first
    builtin.before_ui()
    webui.generate("<lora:tiny:1>")
    assert builtin.activations == []
    assert extra_networks.extra_network_registry["lora"] is ws.network


def test_builtin_busy_is_reported(webui, model, sd1_map, capsys):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    builtin = BuiltinLora(webui)
    builtin.load()
    webui.load_script()
    webui.start_ui()
    builtin.networks.loaded_networks.append(types.SimpleNamespace(name="other"))
    webui.generate("<lora:tiny:1>")
    assert "built-in Lora extension also has networks loaded (other)" in capsys.readouterr().out


def test_without_builtin_serves_sdapi_routes_in_its_shape(webui, sd1_map):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map, metadata={**SD1_META, "ss_output_name": "tiny_alias",
                                                                      "ss_tag_frequency": '{"10_x": {"cat": 2}}'})
    webui.load_script()
    client = TestClient(webui.start_ui())
    items = client.get("/sdapi/v1/loras").json()
    assert items == [{"name": "tiny", "alias": "tiny_alias", "path": str(webui.lora_dir / "tiny.safetensors"),
                      "metadata": {**SD1_META, "ss_output_name": "tiny_alias", "ss_tag_frequency": {"10_x": {"cat": 2}}}}]
    make_lora(webui.lora_dir / "new.safetensors", sd1_map)
    r = client.post("/sdapi/v1/refresh-loras")
    assert r.status_code == 200 and r.json() is None
    assert len(client.get("/sdapi/v1/loras").json()) == 2


# -- API ------------------------------------------------------------------------------------------


@pytest.fixture
def api_files(webui, sd1_map):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map, metadata=SD1_META)
    make_lora(webui.lora_dir / "sub" / "inner.safetensors", sd1_map, only=("attn2",))
    make_lora(webui.lora_dir / "ünï_コード.safetensors", sd1_map, only=("attn2",))
    make_lora(webui.tmp / "models" / "secret.safetensors", sd1_map, only=("attn2",))  # outside the folder
    return webui


def test_api_routes_names_and_traversal(api_files):
    webui = api_files
    webui.load_script()
    client = TestClient(webui.start_ui())
    listing = client.get("/lora-workshop/v1/loras").json()
    by_name = {x["name"]: x for x in listing}
    assert set(by_name) == {"tiny", "inner", "ünï_コード"}
    tiny = by_name["tiny"]
    assert (tiny["path"], tiny["family"], tiny["algorithm"], tiny["rank"], tiny["alpha"]) == \
        ("tiny.safetensors", "sd1", "lora", RANK, ALPHA)
    assert by_name["inner"]["path"] == "sub/inner.safetensors"
    assert tiny["metadata"]["ss_network_dim"] == str(RANK)

    detail = client.get("/lora-workshop/v1/loras/tiny").json()
    assert detail["hashes"]["shorthash"] == addnet_hash_safetensors(webui.lora_dir / "tiny.safetensors")[:12]
    assert len(detail["hashes"]["sha256"]) == 64
    assert client.get("/lora-workshop/v1/loras/sub/inner").status_code == 200
    assert client.get("/lora-workshop/v1/loras/ünï_コード").json()["name"] == "ünï_コード"

    for bad in ("..%2Fsecret", "..%2F..%2Fmodels%2Fsecret", "sub%2F..%2F..%2Fsecret", "%2Fetc%2Fpasswd",
                "..%5Csecret", str(webui.tmp / "models" / "secret").replace("/", "%2F")):
        r = client.get(f"/lora-workshop/v1/loras/{bad}")
        assert r.status_code == 404, bad
        assert r.json()["detail"].startswith("Lora not found: ")
    assert client.get("/lora-workshop/v1/loras/../secret").status_code == 404  # client-normalised form

    (webui.lora_dir / "tiny.safetensors").unlink()
    assert client.post("/lora-workshop/v1/refresh").json() == {"count": 2}
    assert client.get("/lora-workshop/v1/loras/tiny").status_code == 404


@pytest.mark.parametrize("webui_api_object", [False, True])
def test_api_auth(api_files, webui_api_object):
    webui = api_files
    # the WebUI's own parser cannot take a ':' inside a password (it fails to start); ours can
    shared.cmd_opts.api_auth = "alice:s3cret,bob:pass" if webui_api_object else "alice:s3cret,bob:pa:ss"
    app = fastapi.FastAPI()
    if webui_api_object:  # started with --api: the WebUI's own Api.auth is found and reused
        from modules.api.api import Api
        api = Api(app, call_queue.queue_lock)
    webui.load_script()
    webui.start_ui(app)
    client = TestClient(app)
    route = next(r for r in app.routes if getattr(r, "path", "") == "/lora-workshop/v1/loras")
    calls = [d.call for d in route.dependant.dependencies]
    if webui_api_object:
        assert calls == [api.auth]
    for path in ("/lora-workshop/v1/loras", "/lora-workshop/v1/loras/tiny", "/sdapi/v1/loras"):
        assert client.get(path).status_code == 401
        assert client.get(path, auth=("alice", "wrong")).status_code == 401
        assert client.get(path, auth=("mallory", "s3cret")).status_code == 401
        assert client.get(path, auth=("alice", "s3cret")).status_code == 200
    assert client.post("/lora-workshop/v1/refresh").status_code == 401
    assert client.post("/lora-workshop/v1/refresh", auth=("alice", "s3cret")).status_code == 200
    assert client.get("/lora-workshop/v1/loras/..%2Fsecret", auth=("alice", "s3cret")).status_code == 404
    if not webui_api_object:  # our own check: ':' in a password and non-ASCII passwords work
        assert client.get("/lora-workshop/v1/loras", auth=("bob", "pa:ss")).status_code == 200
        assert client.get("/lora-workshop/v1/loras", auth=("bob", "pä:ss")).status_code == 401


def test_api_without_auth_is_open(api_files):
    api_files.load_script()
    client = TestClient(api_files.start_ui())
    assert client.get("/lora-workshop/v1/loras").status_code == 200


# -- preload, install, settings --------------------------------------------------------------------


def _builtin_preload(dirpath: Path) -> None:
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "preload.py").write_text(
        "def preload(parser):\n"
        "    parser.add_argument('--lora-dir', type=str, default='builtin-default')\n"
        "    parser.add_argument('--lyco-dir-backcompat', type=str, default='lyco')\n")


def _user_ext(webui: WebUI) -> Path:
    ext = webui.tmp / "extensions" / "lora-workshop"
    ext.mkdir(parents=True)
    shutil.copy(ROOT / "preload.py", ext / "preload.py")
    return ext


def test_preload_adds_lora_dir_only_when_nobody_else_does(webui):
    ext = _user_ext(webui)
    builtin_dir = Path(paths_internal.extensions_builtin_dir)

    # no built-in Lora: we add --lora-dir with the models/Lora default
    parser = argparse.ArgumentParser()
    script_loading.preload_extensions(str(ext.parent), parser)
    script_loading.preload_extensions(str(builtin_dir), parser)
    assert parser.parse_args([]).lora_dir == str(Path(paths_internal.models_path, "Lora").absolute())

    # an earlier preload already added it: left alone, no argparse conflict
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-dir", default="other")
    script_loading.preload_extensions(str(ext.parent), parser)
    assert parser.parse_args([]).lora_dir == "other"

    # built-in Lora present: user preloads run first, so we must leave the option to it
    _builtin_preload(builtin_dir / "Lora")
    parser = argparse.ArgumentParser()
    script_loading.preload_extensions(str(ext.parent), parser)
    script_loading.preload_extensions(str(builtin_dir), parser)
    args = parser.parse_args(["--lora-dir", "/x"])
    assert (args.lora_dir, args.lyco_dir_backcompat) == ("/x", "lyco")


def test_install_only_installs_missing_packages(monkeypatch):
    from modules import launch_utils
    monkeypatch.setattr(launch_utils, "pip_calls", [])
    install = script_loading.load_module(str(ROOT / "install.py"))
    assert install.main() == [] and launch_utils.pip_calls == []  # safetensors is there
    monkeypatch.setitem(install.REQUIREMENTS, "lora-workshop-surely-missing", "a test")
    assert install.main() == ["lora-workshop-surely-missing"]
    assert launch_utils.pip_calls[0][0] == "install lora-workshop-surely-missing"
    # outside the WebUI the fallback check agrees
    assert install._is_installed("safetensors") and not install._is_installed("lora-workshop-surely-missing")


def test_settings_registered_in_own_section(webui):
    webui.load_script()
    script_callbacks.ui_settings_callback()
    ours = {k: v for k, v in shared.opts.data_labels.items() if k.startswith("lora_workshop_")}
    assert set(ours) == {settings.OPT_CACHE_MB, settings.OPT_DEFAULT_WEIGHT, settings.OPT_RESTORE_AFTER,
                         settings.OPT_SHOW_WARNINGS, settings.OPT_BUILTIN_DORA, settings.OPT_DATASET_ROOTS, settings.OPT_OUTSIDE_LINKS,
                         settings.OPT_LBW_PRESETS, settings.OPT_SCHEDULE_HIRES, settings.OPT_LBW_ELEMENT_PRESETS,
                         settings.OPT_TRAIN_PRIORITY, settings.OPT_TRAIN_YIELD_SECONDS}
    assert all(v.section == ("lora_workshop", "LoRA Workshop") for v in ours.values())
    builtin_names = {"sd_lora", "lora_preferred_name", "lora_add_hashes_to_infotext", "lora_bundled_ti_to_infotext",
                     "lora_show_all", "lora_hide_unknown_for_versions", "lora_in_memory_limit",
                     "lora_not_found_warning_console", "lora_not_found_gradio_warning", "lora_functional"}
    assert not set(ours) & builtin_names
    shared.opts.set(settings.OPT_CACHE_MB, 3)
    assert webui.workshop.library.cache_bytes == 3 << 20


def test_pt_lora_loads_although_webui_replaced_torch_load(webui, model, sd1_map, monkeypatch, tmp_path):
    """modules/safe.py's torch.load refuses what current torch saves; we read with its kept original."""
    import pickle

    from modules import safe

    monkeypatch.setattr(torch, "load", safe.load)
    tensors = fileio.load_safetensors(make_lora(tmp_path / "src.safetensors", sd1_map))[0]
    torch.save(tensors, webui.lora_dir / "legacy.pt")
    assert torch.load(webui.lora_dir / "legacy.pt") is None  # the WebUI's checker really refuses it
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    w = sd1_map.get(UNET_KEY).module.weight
    before = w.detach().clone()
    p = webui.generate("<lora:legacy:1>")
    assert not p.comments, p.comments
    torch.testing.assert_close(w - before, lora_delta_from(tensors, UNET_KEY))

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with open(webui.lora_dir / "evil.pt", "wb") as f:
        pickle.dump({f"{UNET_KEY}.lora_down.weight": Evil()}, f)
    webui.workshop.library.refresh()
    p = webui.generate("<lora:evil:1>")
    assert any("refused to load pickle file safely" in c for c in p.comments), p.comments
    assert not (tmp_path / "pwned").exists()


def lora_delta_from(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"] * (ALPHA / RANK)


def test_builtin_compatible_dora_setting_reaches_the_merge(webui, model, sd1_map, tmp_path):
    """The setting picks the built-in's DoRA formula: per input channel, the weight applied last."""
    g = torch.Generator().manual_seed(5)
    w0 = sd1_map.get(UNET_KEY).module.weight.detach().clone()
    down, up = torch.randn(RANK, w0.shape[1], generator=g) * 0.1, torch.randn(w0.shape[0], RANK, generator=g) * 0.1
    mag = torch.linalg.vector_norm(w0, dim=0, keepdim=True) * (1 + 0.3 * torch.rand(1, w0.shape[1], generator=g))
    save_safetensors({f"{UNET_KEY}.lora_down.weight": down, f"{UNET_KEY}.lora_up.weight": up,
                      f"{UNET_KEY}.alpha": torch.tensor(ALPHA), f"{UNET_KEY}.dora_scale": mag},
                     webui.lora_dir / "dora.safetensors")
    merged = w0 + up @ down * (ALPHA / RANK)
    norm = torch.linalg.vector_norm(merged, dim=0, keepdim=True)
    builtin = (merged * (mag / norm) - w0) * 0.5
    lycoris = merged * (0.5 * (mag / norm - 1) + 1) - w0  # same orientation, weight inside the scale
    shared.sd_model = model
    webui.load_script()
    script_callbacks.ui_settings_callback()
    webui.start_ui()
    w = sd1_map.get(UNET_KEY).module.weight
    for on, ref in ((False, lycoris), (True, builtin), (False, lycoris)):
        shared.opts.set(settings.OPT_BUILTIN_DORA, on)
        assert not webui.generate("<lora:dora:0.5>").comments
        torch.testing.assert_close(w.detach() - w0, ref, rtol=1e-4, atol=1e-6)
    assert (builtin - lycoris).abs().max() > 1e-3


def test_outside_links_setting_and_unreadable_file_on_its_card(webui, sd1_map, tmp_path, capsys):
    outside = tmp_path / "my_own_loras"
    make_lora(outside / "linked.safetensors", sd1_map, only=("attn2",))
    webui.lora_dir.mkdir(parents=True, exist_ok=True)
    (webui.lora_dir / "mine").symlink_to(outside)
    broken = webui.lora_dir / "broken.safetensors"
    raw = b'{"a.alpha": {"dtype": ["F32"], "shape": [], "data_offsets": [0, 0]}}'
    broken.write_bytes(len(raw).to_bytes(8, "little") + raw)
    webui.load_script()
    script_callbacks.ui_settings_callback()
    webui.start_ui()
    lib = webui.workshop.library
    assert [e.relname for e in lib.entries] == ["broken"]  # the link out is not followed by default
    said = [line for line in capsys.readouterr().out.splitlines() if "point outside them" in line]
    assert said == [f"[LoRA Workshop] 1 link(s) in the LoRA folders point outside them and are not listed: "
                    f"{webui.lora_dir / 'mine'} (Settings → LoRA Workshop → \"Index files that symlinks in the LoRA "
                    "folder point to outside it\" lists them)"]
    shared.opts.set(settings.OPT_OUTSIDE_LINKS, True)
    assert [e.relname for e in lib.entries] == ["broken", "mine/linked"]
    page = webui.workshop.page
    page.create_html("txt2img")
    desc = page.items["broken"]["description"]
    assert "broken.safetensors: tensor &#x27;a.alpha&#x27; has a malformed header entry" in desc
    assert page.items["linked"]["description"] in (None, "")


# -- model switching and host mapping -------------------------------------------------------------


def test_model_switch_restores_previous_model(webui, model, sd1_map):
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map)
    shared.sd_model = model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    webui.load_script()
    webui.start_ui()
    webui.generate("<lora:tiny:1>")  # stays merged (default)
    other = FakeSdModel(None, WithCustomWords(FrozenCLIPEmbedder(tiny_clip())), is_sd1=True)
    shared.sd_model = other
    script_callbacks.model_loaded_callback(other)
    # the first model may be kept in the WebUI's checkpoint cache: it must not keep the LoRA
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    w0 = other.cond_stage_model.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj.weight.clone()
    webui.generate("<lora:tiny:1>")
    assert not torch.equal(other.cond_stage_model.wrapped.transformer.text_model.encoder.layers[0]
                           .self_attn.q_proj.weight, w0)


def test_host_finds_text_encoders_where_the_webui_keeps_them():
    h = WebUIHost()
    sd2 = FakeSdModel(None, WithCustomWords(FrozenOpenCLIPEmbedder(TinyOpenClip())), is_sd2=True)
    mm = h.model_map(sd2)
    assert mm.family == "sd2" and mm.get("lora_te_text_model_encoder_layers_0_mlp_fc1") is not None
    assert mm.get("lora_te_text_model_encoder_layers_0_self_attn_q_proj") is not None
    assert h.model_map(sd2) is mm, "cached per model object"

    conditioner = nn.Module()
    conditioner.embedders = nn.ModuleList([WithCustomWords(FrozenCLIPEmbedder(tiny_clip())),
                                           WithCustomWords(FrozenOpenCLIPEmbedder(TinyOpenClip()))])
    sdxl = FakeSdModel(None, conditioner=conditioner, is_sdxl=True)
    mm = h.model_map(sdxl)
    assert mm.family == "sdxl" and mm.components() == {"te1", "te2"}
    assert mm.get("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") is not None
    assert mm.get("lora_te2_text_model_encoder_layers_0_mlp_fc2") is not None
    assert h.model_map(FakeSdModel(None, is_sd3=True)) is None


# -- the Extra Networks page ----------------------------------------------------------------------


def test_page_items_prompt_search_badge_and_notes(webui, sd1_map, gradio_standin):
    meta = {**SD1_META, "ss_output_name": "Tiny Style", "sshs_model_hash": "ab" * 32,
            "ss_tag_frequency": json.dumps({"5_a": {"cat": 3, "<b>dog</b>": 1}, "5_b": {"cat": 2}}),
            "ss_training_comment": "<script>x</script>"}
    make_lora(webui.lora_dir / "tiny.safetensors", sd1_map, metadata=meta)
    (webui.lora_dir / "tiny.png").write_bytes(b"\x89PNG")
    (webui.lora_dir / "tiny.json").write_text(json.dumps({"activation text": "tinystyle", "preferred weight": 0.8,
                                                          "negative text": "blurry", "sd version": "SD1"}))
    make_lora(webui.lora_dir / "a" / "dup.safetensors", sd1_map, only=("attn2",))
    make_lora(webui.lora_dir / "b" / "dup.safetensors", sd1_map, only=("attn2",))
    webui.load_script()
    webui.start_ui()
    page = webui.workshop.page
    page.create_html("txt2img")
    assert set(page.items) == {"tiny", "a/dup", "b/dup"}

    item = page.items["tiny"]
    assert item["prompt"] == ui_extra_networks.quote_js("<lora:Tiny Style:0.8> tinystyle")
    assert item["negative_prompt"] == ui_extra_networks.quote_js("(blurry:1)")
    assert {"tiny.safetensors", "tiny", "Tiny Style", "SD1", "ab" * 6} <= set(item["search_terms"])
    assert item["sort_keys"]["lwfamily"] == "SD1" and item["shorthash"] == "ab" * 6
    assert item["preview"].startswith("./sd_extra_networks/thumb?filename=")
    assert item["metadata"]["ss_tag_frequency"] == {"5_a": {"cat": 3, "<b>dog</b>": 1}, "5_b": {"cat": 2}}
    # no preferred weight: the WebUI's default multiplier, as the browser has it at the click
    assert card_click(page.items["a/dup"]["prompt"], {"extra_networks_default_multiplier": 1.0}) == "<lora:a/dup:1>"

    editor = page.create_user_metadata_editor(None, "txt2img")
    table = dict(editor.get_metadata_table("tiny"))
    assert table["Comment:"] == "&lt;script&gt;x&lt;/script&gt;"
    assert table["Rank:"] == str(RANK)
    values = editor.put_values_into_components("tiny")
    assert values[5] == "SD1" and values[7:10] == ["tinystyle", 0.8, "blurry"]
    # the training tags, clickable (gradio shows them as text, unescaped), and a random prompt from them
    assert values[6] == gradio_standin.update(value=[("cat", "5"), ("<b>dog</b>", "1")], visible=True)
    assert values[10] == gradio_standin.update(visible=True) and "cat" in values[11]["value"]
    editor.save_lora_user_metadata("tiny", "desc", "SD1", "newword", 0.6, "", "my notes")
    saved = json.loads((webui.lora_dir / "tiny.json").read_text())
    assert saved == {"activation text": "newword", "preferred weight": 0.6, "negative text": "", "sd version": "SD1",
                     "description": "desc", "notes": "my notes"}
    assert page.create_item("tiny")["prompt"] == ui_extra_networks.quote_js("<lora:Tiny Style:0.6> newword")
    assert page.create_item("../tiny") is None
