"""The offline tools (resize, merge, bake, extract, convert) against independent references:
deltas computed by hand from the stored factors, torch.linalg.svd (Eckart–Young), diffusers'
load_lora_weights + fuse_lora, and the runtime patcher rendering through the CLI host."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from lib_lora.fileio import TensorFile, load_file, read_header, save_safetensors
from lib_lora.hashes import addnet_hash_safetensors, sha256_file
from lib_lora.hosts.cli.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from lib_lora.hosts.cli.sampling import sample
from lib_lora.modelmap import ModelMap
from lib_lora.network import load_network
from lib_lora.patcher import Patcher
from lib_lora.tools import common
from lib_lora.tools.bake import bake
from lib_lora.tools.convert import convert
from lib_lora.tools.extract import extract
from lib_lora.tools.layout import Layout
from lib_lora.tools.merge import merge, parse_spec
from lib_lora.tools.resize import resize
from lib_lora.tools.stream import StreamWriter
from loras import activation, kohya_lora

ROOT = Path(__file__).resolve().parent.parent
PX = 16
# what kohya's trainers target (see test_diffusers_equivalence): attention, resnets, samplers, text MLP/attention
KOHYA_TARGETS = ("attentions_", "transformer_blocks", "proj_in", "proj_out", "resnets_", "samplers_",
                 "_1_transformer", "_0_in_layers", "_0_out_layers", "_0_emb_layers", "_0_skip", "_op",
                 "_conv", "self_attn", "mlp_fc")
F32 = torch.float32


def tiny_vae():
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2).eval()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(tiny model, its Layout, fp32 checkpoint file, fp16 checkpoint file)."""
    root = tmp_path_factory.mktemp("tools")
    tiny = tm.build_sd1(seed=1)
    ck = Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae())
    f32 = save_checkpoint(ck, root / "base32.safetensors", dtype=F32, yaml=False)
    f16 = save_checkpoint(ck, root / "base16.safetensors", dtype=torch.float16, yaml=False)
    return tiny, Layout.from_modules("sd1", tiny.unet, tiny.text_encoders), f32, f16


def kohya_delta(sd: dict, key: str) -> torch.Tensor:
    """up @ down * alpha / rank, by hand, flattened to [out, in*k*k]."""
    down, up = sd[f"{key}.lora_down.weight"].float(), sd[f"{key}.lora_up.weight"].float()
    alpha = sd.get(f"{key}.alpha")
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return up.flatten(1) @ down.flatten(1) * scale


def module_keys(sd: dict) -> list[str]:
    return sorted({k.split(".")[0] for k in sd})


