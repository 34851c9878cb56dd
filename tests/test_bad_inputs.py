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
from loras import deltas

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


# -- header fields of the wrong type or range: the loader's own error everywhere (issue 15, item 11) ---


def _with_header_text(good, out, edit_text):
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = edit_text(json.dumps(json.loads(data[8:8 + n]))).encode("utf-8", "surrogatepass")
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return out


DOWN = "lora_unet_x_to_q.lora_down.weight"
HEADER_EDITS = {
    "nested": (lambda t: t[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    "dtype_list": (lambda t: t.replace('"dtype": "F32"', '"dtype": ["F32"]', 1), "malformed header entry"),
    "dtype_dict": (lambda t: t.replace('"dtype": "F32"', '"dtype": {"a": 1}', 1), "malformed header entry"),
    "dtype_unknown": (lambda t: t.replace('"dtype": "F32"', '"dtype": "F4"', 1), "unsupported dtype"),
    "shape_float": (lambda t: t.replace('"shape": [2, 8]', '"shape": [2.0, 8]', 1), "malformed header entry"),
    "shape_bool": (lambda t: t.replace('"shape": [2, 8]', '"shape": [true, 16]', 1), "malformed header entry"),
    "shape_inf": (lambda t: t.replace('"shape": [2, 8]', '"shape": [1e400, 8]', 1), "malformed header entry"),
    "shape_nan": (lambda t: t.replace('"shape": [2, 8]', '"shape": [NaN, 8]', 1), "not valid JSON"),
    "shape_huge_zero": (lambda t: t.replace('"shape": [2, 8]', '"shape": [0, 1180591620717411303424]', 1),
                        "implausible shape"),
    "shape_many_dims": (lambda t: t.replace('"shape": [2, 8]', '"shape": [' + ", ".join(["1"] * 30) + ', 2, 8]', 1),
                        "malformed header entry"),
    "offsets_str": (lambda t: t.replace('"data_offsets": [0,', '"data_offsets": ["0",', 1), "malformed header entry"),
    "offsets_three": (lambda t: t.replace('"data_offsets": [0,', '"data_offsets": [0, 0,', 1), "malformed header entry"),
    "entry_not_object": (lambda t: t[:-1] + ', "lora_unet_y.alpha": 5}', "malformed header entry"),
    "metadata_not_str": (lambda t: t.replace('"good"}', '"good", "n": 1e400}', 1), "not a string"),
    "duplicate_key": (lambda t: t[:-1] + ', "__metadata__": {}}', "duplicate key"),
    "lone_surrogate": (lambda t: t.replace('"ss_output_name"', '"\\ud800"', 1), "not valid JSON"),
    "not_object": (lambda t: "[" + t + "]", "not a JSON object"),
}


@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_malformed_header_fields_are_the_loaders_error(good, tmp_path, edit, capsys):
    from lib_lora.cli import main

    fn, reason = HEADER_EDITS[edit]
    bad = _with_header_text(good, tmp_path / f"{edit}.safetensors", fn)
    for call in (read_header, load_network):
        with pytest.raises(LoraFileError, match=f"^{edit}.safetensors: .*{reason}") as e:
            call(bad)
        assert "\n" not in str(e.value)
    assert main(["inspect", "--json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{edit}.safetensors" in err and "Traceback" not in err


def _raw_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]):
    header, blob = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob)
    return path


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8")
def test_float8_tensors_load_and_nan_float8_is_refused(tmp_path):
    def f8(values):
        return torch.tensor(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
    ok = _raw_safetensors(tmp_path / "f8.safetensors", {
        DOWN: ("F8_E4M3", [1, 2], f8([0.5, 1.0])), "lora_unet_x_to_q.lora_up.weight": ("F8_E4M3", [2, 1], f8([2.0, 4.0]))})
    a = load_network(ok).adapters["lora_unet_x_to_q"]
    # hand-computed: up @ down = [[2], [4]] @ [[0.5, 1]]
    assert torch.equal(deltas(a, torch.zeros(2, 2), None, 1.0)[0], torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    nan = _raw_safetensors(tmp_path / "f8nan.safetensors", {
        DOWN: ("F8_E4M3", [1, 2], bytes([0x7F, 0x38])), "lora_unet_x_to_q.lora_up.weight": ("F8_E4M3", [2, 1], f8([1, 1]))})
    with pytest.raises(LoraFileError, match="^f8nan: .*NaN"):
        load_network(nan)


def test_float64_beyond_float32_is_refused(tmp_path):
    sd = dict(GOOD, **{"lora_unet_x_to_q.lora_up.weight": torch.full((8, 2), 1e300, dtype=torch.float64)})
    with pytest.raises(LoraFileError, match="^big: tensor lora_unet_x_to_q.lora_up.weight .*Inf"):
        load_network(save_safetensors(sd, tmp_path / "big.safetensors"))


def test_sparse_pickle_tensor_is_refused(tmp_path):
    path = tmp_path / "sparse.pt"
    torch.save({**GOOD, DOWN: GOOD[DOWN].to_sparse()}, path)
    with pytest.raises(LoraFileError, match=r"sparse: tensor .* \(only dense CPU tensors"):
        load_network(path)


@pytest.mark.parametrize("cfg, reason", [
    ("[1]", "not a JSON object"), ('{"unet.lora_alpha": "8"}', "not a usable number"),
    ('{"unet.lora_alpha": 1e39}', "not a usable number"), ('{"unet.lora_alpha": true}', "not a usable number"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": [1]}', "alpha_pattern is not an object"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"x.to_q": {}}}', "not a usable number"),
    ("[" * 5000, "not valid JSON")])
def test_bad_peft_alpha_metadata_is_named(tmp_path, cfg, reason):
    sd = {"unet.x.to_q.lora_A.weight": torch.randn(2, 8), "unet.x.to_q.lora_B.weight": torch.randn(8, 2)}
    path = save_safetensors(sd, tmp_path / "peft.safetensors", {"lora_adapter_metadata": cfg})
    with pytest.raises(LoraFileError, match=f"^peft: lora_adapter_metadata .*{reason}"):
        load_network(path)


# -- adapters that would crash or overflow when merged are refused at load (issue 15, item 6) -----


def _adapter_error(tensors: dict[str, torch.Tensor]) -> str:
    from lib_lora.adapters import AdapterError, make_adapter
    with pytest.raises(AdapterError) as e:
        make_adapter("lora_unet_m", tensors)
    return str(e.value)


def test_rank_zero_is_refused(tmp_path):
    assert "rank 0" in _adapter_error({"lora_down.weight": torch.zeros(0, 8), "lora_up.weight": torch.zeros(8, 0),
                                       "alpha": torch.tensor(1.0)})
    assert "rank 0" in _adapter_error({"hada_w1_a": torch.zeros(8, 0), "hada_w1_b": torch.zeros(0, 8),
                                       "hada_w2_a": torch.zeros(8, 0), "hada_w2_b": torch.zeros(0, 8)})
    sd = {DOWN: torch.zeros(0, 8), "lora_unet_x_to_q.lora_up.weight": torch.zeros(8, 0),
          "lora_unet_x_to_q.alpha": torch.tensor(1.0)}
    with pytest.raises(LoraFileError, match=r"rank0: no LoRA/LyCORIS tensors recognised .*rank 0"):
        load_network(save_safetensors(sd, tmp_path / "rank0.safetensors"))


def test_scale_overflowing_float32_is_refused():
    # |delta| can reach rank * max|up| * max|down| * alpha / rank = 2 * 2 * 3e38: beyond float32's 3.4e38
    assert "float32" in _adapter_error({"lora_down.weight": torch.full((1, 8), 2.0), "lora_up.weight": torch.full((8, 1), 2.0),
                                        "alpha": torch.tensor(3e38)})
    assert "alpha is inf" in _adapter_error({"lora_down.weight": torch.ones(1, 8), "lora_up.weight": torch.ones(8, 1),
                                             "alpha": torch.tensor(1e300, dtype=torch.float64)})  # inf as float32
    assert "float32" in _adapter_error({"hada_w1_a": torch.full((8, 1), 1e20), "hada_w1_b": torch.full((1, 8), 1e20),
                                        "hada_w2_a": torch.ones(8, 1), "hada_w2_b": torch.ones(1, 8)})
    from lib_lora.adapters import make_adapter
    big = make_adapter("m", {"lora_down.weight": torch.full((1, 8), 1e-10), "lora_up.weight": torch.full((8, 1), 1e-10),
                             "alpha": torch.tensor(1e30)})
    assert torch.allclose(deltas(big, torch.zeros(8, 8), None, 1.0)[0], torch.full((8, 8), 1e10))  # 1e-20 * 1e30


@pytest.mark.parametrize("extra, reason", [
    ({"dora_scale": torch.tensor(1.0)}, "scalar"), ({"dora_scale": torch.ones(7)}, "fits neither"),
    ({"lora_mid.weight": torch.ones(2, 2, 3)}, "lora_mid"), ({"lora_mid.weight": torch.ones(3, 2, 3, 3)}, "lora_mid"),
    ({"lora_up.weight": torch.ones(8, 2, 3, 3)}, "do not chain"), ({"alpha": torch.ones(2)}, "alpha must be one number"),
    ({"lora_down.weight": torch.ones(2, 0)}, "empty")])
def test_inconsistent_lora_shapes_are_refused(extra, reason):
    tensors = {"lora_down.weight": torch.ones(2, 8), "lora_up.weight": torch.ones(8, 2), **extra}
    assert reason in _adapter_error(tensors)


def test_loha_and_lokr_tucker_cores_must_be_4d():
    assert "hada_t1" in _adapter_error({"hada_w1_a": torch.ones(2, 8), "hada_w1_b": torch.ones(2, 8), "hada_t1": torch.ones(2, 2, 3),
                                        "hada_w2_a": torch.ones(2, 8), "hada_w2_b": torch.ones(2, 8), "hada_t2": torch.ones(2, 2, 3)})
    assert "do not chain" in _adapter_error({"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(2, 4),
                                             "lokr_w2_b": torch.ones(2, 4), "lokr_t2": torch.ones(2, 2, 3)})


def test_bad_module_is_listed_and_the_good_ones_load(tmp_path):
    sd = {**GOOD, "lora_unet_y_to_q.lora_down.weight": torch.zeros(0, 8), "lora_unet_y_to_q.lora_up.weight": torch.zeros(8, 0)}
    net = load_network(save_safetensors(sd, tmp_path / "mixed.safetensors"))
    assert list(net.adapters) == ["lora_unet_x_to_q"]
    assert net.errors == ["lora_unet_y_to_q: rank 0"]
