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


def _cached_by_the_builtin(path) -> None:
    """What the built-in Lora leaves in the WebUI's cache for a file it hashed (its hashes.sha256 record)."""
    hashes.cache("hashes-addnet")[f"lora/{path.stem}"] = {"mtime": path.stat().st_mtime,
                                                          "sha256": addnet_hash_safetensors(path)}


def _started_counting_reads(webui, model, monkeypatch) -> list[str]:
    """The WebUI started with ``model``; the names of the files read whole for a hash from now on."""
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    reads: list[str] = []
    real = library_module.addnet_hash_safetensors
    monkeypatch.setattr(library_module, "addnet_hash_safetensors", lambda p: reads.append(p.name) or real(p))
    return reads


def _hashes_of(webui, prompt: str) -> str:
    p = webui.generate(prompt)
    extra_networks.deactivate(p, p.extra_network_data)
    return p.extra_generation_params.get("Lora hashes", "")


def test_a_hash_computed_once_serves_the_next_session_and_the_builtins(webui, model, sd1_map, monkeypatch):
    """A LoRA without ``sshs_model_hash`` is hashed for ``Lora hashes`` once, and the hash goes to the WebUI's
    cache as the built-in stores it; the next session (a new Workshop) writes the same infotext without
    reading the file; a hash the built-in cached earlier is used as it is."""
    a = make_lora(webui.lora_dir / "style_a.safetensors", sd1_map, seed=1)
    b = make_lora(webui.lora_dir / "b.safetensors", sd1_map, seed=2, only=("attn2",))
    ha = addnet_hash_safetensors(a)
    _cached_by_the_builtin(b)     # in an earlier session
    reads = _started_counting_reads(webui, model, monkeypatch)
    infotext = f"style_a: {ha[:12]}, b: {addnet_hash_safetensors(b)[:12]}"
    assert _hashes_of(webui, "x <lora:style_a:0.6> <lora:b:1>") == infotext
    assert reads == ["style_a.safetensors"]
    assert hashes.cache("hashes-addnet")["lora/style_a"] == {"mtime": a.stat().st_mtime, "sha256": ha}

    webui.load_script()    # a restart: a new Workshop, a new Library; the cache stays
    webui.start_ui()
    assert _hashes_of(webui, "x <lora:style_a:0.6> <lora:b:1>") == infotext and reads == ["style_a.safetensors"]


def test_no_hashing_reads_no_file_and_uses_the_hashes_known(webui, model, sd1_map, monkeypatch):
    """The WebUI's --no-hashing: a file whose hash is not known is never read whole for it, and leaves "Lora
    hashes" without it (as the built-in writes no hash then); a hash the cache or the metadata knows is used."""
    make_lora(webui.lora_dir / "unknown.safetensors", sd1_map, seed=1)
    b = make_lora(webui.lora_dir / "cached.safetensors", sd1_map, seed=2, only=("attn2",))
    _cached_by_the_builtin(b)
    monkeypatch.setattr(shared.cmd_opts, "no_hashing", True, raising=False)
    reads = _started_counting_reads(webui, model, monkeypatch)
    assert _hashes_of(webui, "x <lora:unknown:1> <lora:cached:1>") == f"cached: {addnet_hash_safetensors(b)[:12]}"
    assert reads == [] and "lora/unknown" not in hashes.cache("hashes-addnet")