def loha_sd(lay: Layout, keys: list[str], rank: int = 3, alpha: float = 2.0, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in keys:
        out_f, in_f = lay.get(key).shape[:2]
        for i in (1, 2):
            sd[f"{key}.hada_w{i}_a"] = torch.randn(out_f, rank, generator=g) * 0.3
            sd[f"{key}.hada_w{i}_b"] = torch.randn(rank, in_f, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def loha_delta(sd: dict, key: str) -> torch.Tensor:
    """LyCORIS's LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rank."""
    w1 = sd[f"{key}.hada_w1_a"] @ sd[f"{key}.hada_w1_b"]
    w2 = sd[f"{key}.hada_w2_a"] @ sd[f"{key}.hada_w2_b"]
    return w1 * w2 * float(sd[f"{key}.alpha"]) / sd[f"{key}.hada_w1_b"].shape[0]


# --------------------------------------------------------------------------- resize


def test_resize_to_full_rank_returns_the_same_delta(sd1, tmp_path):
    _, lay, _, _ = sd1
    sd = kohya_lora(lay.mm, rank=6, alpha=3.0, seed=2, convs=True, only=KOHYA_TARGETS)
    keys = module_keys(sd)
    loha_keys = [k for k in keys if k.endswith("attn1_to_q")][:2]
    for k in loha_keys:
        for role in ("lora_down.weight", "lora_up.weight", "alpha"):
            del sd[f"{k}.{role}"]
    loha = loha_sd(lay, loha_keys, rank=3)
    src = save_safetensors({**sd, **loha}, tmp_path / "in.safetensors", {"ss_network_dim": "6", "ss_note": "kept"})
    r = resize(src, tmp_path / "out.safetensors", rank=9, layout=lay, dtype=F32, log=lambda s: None)
    out, meta = load_file(r.path)
    assert module_keys(out) == keys and r.result.kept == pytest.approx(1.0)
    for k in keys:
        want = loha_delta(loha, k) if k in loha_keys else kohya_delta(sd, k)
        torch.testing.assert_close(kohya_delta(out, k), want, atol=1e-5, rtol=1e-4, msg=k)
        shape = lay.get(k).shape
        assert out[f"{k}.lora_down.weight"].shape[1:] == shape[1:]  # the layer's own layout (LoCon for convs)
    for l in r.result.layers:  # LoHa's delta has rank up to 3 x 3; nothing exceeds the layer's own rank
        shape = lay.get(l.key).shape
        assert l.rank == min(9 if l.key in loha_keys else 6, shape[0], int(torch.tensor(shape[1:]).prod()))
    assert meta["ss_note"] == "kept" and meta["ss_network_dim"] == "Dynamic"
    assert "resized to rank 9" in meta["ss_training_comment"]


def test_resize_gives_the_best_rank_r_approximation(sd1, tmp_path):
    _, lay, _, _ = sd1
    sd = kohya_lora(lay.mm, rank=8, alpha=4.0, seed=3, convs=True, only=("attn2_to_k", "in_layers_2", "mlp_fc1"))
    src = save_safetensors(sd, tmp_path / "in.safetensors")
    lines = []
    r = resize(src, tmp_path / "out.safetensors", rank=3, layout=lay, dtype=F32, log=lines.append)
    out, meta = load_file(r.path)
    kept_total = total = 0.0
    for k in module_keys(sd):
        exact = kohya_delta(sd, k)
        u, s, vh = torch.linalg.svd(exact.double(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]                     # Eckart–Young
        torch.testing.assert_close(kohya_delta(out, k).double(), best, atol=1e-5, rtol=1e-4, msg=k)
        kept_total, total = kept_total + float((s[:3] ** 2).sum()), total + float((s ** 2).sum())
        layer = next(l for l in r.result.layers if l.key == k)
        assert layer.kept == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
    assert r.result.kept == pytest.approx(kept_total / total, rel=1e-4)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3"
    assert any("energy kept" in line and k in line for line in lines for k in module_keys(sd))
    assert lines[-1].endswith(f"energy kept overall {100 * kept_total / total:.3f}%")


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_ratio", 4.0), ("sv_cumulative", 0.7)])
def test_dynamic_rank_methods(sd1, tmp_path, method, param):
    _, lay, _, _ = sd1
    sd = kohya_lora(lay.mm, rank=8, alpha=8.0, seed=4, only=("attn1_to_v", "proj_in"))
    src = save_safetensors(sd, tmp_path / "in.safetensors")
    r = resize(src, tmp_path / "out.safetensors", rank=6, method=method, param=param, layout=lay, dtype=F32,
               log=lambda s: None)
    for layer in r.result.layers:
        s = torch.linalg.svd(kohya_delta(sd, layer.key).double())[1][:8]
        if method == "sv_fro":      # smallest rank keeping `param` of the Frobenius norm
            want = next(i for i in range(1, 9) if (s[:i] ** 2).sum().sqrt() / (s ** 2).sum().sqrt() >= param)
        elif method == "sv_ratio":  # singular values above max / ratio
            want = int((s > s[0] / param).sum())
        else:                       # smallest rank whose singular values reach `param` of their sum
            want = next(i for i in range(1, 9) if s[:i].sum() / s.sum() >= param)
        assert layer.rank == min(want, 6), layer.key
    assert load_file(r.path)[1]["ss_network_dim"] == "Dynamic"


def test_resize_of_weight_dependent_algorithms_needs_base(sd1, tmp_path):
    tiny, lay, f32, _ = sd1
    sd = kohya_lora(lay.mm, rank=4, seed=6, only=("attn2_to_q", "mlp_fc2"))
    g = torch.Generator().manual_seed(0)
    for k in module_keys(sd):
        sd[f"{k}.dora_scale"] = 1 + 0.1 * torch.randn(lay.get(k).shape[0], 1, generator=g)
    src = save_safetensors(sd, tmp_path / "dora.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(common.NeedsBaseError, match="--base"):
        resize(src, out, rank=4, layout=lay, log=lambda s: None)
    assert not out.exists()
    r = resize(src, out, rank=4096, base=f32, dtype=F32, log=lambda s: None)  # DoRA: full rank
    # reference: what the runtime patcher merges into the same weights
    ck = load_checkpoint(f32)
    mm = ModelMap.build("sd1", ck.unet, ck.text_encoders)
    before = {k: mm.get(k).weight().detach().clone() for k in module_keys(sd)}
    p = Patcher(mm)
    p.apply([activation(load_network(src))])
    got = load_file(r.path)[0]
    for k in module_keys(sd):
        want = (mm.get(k).weight() - before[k]).reshape(before[k].shape[0], -1)
        torch.testing.assert_close(kohya_delta(got, k), want, atol=2e-5, rtol=1e-3, msg=k)
    p.restore()


# --------------------------------------------------------------------------- merge


def test_merge_is_the_weighted_sum_exactly_or_its_best_rank_r(sd1, tmp_path):
    _, lay, _, _ = sd1
    a = kohya_lora(lay.mm, rank=4, alpha=2.0, seed=7, convs=True, only=("attn1", "mlp_fc1", "in_layers_2"))
    b = kohya_lora(lay.mm, rank=3, alpha=None, seed=8, only=("attn1", "self_attn_q"))
    pa = save_safetensors(a, tmp_path / "a.safetensors", {"ss_base_model_version": "sd_v1"})
    pb = save_safetensors(b, tmp_path / "b.safetensors")
    specs = [f"{pa}:0.7", f"{pb}:te=-0.5:unet=1.5"]
    exact = merge(specs, tmp_path / "exact.safetensors", layout=lay, dtype=F32, log=lambda s: None)
    out, meta = load_file(exact.path)
    keys = sorted(set(module_keys(a)) | set(module_keys(b)))
    assert module_keys(out) == keys

    def want(k: str) -> torch.Tensor:
        te = k.startswith("lora_te")
        d = 0
        if f"{k}.lora_down.weight" in a:
            d = d + 0.7 * kohya_delta(a, k)
        if f"{k}.lora_down.weight" in b:
            d = d + (-0.5 if te else 1.5) * kohya_delta(b, k)
        return d

    for k in keys:
        torch.testing.assert_close(kohya_delta(out, k), want(k), atol=1e-6, rtol=1e-5, msg=k)
        both = f"{k}.lora_down.weight" in a and f"{k}.lora_down.weight" in b
        assert out[f"{k}.lora_down.weight"].shape[0] == (7 if both else 4 if f"{k}.lora_down.weight" in a else 3)
    assert json.loads(meta["ss_merged_from"])[1]["te"] == -0.5 and meta["ss_base_model_version"] == "sd_v1"

    svd = merge(specs, tmp_path / "svd.safetensors", rank=2, layout=lay, dtype=F32, log=lambda s: None)
    out = load_file(svd.path)[0]
    for k in keys:
        u, s, vh = torch.linalg.svd(want(k).double(), full_matrices=False)
        torch.testing.assert_close(kohya_delta(out, k).double(), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)


def test_merge_specs_parse_like_the_prompt():
    s = parse_spec("C:\\loras\\a.safetensors:0.5")
    assert str(s.path) == "C:\\loras\\a.safetensors" and (s.request.te, s.request.unet) == (0.5, 0.5)
    s = parse_spec("a.safetensors:1:0.3:8")
    assert (s.request.te, s.request.unet, s.request.dyn) == (1, 0.3, 8)
    s = parse_spec("a.safetensors:unet=0.2")
    assert (s.request.te, s.request.unet) == (1, 0.2)
    from lib_lora.tools.merge import layer_weight
    with pytest.raises(common.ToolError, match="unknown weight"):
        layer_weight(parse_spec("a.safetensors:zzz=1"))
    with pytest.raises(common.ToolError, match="lbw="):
        layer_weight(parse_spec("a.safetensors:lbw=1,0,1"))


def test_merge_with_block_weights_scales_each_block(sd1, tmp_path):
    _, lay, _, _ = sd1
    a = kohya_lora(lay.mm, rank=4, alpha=2.0, seed=9, only=("attn1", "self_attn_q"))
    pa = save_safetensors(a, tmp_path / "a.safetensors", {"ss_base_model_version": "sd_v1"})
    # LBW's 17-value form: BASE (text encoder), IN01..IN08, M00, OUT03..OUT11
    vec = "0.5,1,0,1,0,1,0,0.25,1,0,1,0,1,0,1,0,1"
    out, _ = load_file(merge([f"{pa}:0.8:lbw={vec}"], tmp_path / "m.safetensors", layout=lay, dtype=F32,
                             log=lambda s: None).path)
    blocks = dict(zip(["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                       "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"], map(float, vec.split(","))))
    from lib_lora.blockweights import target_block
    for k in module_keys(a):
        w = blocks.get(target_block([k]) or "", 1.0)
        got = kohya_delta(out, k) if f"{k}.lora_down.weight" in out else torch.zeros_like(kohya_delta(a, k))
        torch.testing.assert_close(got, 0.8 * w * kohya_delta(a, k), atol=1e-6, rtol=1e-5, msg=k)


# --------------------------------------------------------------------------- convert


def diffusers_fused_from_file(tiny, path: Path) -> dict:
    pipe = tm.build_diffusers_pipeline(tiny)
    comps = list(pipe._lora_loadable_modules)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(components=comps, lora_scale=1.0)
    pipe.unload_lora_weights()
    return {f"{c}.{k}": v for c in comps for k, v in getattr(pipe, c).state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_converted_file_loads_in_diffusers_with_the_same_fused_weights(family, tmp_path):
    tiny = (tm.build_sd1 if family == "sd1" else tm.build_sdxl)(seed=2)
    lay = Layout.from_modules(family, tiny.unet, tiny.text_encoders)
    sd = kohya_lora(lay.mm, rank=4, alpha=2.0, seed=9, convs=True, only=KOHYA_TARGETS)
    first = module_keys(sd)[-1]
    sd[f"{first}.alpha"] = torch.tensor(1.0)  # one layer off the common alpha: PEFT's alpha_pattern
    src = save_safetensors(sd, tmp_path / "kohya.safetensors", {"ss_network_dim": "4"})
    dif = convert(src, tmp_path / "diffusers.safetensors", to="diffusers", layout=lay, log=lambda s: None).path
    keys, meta = load_file(dif)
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) and ".lora_" in k for k in keys)
    assert meta["ss_network_dim"] == "4" and "lora_adapter_metadata" in meta
    ref = tm.diffusers_fused_weights(tiny, sd)  # diffusers reading the kohya file itself
    got = diffusers_fused_from_file(tiny, dif)
    plain = {f"{c}.{k}": v for c, m in (("unet", tm.to_diffusers_unet(tiny)),) for k, v in m.state_dict().items()}
    assert sum(not torch.equal(ref[k], v) for k, v in plain.items()) >= 20  # the LoRA moved the UNet
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
    back = convert(dif, tmp_path / "back.safetensors", to="kohya", layout=lay, log=lambda s: None).path
    out, meta2 = load_file(back)
    assert "lora_adapter_metadata" not in meta2 and module_keys(out) == module_keys(sd)
    for k in module_keys(sd):
        torch.testing.assert_close(kohya_delta(out, k), kohya_delta(sd, k), msg=k)
    if family == "sdxl":  # SGM <-> diffusers UNet spelling, half precision
        d = convert(src, tmp_path / "dnames.safetensors", unet_names="diffusers", dtype=torch.float16,
                    layout=lay, log=lambda s: None).path
        dk, _ = load_file(d)
        assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in dk)
        assert not any(k.startswith("lora_unet_input_blocks") for k in dk)
        assert all(v.dtype == torch.float16 for v in dk.values())
        sgm = convert(d, tmp_path / "sgm.safetensors", unet_names="sgm", dtype=F32, layout=lay,
                      log=lambda s: None).path
        assert module_keys(load_file(sgm)[0]) == module_keys(sd)


# --------------------------------------------------------------------------- extract


def tuned_copy(base: Path, out: Path, lay_keys: dict[str, torch.Tensor]) -> Path:
    """``base`` with ``lay_keys`` (file key -> delta) added, written through the stream writer."""
    with TensorFile(base) as tf, StreamWriter(out, [(k, tf.dtype(k), tf.shape(k)) for k in tf.keys()]) as w:
        for k in w.order:
            t = tf.get(k)
            if k in lay_keys:
                t = (t.float() + lay_keys[k].reshape(t.shape)).to(t.dtype)
            w.write(k, t)
    return out


def test_extract_recovers_a_known_low_rank_delta(sd1, tmp_path):
    _, lay, f32, _ = sd1
    from lib_lora.tools import layout as layouts
    with TensorFile(f32) as tf:
        clay = layouts.from_checkpoint(tf)
    g = torch.Generator().manual_seed(11)
    chosen = [l for l in clay.layers if l.role == "attn" and len(l.shape) >= 2][::3]
    known = {}
    for l in chosen:
        out_f, cols = l.shape[0], int(torch.tensor(l.shape[1:]).prod())
        known[l.key] = (torch.randn(out_f, 2, generator=g) @ torch.randn(2, cols, generator=g)) * 0.05
    tuned = tuned_copy(f32, tmp_path / "tuned.safetensors", {l.file_key: known[l.key] for l in chosen})
    lines = []
    r = extract(f32, tuned, tmp_path / "x.safetensors", rank=4, clamp=1.0, dtype=F32, log=lines.append)
    out, meta = load_file(r.path)
    assert module_keys(out) == sorted(known) and not r.text_encoder
    assert any("text encoder unchanged" in line for line in lines)
    for k, d in known.items():
        torch.testing.assert_close(kohya_delta(out, k), d, atol=1e-5, rtol=1e-4, msg=k)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert r.result.kept == pytest.approx(1.0, abs=1e-6)

    # default clamp: both factors clamped to +-(the 0.99 quantile of their values), kohya's published rule
    c = extract(f32, tuned, tmp_path / "c.safetensors", rank=1, dtype=F32, log=lambda s: None)
    cl = load_file(c.path)[0]
    k = sorted(known)[0]
    u, s, vh = torch.linalg.svd(known[k], full_matrices=False)
    up, down = u[:, :1] * s[:1], vh[:1]
    import numpy as np
    hi = float(np.quantile(torch.cat([up.flatten(), down.flatten()]).numpy(), 0.99))
    want = up.clamp(-hi, hi) @ down.clamp(-hi, hi)
    torch.testing.assert_close(kohya_delta(cl, k), want, atol=1e-5, rtol=1e-4)
    assert float(cl[f"{k}.lora_up.weight"].abs().max()) <= hi * (1 + 1e-5)
    assert not torch.allclose(want, up @ down, atol=1e-6)  # the clamp did cut something


# --------------------------------------------------------------------------- bake


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_baked_checkpoint_renders_like_the_runtime_merge(sd1, tmp_path, precision):
    _, lay, f32, f16 = sd1
    base = f32 if precision == "fp32" else f16
    a = kohya_lora(lay.mm, rank=4, alpha=2.0, seed=12, convs=True, only=KOHYA_TARGETS, scale=0.3)
    keys = [k for k in module_keys(a) if k.endswith("attn2_to_v")][:2]
    loha = loha_sd(lay, keys, rank=2, seed=13)
    pa = save_safetensors(a, tmp_path / "a.safetensors")
    pb = save_safetensors(loha, tmp_path / "b.safetensors")
    out = tmp_path / "baked.safetensors"
    r = bake(base, [f"{pa}:0.8", f"{pb}:te=0.5:unet=-1"], out, log=lambda s: None)
    h_in, h_out = read_header(base), read_header(out)
    assert h_in.shapes == h_out.shapes
    assert {k: v["dtype"] for k, v in h_in.tensors.items()} == {k: v["dtype"] for k, v in h_out.tensors.items()}
    assert h_out.metadata["modelspec.hash_sha256"] == "0x" + addnet_hash_safetensors(out)
    assert r.sha256 == sha256_file(out) and r.sha256 != sha256_file(base)
    assert [b["file"] for b in json.loads(h_out.metadata["ss_baked_loras"])] == ["a.safetensors", "b.safetensors"]

    ref = load_checkpoint(base)
    mm = ModelMap.build("sd1", ref.unet, ref.text_encoders)
    p = Patcher(mm)
    assert not p.apply([activation(load_network(pa), 0.8, 0.8), activation(load_network(pb), 0.5, -1)]).messages
    baked = load_checkpoint(out)
    ref_sd, baked_sd = ref.state_dict(), baked.state_dict()
    changed = 0
    for k, v in ref_sd.items():
        if precision == "fp32":
            torch.testing.assert_close(baked_sd[k], v, atol=1e-6, rtol=1e-6, msg=k)
        else:  # the file rounds the merged weight to fp16 once
            torch.testing.assert_close(baked_sd[k], v.half().float(), atol=0, rtol=0, msg=k)
        changed += not torch.equal(baked_sd[k], load_checkpoint(base).state_dict()[k]) if "attn2_to_v" in k else 0
    imgs = [sample(c, ["a cat", "a dog"], steps=3, seed=2, width=PX, height=PX) for c in (ref, baked)]
    p.restore()
    plain = sample(ref, ["a cat", "a dog"], steps=3, seed=2, width=PX, height=PX)
    for x, y, z in zip(*imgs, plain):
        diff = (torch.tensor(list(x.getdata())).float() - torch.tensor(list(y.getdata())).float()).abs()
        assert float(diff.max()) <= (1 if precision == "fp32" else 3)
        assert x.tobytes() != z.tobytes()  # the LoRAs do change the image


# --------------------------------------------------------------------------- SD2 (OpenCLIP) and SDXL


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def fam_ck(request, tmp_path_factory):
    """(family, fp32 checkpoint file, its layout with file keys) for tiny SD2 and SDXL models."""
    from lib_lora.tools import layout as layouts
    fam = request.param
    tiny = {"sd2": tm.build_sd2, "sdxl": tm.build_sdxl}[fam](seed=21)
    ck = Checkpoint.from_modules(fam, tiny.unet, tiny.text_encoders, tiny_vae())
    path = save_checkpoint(ck, tmp_path_factory.mktemp(fam) / f"{fam}.safetensors", dtype=F32, yaml=False)
    with TensorFile(path) as tf:
        return fam, path, layouts.from_checkpoint(tf)


def tuned_by_layer(base: Path, out: Path, deltas: dict) -> Path:
    """``base`` with each layer's delta added to its rows of the file's tensor (fused q/k/v in part)."""
    by_key: dict[str, list] = {}
    for layer, d in deltas.items():
        by_key.setdefault(layer.file_key, []).append((layer, d))
    with TensorFile(base) as tf, StreamWriter(out, [(k, tf.dtype(k), tf.shape(k)) for k in tf.keys()]) as w:
        for k in w.order:
            t = tf.get(k)
            if k in by_key:
                t = t.float().clone()
                for layer, d in by_key[k]:
                    view = t if layer.target.rows is None else t[layer.target.rows]
                    view += d.reshape(view.shape)
            w.write(k, t)
    return out


def test_extract_recovers_a_known_delta_on_sd2_and_sdxl_layers(fam_ck, tmp_path):
    fam, base, clay = fam_ck
    te = [l for l in clay.layers if l.role == "te" and len(l.shape) == 2]
    fused = [l for l in te if l.target.rows is not None][:3]       # OpenCLIP's in_proj: q, k and v rows
    chosen = fused + te[4::7] + [l for l in clay.layers if l.role == "attn" and len(l.shape) >= 2][::5]
    assert len(fused) == 3 and {l.target.rows.start // l.shape[0] for l in fused} == {0, 1, 2}
    comps = {l.component for l in chosen}
    assert comps == ({"te", "unet"} if fam == "sd2" else {"te1", "te2", "unet"})
    g = torch.Generator().manual_seed(22)
    known = {}
    for l in chosen:
        cols = int(torch.tensor(l.shape[1:]).prod())
        known[l] = (torch.randn(l.shape[0], 2, generator=g) @ torch.randn(2, cols, generator=g)) * 0.05
    tuned = tuned_by_layer(base, tmp_path / "tuned.safetensors", known)
    r = extract(base, tuned, tmp_path / "x.safetensors", rank=4, clamp=1.0, dtype=F32, log=lambda s: None)
    out, meta = load_file(r.path)
    assert module_keys(out) == sorted(l.key for l in known) and r.text_encoder
    for l, d in known.items():
        torch.testing.assert_close(kohya_delta(out, l.key), d, atol=1e-5, rtol=1e-4, msg=l.key)
    assert meta["ss_base_model_version"] == {"sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[fam]
    # the file as the runtime reads it: the base with it merged is the tuned checkpoint
    ref, want = load_checkpoint(base), load_checkpoint(tuned).state_dict()
    p = Patcher(ModelMap.build(fam, ref.unet, ref.text_encoders))
    assert not p.apply([activation(load_network(r.path))]).messages
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-4, msg=k)


def test_bake_equals_the_runtime_merge_on_sd2_and_sdxl(fam_ck, tmp_path):
    fam, base, clay = fam_ck
    a = kohya_lora(clay.mm, rank=4, alpha=2.0, seed=23, convs=True, only=KOHYA_TARGETS, scale=0.3)
    keys = [k for k in module_keys(a) if k.endswith(("self_attn_k_proj", "attn2_to_v"))][::2]
    assert any("_te" in k for k in keys)
    loha = loha_sd(clay, keys, rank=2, seed=24)
    pa = save_safetensors(a, tmp_path / "a.safetensors")
    pb = save_safetensors(loha, tmp_path / "b.safetensors")
    out = tmp_path / "baked.safetensors"
    bake(base, [f"{pa}:0.8", f"{pb}:te=0.5:unet=-1"], out, log=lambda s: None)
    h_in, h_out = read_header(base), read_header(out)
    assert h_in.shapes == h_out.shapes
    assert h_out.metadata["modelspec.architecture"].startswith({"sd2": "stable-diffusion-v2",
                                                                "sdxl": "stable-diffusion-xl"}[fam])
    ref = load_checkpoint(base)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    p = Patcher(ModelMap.build(fam, ref.unet, ref.text_encoders))
    assert not p.apply([activation(load_network(pa), 0.8, 0.8), activation(load_network(pb), 0.5, -1)]).messages
    baked = load_checkpoint(out).state_dict()
    changed = set()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(baked[k], v, atol=1e-6, rtol=1e-6, msg=k)
        if not torch.equal(v, original[k]):
            changed.add(k)
    fused = "in_proj_weight"  # SD2's and SDXL's OpenCLIP keep q/k/v in one tensor
    assert any(k.endswith(fused) for k in changed) and any("diffusion_model" in k for k in changed)


# --------------------------------------------------------------------------- refusals


def test_bad_inputs_get_named_errors_and_no_output(sd1, tmp_path):
    tiny, lay, f32, f16 = sd1
    a = kohya_lora(lay.mm, rank=2, seed=14, only=("attn1_to_q",))
    pa = save_safetensors(a, tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"

    xl = tm.build_sdxl()
    xl_sd = kohya_lora(ModelMap.build("sdxl", xl.unet, xl.text_encoders), rank=2, only=("attn1_to_q",))
    pxl = save_safetensors(xl_sd, tmp_path / "xl.safetensors")
    with pytest.raises(common.FamilyMismatchError, match="SDXL"):
        bake(f32, [str(pxl)], out, log=lambda s: None)
    with pytest.raises(common.FamilyMismatchError):
        merge([str(pa), str(pxl)], out, layout=lay, log=lambda s: None)
    bad = dict(a)
    bad["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    bad["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    pbad = save_safetensors(bad, tmp_path / "bad.safetensors")
    with pytest.raises(common.UnknownKeysError, match="no_such_layer"):
        bake(f32, [str(pbad)], out, log=lambda s: None)
    with pytest.raises(common.UnknownKeysError, match="no_such_layer"):
        resize(pbad, out, rank=1, layout=lay, log=lambda s: None)
    pemb = save_safetensors({**a, "bundle_emb.star.string_to_param.*": torch.zeros(1, 8)}, tmp_path / "emb.safetensors")
    with pytest.raises(common.UnknownKeysError, match="embeddings \\(star\\)"):  # not dropped silently
        resize(pemb, out, rank=1, layout=lay, log=lambda s: None)
    assert not out.exists()
    with pytest.raises(common.ToolError, match="overwrite an input"):
        resize(pa, pa, rank=1, layout=lay, force=True, log=lambda s: None)
    with pytest.raises(common.ToolError, match="overwrite an input"):
        bake(f32, [str(pa)], f32, force=True, log=lambda s: None)
    # a checkpoint of another family, or another shape, is not a fine-tune of this one
    xl_ck = save_checkpoint(Checkpoint.from_modules("sdxl", xl.unet, xl.text_encoders, tiny_vae()),
                            tmp_path / "xl-ck.safetensors", yaml=False)
    with pytest.raises(common.CheckpointMismatchError, match="sd1.*sdxl"):
        extract(f32, xl_ck, out, log=lambda s: None)
    with TensorFile(f32) as tf:  # same family, one layer of another shape
        key = next(k for k in tf.keys() if k.endswith("attn2.to_k.weight"))
        specs = [(k, tf.dtype(k), tf.shape(k) if k != key else (tf.shape(k)[0], 8)) for k in tf.keys()]
        with StreamWriter(tmp_path / "odd.safetensors", specs) as w:
            for k in w.order:
                w.write(k, tf.get(k) if k != key else torch.zeros(tf.shape(k)[0], 8))
    with pytest.raises(common.CheckpointMismatchError, match="attn2"):
        extract(f32, w.path, out, log=lambda s: None)
    assert not out.exists()
    existing = save_safetensors(a, tmp_path / "exists.safetensors")
    with pytest.raises(FileExistsError, match="--force"):
        resize(pa, existing, rank=1, layout=lay, log=lambda s: None)
    # a failure half-way through a bake leaves nothing behind, not even a temp file
    orig_get = TensorFile.get
    calls = {"n": 0}

    def failing_get(self, key):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk read error")
        return orig_get(self, key)

    TensorFile.get = failing_get
    try:
        with pytest.raises(OSError, match="disk read error"):
            bake(f16, [str(pa)], out, log=lambda s: None)
    finally:
        TensorFile.get = orig_get
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_stream_writer_files_load_with_safetensors(tmp_path):
    from safetensors.torch import load_file as st_load

    tensors = {"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(5, 3).half(), "c": torch.randn(7).double(),
               "d": torch.randn(2, 2).bfloat16(), "e": torch.tensor(1.5)}
    path = tmp_path / "s.safetensors"
    with StreamWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"x": "1"},
                      hash_key="modelspec.hash_sha256") as w:
        for k in w.order:
            w.write(k, tensors[k])
    back = st_load(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with TensorFile(path) as tf:
        assert all(torch.equal(tf.get(k), v) for k, v in tensors.items())
    assert read_header(path).metadata["modelspec.hash_sha256"] == "0x" + addnet_hash_safetensors(path)
    with pytest.raises(ValueError, match="not written"):
        with StreamWriter(tmp_path / "t.safetensors", [("a", torch.int8, (3,)), ("b", torch.int8, (1,))]) as w:
            w.write("a", tensors["a"])
    assert not (tmp_path / "t.safetensors").exists()


# --------------------------------------------------------------------------- memory and CLI

_PEAK = r"""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from lib_lora.tools import bake, extract, layout  # imports (ldm, transformers, open_clip) before the baseline
from lib_lora.fileio import TensorFile
with TensorFile({base!r}) as tf:
    layout.from_checkpoint(tf)

def peak_growth(run):
    status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS:")
    run()
    return status("VmHWM:") - before

print(peak_growth(lambda: bake.bake({base!r}, [{lora!r}], {out!r} + "-b.safetensors", log=lambda s: None)),
      peak_growth(lambda: extract.extract({base!r}, {tuned!r}, {out!r} + "-x.safetensors", rank=8,
                                          log=lambda s: None)))
"""


@pytest.fixture(scope="module")
def wide_sd1(sd1, tmp_path_factory):
    """An SD1-layout checkpoint of about 140 MB (the UNet at 64 channels, random), a tuned copy, a LoRA."""
    _, _, f32, _ = sd1
    root = tmp_path_factory.mktemp("wide")
    with torch.device("meta"):
        unet = tm.build_ldm_unet(dict(tm._unet_config("sd1"), model_channels=64))
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    paths = []
    for i, name in enumerate(("wide", "wide-tuned")):
        g = torch.Generator().manual_seed(0)
        with TensorFile(f32) as tf:
            specs = [(k, F32, s) for k, s in shapes.items()] + \
                [(k, tf.dtype(k), tf.shape(k)) for k in tf.keys() if not k.startswith("model.diffusion_model.")]
            with StreamWriter(root / f"{name}.safetensors", specs) as w:
                for k in w.order:
                    if k in shapes:
                        t = torch.randn(shapes[k], generator=g) * 0.05
                        w.write(k, t + 1e-3 * torch.randn(t.shape) if i and t.dim() > 1 else t)
                    else:
                        w.write(k, tf.get(k))
        paths.append(w.path)
    lay = Layout.from_modules("sd1", unet, [("te", tm.build_hf_clip())])
    lora = save_safetensors(kohya_lora(lay.mm, rank=8, convs=True, only=KOHYA_TARGETS), root / "l.safetensors")
    return paths[0], paths[1], lora


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_bake_and_extract_stream_within_a_bounded_memory(wide_sd1, tmp_path):
    base, tuned, lora = wide_sd1
    size = base.stat().st_size
    with TensorFile(base) as tf:
        largest = max(tf.nbytes(k) for k in tf.keys())
    code = _PEAK.format(root=str(ROOT), base=str(base), tuned=str(tuned), lora=str(lora), out=str(tmp_path / "o"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers leave RSS
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    grown = [int(x) for x in res.stdout.split()[-2:]]
    # loading whole would grow by the file size (extract: twice that); streaming by a few tensors
    assert size > 100e6 and largest < 10e6
    assert max(grown) < 8 * largest + 16e6, (grown, largest, size)


def test_cli_tools_help_and_run(sd1, tmp_path, capsys):
    from lib_lora.cli import build_parser, main

    for cmd in ("resize", "merge", "bake", "extract", "convert"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        assert "(default:" in text, cmd
    _, lay, f32, _ = sd1
    a = kohya_lora(lay.mm, rank=4, seed=15, only=("attn2",))
    pa = save_safetensors(a, tmp_path / "a.safetensors")
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(pa), "--out", str(out), "--rank", "2", "--base", str(f32), "--quiet"]) == 0
    assert "energy kept overall" in capsys.readouterr().out and out.exists()
    assert main(["resize", str(pa), "--out", str(out), "--rank", "2", "--base", str(f32)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["bake", str(f32), f"{pa}:0.5", "--out", str(tmp_path / "b.safetensors")]) == 0
    assert "AutoV2" in capsys.readouterr().out


def test_published_layouts_name_kohya_layers():
    """The real SD1.5 / SDXL layouts the tools use without --base: kohya keys, shapes, roles, diffusers names."""
    from lib_lora.tools.layout import for_family

    xl = for_family("sdxl")
    q = xl.get("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    assert q.shape == (640, 640) and q.role == "attn" and q.diffusers == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert xl.get("lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2") is not None  # depth 10
    assert xl.get("lora_te2_text_model_encoder_layers_31_self_attn_v_proj").shape == (1280, 1280)
    assert xl.get("lora_te2_text_model_encoder_layers_31_self_attn_v_proj").diffusers == \
        "text_model.encoder.layers.31.self_attn.v_proj"
    sd1 = for_family("sd1")
    conv = sd1.get("lora_unet_down_blocks_0_resnets_0_conv1")
    assert conv.shape == (320, 320, 3, 3) and conv.role == "resnet" and conv.is_conv3
    assert sd1.get("lora_te_text_model_encoder_layers_0_mlp_fc1").role == "te"


def test_cli_and_api_are_made_from_one_declaration_per_tool(capsys):
    """The sub-commands' arguments are the declared options, refused by the same rule as over the API."""
    import argparse

    from lib_lora.cli import build_parser, main
    from lib_lora.tools.options import TOOLS, OptionError, coerce

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, t in TOOLS.items():
        dests = {a.dest for a in sub.choices[name]._actions if a.dest != "help"}
        assert dests == {o.name for o in t.on("cli")}, name
        defaults = {a.dest: a.default for a in sub.choices[name]._actions if a.dest != "help"}
        for o in t.on("cli"):
            if not o.positional and o.type is not bool:
                assert defaults[o.name] == (None if o.required else o.default), (name, o.name)
    with pytest.raises(SystemExit):
        main(["extract", "a", "b", "--out", "c", "--clamp-quantile", "1.5"])
    cli_error = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(OptionError) as api_error:
        coerce(TOOLS["extract"], {"base": "a", "tuned": "b", "out": "c", "clamp_quantile": 1.5})
    assert cli_error.endswith("argument --clamp-quantile: " + api_error.value.detail)
