"""File hashes in the WebUI's hash cache, which the built-in Lora keeps its own in (``lora/STEM`` titles)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

STUB = Path(__file__).resolve().parent / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import extra_networks, hashes, shared  # noqa: E402

import lib_lora.library as library_module  # noqa: E402
from lib_lora.hashes import addnet_hash_safetensors  # noqa: E402

pytest.importorskip("fastapi")
from webui_glue_support import make_lora  # noqa: E402


def test_a_hash_computed_once_serves_the_next_session_and_the_builtins(webui, model, sd1_map, monkeypatch):
    """A LoRA without ``sshs_model_hash`` is hashed for ``Lora hashes`` once, and the hash goes to the WebUI's
    cache as the built-in stores it; the next session (a new Workshop) writes the same infotext without
    reading the file; a hash the built-in cached earlier is used as it is."""
    a = make_lora(webui.lora_dir / "style_a.safetensors", sd1_map, seed=1)
    b = make_lora(webui.lora_dir / "b.safetensors", sd1_map, seed=2, only=("attn2",))
    ha = addnet_hash_safetensors(a)
    # what the built-in Lora left in the cache for b, in an earlier session (its hashes.sha256 record)
    hashes.cache("hashes-addnet")["lora/b"] = {"mtime": b.stat().st_mtime, "sha256": addnet_hash_safetensors(b)}
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    reads = []
    real = library_module.addnet_hash_safetensors
    monkeypatch.setattr(library_module, "addnet_hash_safetensors", lambda p: reads.append(p.name) or real(p))

    p = webui.generate("x <lora:style_a:0.6> <lora:b:1>")
    extra_networks.deactivate(p, p.extra_network_data)
    infotext = f"style_a: {ha[:12]}, b: {addnet_hash_safetensors(b)[:12]}"
    assert p.extra_generation_params["Lora hashes"] == infotext
    assert reads == ["style_a.safetensors"]
    assert hashes.cache("hashes-addnet")["lora/style_a"] == {"mtime": a.stat().st_mtime, "sha256": ha}

    webui.load_script()    # a restart: a new Workshop, a new Library; the cache stays
    webui.start_ui()
    p = webui.generate("x <lora:style_a:0.6> <lora:b:1>")
    extra_networks.deactivate(p, p.extra_network_data)
    assert p.extra_generation_params["Lora hashes"] == infotext and reads == ["style_a.safetensors"]


def test_no_hashing_reads_no_file_and_uses_the_hashes_known(webui, model, sd1_map, monkeypatch):
    """The WebUI's --no-hashing: a file whose hash is not known is never read whole for it, and leaves "Lora
    hashes" without it (as the built-in writes no hash then); a hash the cache or the metadata knows is used."""
    make_lora(webui.lora_dir / "unknown.safetensors", sd1_map, seed=1)
    b = make_lora(webui.lora_dir / "cached.safetensors", sd1_map, seed=2, only=("attn2",))
    hashes.cache("hashes-addnet")["lora/cached"] = {"mtime": b.stat().st_mtime, "sha256": addnet_hash_safetensors(b)}
    monkeypatch.setattr(shared.cmd_opts, "no_hashing", True, raising=False)
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    reads = []
    real = library_module.addnet_hash_safetensors
    monkeypatch.setattr(library_module, "addnet_hash_safetensors", lambda p: reads.append(p.name) or real(p))
    p = webui.generate("x <lora:unknown:1> <lora:cached:1>")
    extra_networks.deactivate(p, p.extra_network_data)
    assert p.extra_generation_params["Lora hashes"] == f"cached: {addnet_hash_safetensors(b)[:12]}"
    assert reads == [] and "lora/unknown" not in hashes.cache("hashes-addnet")
