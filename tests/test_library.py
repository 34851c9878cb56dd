"""Finding files by name, caching them, and the runtime's user-facing messages."""
from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch

from lib_lora.fileio import save_safetensors
from lib_lora.library import AmbiguousName, Library, LoraNotFound
from lib_lora.modelmap import ModelMap
from lib_lora.params import LoraRequest
from lib_lora.runtime import Runtime
from loras import kohya_lora, same, snapshot
from tiny_models import build_sd1


def lora(path, n=2, meta=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"lora_unet_a_to_q.lora_down.weight": torch.randn(n, 4, generator=g),
          "lora_unet_a_to_q.lora_up.weight": torch.randn(4, n, generator=g)}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(sd, path, meta or {})


@pytest.fixture
def lib(tmp_path):
    root = tmp_path / "Lora"
    lora(root / "style.safetensors", meta={"ss_output_name": "my_style"})
    lora(root / "chars" / "hero.safetensors")
    lora(root / "chars" / "dup.safetensors")
    lora(root / "other" / "dup.safetensors")
    lora(root / "ünï cødé.safetensors")
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    return Library([root])


def test_resolve_by_stem_path_alias(lib):
    assert lib.resolve("style").relname == "style"
    assert lib.resolve("my_style").relname == "style"
    assert lib.resolve("hero").relname == "chars/hero"
    assert lib.resolve("chars/hero").relname == "chars/hero"
    assert lib.resolve("chars\\hero").relname == "chars/hero"
    assert lib.resolve("ünï cødé").name == "ünï cødé"


def test_ambiguous_names_are_reported(lib):
    with pytest.raises(AmbiguousName, match=r'"dup" is ambiguous: chars/dup.safetensors, other/dup.safetensors'):
        lib.resolve("dup")
    assert lib.resolve("other/dup").relname == "other/dup"


@pytest.mark.parametrize("name", ["../secret", "../../etc/passwd", "/etc/passwd", "chars/../../secret", "", "nope"])
def test_names_cannot_escape(lib, name):
    with pytest.raises(LoraNotFound):
        lib.resolve(name)


def test_cache_reloads_changed_file_and_evicts(lib, tmp_path):
    e = lib.resolve("hero")
    a = lib.load(e)
    assert lib.load(e) is a
    os.unlink(e.path)
    lora(e.path, n=3, seed=1)
    os.utime(e.path, (time.time() + 5, time.time() + 5))
    lib.refresh()
    b = lib.load(lib.resolve("hero"))
    assert b is not a and b.ranks() == [3]
    lib.set_cache_bytes(1)
    lib.load(lib.resolve("style"))
    assert len(lib._cache) == 1


def test_hashes_match_independent_computation(lib):
    e = lib.resolve("style")
    data = e.path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert e.addnet_hash() == hashlib.sha256(data[8 + n:]).hexdigest()
    assert e.shorthash() == e.addnet_hash()[:12]
    assert e.sha256() == hashlib.sha256(data).hexdigest()
    assert lib.by_hash(e.shorthash()) is e


def test_untrusted_metadata_hash_is_ignored(tmp_path):
    lora(tmp_path / "x.safetensors", meta={"sshs_model_hash": "<img src=x onerror=alert(1)>"})
    e = Library([tmp_path]).resolve("x")
    assert all(c in "0123456789abcdef" for c in e.addnet_hash())


def test_runtime_reports_and_keeps_model_intact(tmp_path):
    tiny = build_sd1(seed=7)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    root = tmp_path / "Lora"
    save_safetensors(kohya_lora(mm, seed=1), root / "ok.safetensors")
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    rt = Runtime(Library([root]))
    rt.set_model(mm)
    before = snapshot(tiny.unet, tiny.text_encoders[0][1])
    res = rt.activate([LoraRequest("missing"), LoraRequest("broken"), LoraRequest("ok", 0.5, 0.5)])
    assert res.messages[0] == "Lora not found: missing"
    assert res.messages[1].startswith("broken.safetensors: ")
    assert res.applied == ["ok"] and res.hashes[0][0] == "ok" and len(res.hashes[0][1]) == 12
    assert not same(before, snapshot(tiny.unet, tiny.text_encoders[0][1]))
    rt.activate([])
    assert same(before, snapshot(tiny.unet, tiny.text_encoders[0][1]))


def test_training_state_files_are_not_loras(tmp_path):
    lora(tmp_path / "x.safetensors")
    lora(tmp_path / "x.state.safetensors")
    assert [e.name for e in Library([tmp_path]).entries] == ["x"]
