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


def test_a_file_copied_in_since_the_scan_is_found_by_its_first_use(lib, tmp_path, monkeypatch):
    """As the built-in Lora: a name that is not in the index rescans the folders once, so a file copied in
    (or uploaded over the API) is used by the next generation, without a refresh by hand; a name still
    missing rescans at most once per interval, and ``resolve`` itself never rescans."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    lib.refresh()
    lora(lib.roots[0] / "new" / "fresh.safetensors")
    with pytest.raises(LoraNotFound):
        lib.resolve("fresh")
    clock[0] += 0.5           # within the interval of the last scan: no rescan
    with pytest.raises(LoraNotFound):
        lib.resolve_fresh("fresh")
    clock[0] += 10
    assert lib.resolve_fresh("fresh").relname == "new/fresh"
    scans = []
    monkeypatch.setattr(lib, "refresh", lambda: scans.append(1))
    for _ in range(3):       # a missing name in every batch of one generation: nothing rescans
        with pytest.raises(LoraNotFound):
            lib.resolve_fresh("nope")
    assert scans == []
    # a generation's <lora:> token: the runtime resolves through the rescan
    tiny = build_sd1(seed=0)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    rt = Runtime(Library(lib.roots))
    rt.set_model(mm)
    save_safetensors(kohya_lora(mm, seed=1), lib.roots[0] / "later.safetensors")
    clock[0] += 10
    res = rt.activate([LoraRequest("later", 1.0)])
    assert [n for n, _ in res.hashes] == ["later"] and not res.messages
    rt.restore()


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


class Store:
    """A HashStore in a dict: what it was asked and told."""
    def __init__(self):
        self.kept, self.gets = {}, []

    def get(self, path, name, addnet):
        self.gets.append(name)
        return self.kept.get((name, addnet))

    def put(self, path, name, addnet, value, mtime):
        assert mtime == path.stat().st_mtime
        self.kept[(name, addnet)] = value


def _tensor_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_hashes_persist_in_the_store_and_a_shared_stem_is_kept_out(lib, monkeypatch):
    """A hash computed once goes to the store; a library built later (another session) reads it from there
    without reading the file; a stem two files share is neither read from nor written to the store (the
    WebUI's cache keys by stem), and a stored value that is not a hash is ignored."""
    import lib_lora.library as library_module
    store = Store()
    first = Library(lib.roots, hash_store=store)
    hero = first.resolve("hero")
    assert hero.addnet_hash() == _tensor_hash(hero.path) and store.kept == {("hero", True): _tensor_hash(hero.path)}
    first.resolve("other/dup").addnet_hash()
    assert ("dup", True) not in store.kept

    store.kept[("style", True)] = "<b>not a hash</b>"
    start = len(store.gets)
    later = Library(lib.roots, hash_store=store)
    reads = []
    real = library_module.addnet_hash_safetensors
    monkeypatch.setattr(library_module, "addnet_hash_safetensors", lambda p: reads.append(p.name) or real(p))
    hero = later.resolve("hero")
    assert hero.known_hash() == _tensor_hash(hero.path) and later.by_hash(_tensor_hash(hero.path)[:12], False) is hero
    assert reads == []
    style = later.resolve("style")
    assert style.addnet_hash() == _tensor_hash(style.path) and reads == ["style.safetensors"]
    assert store.kept[("style", True)] == _tensor_hash(style.path)
    assert "dup" not in store.gets
    for _ in range(3):      # a page of cards listed again: a file the store did not know is not asked again
        later.resolve("chars/hero").known_hash()
        later.resolve("ünï cødé").known_hash()
    assert store.gets[start:].count("ünï cødé") == 1 and store.gets[start:].count("hero") == 1


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


def test_state_files_in_kohyas_naming_are_hidden_by_their_header(tmp_path):
    """x-state.safetensors written by training is not a LoRA; a LoRA that happens to end in -state is."""
    from lib_lora.training.epochs import Position
    from lib_lora.training.state import TrainingState, save_state
    save_state(tmp_path / "x-state.safetensors", TrainingState(
        step=1, position=Position(), losses=[], started=0.0, session="1", fingerprint="", config={},
        network={}, optimizer={}, scheduler={}))
    lora(tmp_path / "washington-state.safetensors")
    assert [e.name for e in Library([tmp_path]).entries] == ["washington-state"]


# -- hardening (issue 15): per-file errors, symlink loops, links out of the folder, odd numbers ------


def _scan(roots, timeout=30.0, **kw) -> Library:
    """Library(roots) in a thread, so a scan that never ends fails the test instead of hanging it."""
    import threading
    out: list = []
    t = threading.Thread(target=lambda: out.append(Library(roots, **kw)), daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"scan did not finish in {timeout} s"
    return out[0]


def _write_header(path, header_text: str):
    raw = header_text.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    return path


def test_unparseable_headers_are_each_files_own_error(tmp_path):
    lora(tmp_path / "ok.safetensors")
    _write_header(tmp_path / "deep.safetensors", "[" * 100_000 + "]" * 100_000)
    _write_header(tmp_path / "dtype.safetensors", '{"a.alpha": {"dtype": ["F32"], "shape": [], "data_offsets": [0, 0]}}')
    _write_header(tmp_path / "meta.safetensors", '{"__metadata__": {"x": 1e400}}')
    lib = _scan([tmp_path])
    errors = {e.name: e.header_error for e in lib.entries}
    assert errors["ok"] is None
    assert errors["deep"].startswith("deep.safetensors: ") and "nested too deeply" in errors["deep"]
    assert errors["dtype"].startswith("dtype.safetensors: ") and "malformed header entry" in errors["dtype"]
    assert errors["meta"].startswith("meta.safetensors: ") and "not a string" in errors["meta"]


def test_symlink_loops_end_and_each_folder_is_scanned_once(tmp_path):
    root = tmp_path / "Lora"
    lora(root / "a" / "x.safetensors")
    lora(root / "top.safetensors")
    os.symlink(".", root / "self1")
    os.symlink(".", root / "self2")
    os.symlink("..", root / "a" / "up")
    os.symlink("../Lora/a", root / "again")  # a second way into a/: listed once, at its first path
    lib = _scan([root])
    assert sorted(e.relname for e in lib.entries) == ["a/x", "top"]
    deep = root.joinpath(*[f"d{i}" for i in range(40)])
    lora(deep / "too_deep.safetensors")
    lora(root.joinpath(*[f"d{i}" for i in range(5)]) / "shallow.safetensors")
    lib.refresh()
    names = {e.name for e in lib.entries}
    assert "shallow" in names and "too_deep" not in names


def test_links_out_of_the_lora_folder_are_not_indexed_unless_allowed(tmp_path):
    root, outside = tmp_path / "Lora", tmp_path / "elsewhere"
    lora(root / "own.safetensors")
    lora(outside / "theirs.safetensors")
    lora(outside / "sub" / "deeper.safetensors")
    secret = tmp_path / "passwd.safetensors"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    os.symlink(secret, root / "x.safetensors")
    os.symlink(outside / "theirs.safetensors", root / "linked.safetensors")
    os.symlink(outside / "sub", root / "linked_dir")
    lora(root / "in" / "kept.safetensors")
    os.symlink(root / "in" / "kept.safetensors", root / "alias.safetensors")  # inside: fine
    told = []
    lib = _scan([root], on_outside_links=told.append)
    assert sorted(e.relname for e in lib.entries) == ["alias", "own"]
    # what was left out is said once, by its paths in the folder (never where the links point)
    assert len(told) == 1 and sorted(told[0]) == sorted(str(root / n) for n in ("linked.safetensors", "x.safetensors",
                                                                                 "linked_dir"))
    lib.refresh()
    assert len(told) == 1 and lib.outside_links == told[0]
    both = _scan([root, outside])  # a second LoRA folder: links into it are inside "a model folder"
    assert sorted(e.relname for e in both.entries if e.root == root) == ["alias", "linked", "linked_dir/deeper", "own"]
    trusting = _scan([root], follow_outside_links=True)
    assert sorted(e.relname for e in trusting.entries) == ["alias", "linked", "linked_dir/deeper", "own", "x"]
    fifo = root / "pipe.safetensors"
    os.mkfifo(fifo)
    assert "pipe" not in {e.name for e in _scan([root]).entries}  # reading it would block forever


def test_notes_and_previews_linked_out_of_the_folder_are_not_read(tmp_path):
    root, outside = tmp_path / "Lora", tmp_path / "elsewhere"
    lora(root / "own.safetensors")
    outside.mkdir()
    (outside / "secret.json").write_text('{"activation text": "leaked"}', encoding="utf-8")
    (outside / "secret.png").write_bytes(b"\x89PNG")
    os.symlink(outside / "secret.json", root / "own.json")
    os.symlink(outside / "secret.png", root / "own.png")
    entry = _scan([root]).resolve("own")
    assert entry.user_metadata() == {} and entry.preview() is None
    trusting = _scan([root], follow_outside_links=True).resolve("own")
    assert trusting.user_metadata() == {"activation text": "leaked"} and trusting.preview() is not None


def test_out_of_range_metadata_keeps_api_and_inspect_valid_json(tmp_path, capsys):
    import json

    import fastapi
    from fastapi.testclient import TestClient

    from lib_lora import api
    from lib_lora.cli import main

    meta = {"ss_network_dim": "1e400", "ss_network_alpha": "NaN", "ss_training_started_at": "1e400",
            "ss_tag_frequency": '{"1_a": {"big": 1e400, "nan": NaN, "ok": 2}}', "ss_network_args": '{"algo": 5}',
            "ss_bucket_info": '{"a": ' * 50 + "1" + "}" * 50, "ss_dataset_dirs": '{"a": {"n": 1e400}}'}
    lora(tmp_path / "odd.safetensors", meta=meta)
    lib = Library([tmp_path])
    app = fastapi.FastAPI()
    api.add_routes(app, lambda: lib, builtin_compatible=True)
    client = TestClient(app)
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} in a JSON answer")}
    for path in ("/lora-workshop/v1/loras", "/lora-workshop/v1/loras/odd", "/sdapi/v1/loras"):
        r = client.get(path)
        assert r.status_code == 200, path
        json.loads(r.text, **strict)
    (item,) = client.get("/lora-workshop/v1/loras").json()
    assert (item["rank"], item["alpha"], item["algorithm"]) == ("1e400", "NaN", None)  # shown as written
    assert client.get("/lora-workshop/v1/loras/odd").json()["tag_frequency"] == {}  # undecodable: no tags
    (builtin,) = client.get("/sdapi/v1/loras").json()
    assert builtin["metadata"]["ss_dataset_dirs"] == meta["ss_dataset_dirs"]  # not decodable: the raw text
    assert main(["inspect", "--json", str(tmp_path / "odd.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out, **strict)
    assert info["metadata"]["ss_network_dim"] == "1e400"
    assert main(["inspect", str(tmp_path / "odd.safetensors")]) == 0
    assert "1e400" in capsys.readouterr().out
