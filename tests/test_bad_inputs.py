"""Every kind of bad file gets a one-line reason, and nothing is executed or changed."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from lib_lora.fileio import LoraFileError, load_file, read_header, save_safetensors
from lib_lora.network import load_network

GOOD = {"lora_unet_x_to_q.lora_down.weight": torch.randn(2, 8), "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 2),
        "lora_unet_x_to_q.alpha": torch.tensor(1.0)}


@pytest.fixture
def good(tmp_path):
    return save_safetensors(GOOD, tmp_path / "good.safetensors", {"ss_output_name": "good"})


def test_good_file_round_trips(good):
    sd, meta = load_file(good)
    assert meta == {"ss_output_name": "good"}
    assert all(torch.equal(sd[k], v) for k, v in GOOD.items())


@pytest.mark.parametrize("cut", [0, 5, 20, -1, -7])
def test_truncated(good, tmp_path, cut):
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(LoraFileError, match="cut.safetensors: .*(truncated|not a valid|corrupt)"):
        load_network(bad)


def _rewrite_header(path, out, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return out


def test_header_lies_about_sizes(good, tmp_path):
    def grow(h):
        k = "lora_unet_x_to_q.lora_down.weight"
        h[k]["shape"] = [2, 800]
    bad = _rewrite_header(good, tmp_path / "lies.safetensors", grow)
    with pytest.raises(LoraFileError, match="lies.safetensors: tensor 'lora_unet_x_to_q.lora_down.weight' claims"):
        load_network(bad)


def test_overlapping_tensors(good, tmp_path):
    def overlap(h):
        a, b = "lora_unet_x_to_q.lora_down.weight", "lora_unet_x_to_q.lora_up.weight"
        h[b]["data_offsets"] = h[a]["data_offsets"]
    with pytest.raises(LoraFileError, match="overlap"):
        load_network(_rewrite_header(good, tmp_path / "ov.safetensors", overlap))


def test_header_not_json(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"\xff" * 10 + b"\0" * 16)
    with pytest.raises(LoraFileError, match="not valid JSON"):
        read_header(bad)


def test_huge_header_length(tmp_path):
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(LoraFileError, match="header length"):
        read_header(bad)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/never')}",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": _Evil()}, f)
    with pytest.raises(LoraFileError, match="evil.pt: refused to load pickle file safely"):
        load_network(path)
    assert not mark.exists()


def test_plain_tensor_pickle_is_read(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(dict(GOOD), path)
    net = load_network(path)
    assert list(net.adapters) == ["lora_unet_x_to_q"]


def test_other_extensions_refused(tmp_path):
    p = tmp_path / "x.zip"
    p.write_bytes(b"PK")
    with pytest.raises(LoraFileError, match="unsupported file type"):
        load_network(p)


def test_nan_tensors_refused(tmp_path):
    sd = dict(GOOD)
    sd["lora_unet_x_to_q.lora_up.weight"] = torch.full((8, 2), float("nan"))
    with pytest.raises(LoraFileError, match="NaN"):
        load_network(save_safetensors(sd, tmp_path / "nan.safetensors"))


def test_unknown_keys_only(tmp_path):
    path = save_safetensors({"model.foo.weight": torch.zeros(2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(LoraFileError, match="no LoRA/LyCORIS tensors recognised"):
        load_network(path)


def test_unknown_keys_beside_good_ones_are_counted(tmp_path):
    sd = dict(GOOD, **{"something_else": torch.zeros(1), "lora_unet_x_to_q.strange": torch.zeros(1)})
    net = load_network(save_safetensors(sd, tmp_path / "mixed.safetensors"))
    assert sorted(net.unknown_keys) == ["lora_unet_x_to_q.strange", "something_else"]


def test_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    import safetensors.torch as st
    target = save_safetensors(GOOD, tmp_path / "keep.safetensors")
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_safetensors({"a": torch.zeros(1)}, target, overwrite=True)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]
    with pytest.raises(FileExistsError):
        save_safetensors(GOOD, target)


def test_cli_one_line_error_and_exit_code(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x01\x02")
    r = subprocess.run([sys.executable, "-m", "lib_lora", "inspect", str(bad)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bad.safetensors" in r.stderr and "Traceback" not in r.stderr
