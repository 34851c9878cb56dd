"""Malformed adapter files, generated deterministically from (seed, index).

Each case starts from a valid file of one algorithm (LoRA, LoCon, Tucker LoCon, LoHa,
LoKr, IA3, full diff, norm, DoRA, PEFT/diffusers, fp16/bf16, .pt) for the tiny SD1
model of ``tests/tiny_models.py``, then applies one to three mutations at three
levels: the tensors (NaN, rank 0, wrong roles, huge alpha, bad DoRA/conv shapes ...),
the parsed header (lying dtypes, shapes, offsets; non-string metadata ...), and the
bytes (flips, truncation, a lying length, deep nesting, duplicate keys, 1e400 ...).
"""
from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# (kohya module key, weight shape) of tiny-SD1 layers the base files target
TE_Q = ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (32, 32))
TE_FC1 = ("lora_te_text_model_encoder_layers_0_mlp_fc1", (128, 32))
TE_LN = ("lora_te_text_model_encoder_layers_0_layer_norm1", (32,))
UNET_K = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", (64, 32))
CONV = ("lora_unet_down_blocks_1_resnets_0_conv1", (64, 32, 3, 3))
PROJ = ("lora_unet_down_blocks_0_attentions_0_proj_in", (32, 32, 1, 1))
NORM = ("lora_unet_down_blocks_0_resnets_0_norm1", (32,))
TARGETS = (TE_Q, TE_FC1, TE_LN, UNET_K, CONV, PROJ, NORM)

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
              getattr(torch, "float8_e4m3fn", None): "F8_E4M3", getattr(torch, "float8_e5m2", None): "F8_E5M2"}

Sd = dict[str, Tensor]
Meta = dict[str, Any]


# -- valid base files ------------------------------------------------------------------------------


def _lora(g, key, shape, r=4, alpha=2.0, conv_tucker=False) -> Sd:
    out, inn = shape[0], shape[1]
    k = tuple(shape[2:])
    sd: Sd = {}
    if conv_tucker:
        sd[f"{key}.lora_down.weight"] = torch.randn(r, inn, 1, 1, generator=g) * 0.1
        sd[f"{key}.lora_mid.weight"] = torch.randn(r, r, *k, generator=g) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(out, r, 1, 1, generator=g) * 0.1
    else:
        sd[f"{key}.lora_down.weight"] = torch.randn(r, inn, *k, generator=g) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(out, r, *([1] * len(k)), generator=g) * 0.1
    sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def _loha(g, key, shape, r=2, tucker=False) -> Sd:
    out, inn, k = shape[0], shape[1], tuple(shape[2:])
    sd: Sd = {f"{key}.alpha": torch.tensor(1.0)}
    for i in (1, 2):
        if tucker:
            sd[f"{key}.hada_t{i}"] = torch.randn(r, r, *k, generator=g) * 0.3
            sd[f"{key}.hada_w{i}_a"] = torch.randn(r, out, generator=g) * 0.3
            sd[f"{key}.hada_w{i}_b"] = torch.randn(r, inn, generator=g) * 0.3
        else:
            flat = inn * (int(torch.tensor(k).prod()) if k else 1)
            sd[f"{key}.hada_w{i}_a"] = torch.randn(out, r, generator=g) * 0.3
            sd[f"{key}.hada_w{i}_b"] = torch.randn(r, flat, generator=g) * 0.3
    return sd


def _lokr(g, key, shape, factored1=False, t2=False) -> Sd:
    out, inn, k = shape[0], shape[1], tuple(shape[2:])
    sd: Sd = {f"{key}.alpha": torch.tensor(2.0)}
    if factored1:
        sd[f"{key}.lokr_w1_a"] = torch.randn(4, 2, generator=g)
        sd[f"{key}.lokr_w1_b"] = torch.randn(2, 4, generator=g)
    else:
        sd[f"{key}.lokr_w1"] = torch.randn(4, 4, generator=g)
    o2, i2 = out // 4, inn // 4
    if t2:
        sd[f"{key}.lokr_t2"] = torch.randn(2, 2, *k, generator=g) * 0.1
        sd[f"{key}.lokr_w2_a"] = torch.randn(2, o2, generator=g) * 0.1
        sd[f"{key}.lokr_w2_b"] = torch.randn(2, i2, generator=g) * 0.1
    else:
        sd[f"{key}.lokr_w2_a"] = torch.randn(o2, 2, generator=g) * 0.1
        sd[f"{key}.lokr_w2_b"] = torch.randn(2, i2, *k, generator=g) * 0.1
    return sd


def _kohya_meta(rng: random.Random) -> Meta:
    return {"ss_output_name": "fuzz", "ss_network_dim": "4", "ss_network_alpha": "2.0",
            "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
            "ss_tag_frequency": json.dumps({"1_fuzz": {"fuzz": 3, "tag": 1}}),
            "ss_training_started_at": "1700000000", "ss_network_args": json.dumps({"algo": "lora"}),
            "sshs_model_hash": "%064x" % rng.getrandbits(256) if rng.random() < 0.3 else ""}


def _base(kind: str, g: torch.Generator, rng: random.Random) -> tuple[Sd, Meta, str]:
    """(state dict, metadata, extension) of a valid file of ``kind``."""
    meta = _kohya_meta(rng)
    ext = ".safetensors"
    if kind == "lora":
        sd = {**_lora(g, *TE_Q), **_lora(g, *UNET_K), **_lora(g, *PROJ, r=2)}
    elif kind == "locon":
        sd = {**_lora(g, *CONV), **_lora(g, *TE_FC1, r=8, alpha=8.0)}
    elif kind == "locon_tucker":
        sd = _lora(g, *CONV, conv_tucker=True)
    elif kind == "loha":
        sd = {**_loha(g, *TE_Q), **_loha(g, *CONV)}
    elif kind == "loha_tucker":
        sd = _loha(g, *CONV, tucker=True)
    elif kind == "lokr":
        sd = {**_lokr(g, *UNET_K), **_lokr(g, *CONV, factored1=True), **_lokr(g, *PROJ, t2=True)}
    elif kind == "ia3":
        sd = {f"{TE_FC1[0]}.weight": torch.randn(128, generator=g) * 0.1,
              f"{UNET_K[0]}.weight": torch.randn(32, generator=g) * 0.1, f"{UNET_K[0]}.on_input": torch.tensor(True)}
    elif kind == "full":
        sd = {f"{TE_Q[0]}.diff": torch.randn(32, 32, generator=g) * 0.01, f"{TE_Q[0]}.diff_b": torch.randn(32, generator=g),
              f"{PROJ[0]}.diff": torch.randn(32, 32, 1, 1, generator=g) * 0.01}
    elif kind == "norm":
        sd = {f"{TE_LN[0]}.w_norm": torch.randn(32, generator=g) * 0.1, f"{TE_LN[0]}.b_norm": torch.randn(32, generator=g),
              f"{NORM[0]}.w_norm": torch.randn(32, generator=g) * 0.1}
    elif kind == "dora":
        sd = {**_lora(g, *TE_Q), **_lora(g, *CONV)}
        sd[f"{TE_Q[0]}.dora_scale"] = torch.rand(32, 1, generator=g) + 0.5
        sd[f"{CONV[0]}.dora_scale"] = torch.rand(1, 32, 1, 1, generator=g) + 0.5
    elif kind == "peft":
        pre = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        sd = {f"{pre}.lora_A.weight": torch.randn(4, 32, generator=g) * 0.1,
              f"{pre}.lora_B.weight": torch.randn(32, 4, generator=g) * 0.1}
        meta = {"lora_adapter_metadata": json.dumps({"text_encoder.lora_alpha": 8,
                                                     "text_encoder.alpha_pattern": {"q_proj": 4}})}
    elif kind in ("fp16", "bf16"):
        dt = torch.float16 if kind == "fp16" else torch.bfloat16
        sd = {k: v.to(dt) for k, v in {**_lora(g, *TE_Q), **_loha(g, *UNET_K)}.items()}
    elif kind == "pt":
        sd, meta, ext = {**_lora(g, *TE_Q), **_lora(g, *CONV)}, {}, ".pt"
    else:
        raise KeyError(kind)
    return sd, meta, ext


KINDS = ("lora", "locon", "locon_tucker", "loha", "loha_tucker", "lokr", "ia3", "full", "norm", "dora", "peft",
         "fp16", "bf16", "pt")


# -- serialising with full control over the header -------------------------------------------------


def tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def build_header(sd: Sd, meta: Meta) -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {"__metadata__": dict(meta)} if meta else {}
    blob = bytearray()
    for k, t in sd.items():
        data = tensor_bytes(t)
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    return header, bytes(blob)


def pack(header_text: bytes, blob: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + blob


# -- mutations -------------------------------------------------------------------------------------


def _pick(rng: random.Random, d: dict) -> Any:
    return rng.choice(sorted(d)) if d else None


def _tensor_mutation(rng: random.Random, sd: Sd, meta: Meta) -> str:
    key = _pick(rng, sd)
    if key is None:
        return "empty"
    module, _, role = key.partition(".")
    t = sd[key]
    op = rng.choice(["nan", "inf", "rank0", "role", "alpha_huge", "alpha_bad", "alpha_vec", "dora_bad", "conv_bad",
                     "drop", "int", "swap", "transpose", "scalar", "extra_dim", "big_values", "mid_bad", "empty_dim",
                     "dup_module", "fp8", "bool", "f64", "rename"])
    if op in ("nan", "inf") and t.is_floating_point() and t.numel():
        t = t.clone().reshape(-1)
        t[rng.randrange(t.numel())] = float("nan") if op == "nan" else float("-inf" if rng.random() < .5 else "inf")
        sd[key] = t.reshape(sd[key].shape)
    elif op == "rank0":
        for k in [k for k in sd if k.startswith(module + ".") and not k.endswith(("alpha", "dora_scale", "on_input"))]:
            s = list(sd[k].shape)
            if len(s) >= 2:
                axis = 1 if k.endswith(("lora_up.weight", "hada_w1_a", "hada_w2_a", "lokr_w2_a", "lokr_w1_a")) else 0
                s[axis] = 0
                sd[k] = torch.zeros(s)
    elif op == "role":
        new = rng.choice(["lora_up.weight", "lora_down.weight", "lora_mid.weight", "hada_w1_a", "hada_t1", "lokr_w1",
                          "lokr_t2", "diff", "diff_b", "w_norm", "b_norm", "weight", "on_input", "alpha", "dora_scale",
                          "bias", "lokr_w2_b", "hada_w2_b"])
        sd[f"{module}.{new}"] = sd.pop(key)
    elif op == "alpha_huge":
        sd[f"{module}.alpha"] = torch.tensor(rng.choice([3.4e38, -3.4e38, 1e38, 1e30, 6e4]))
        if rng.random() < 0.5:
            sd[f"{module}.alpha"] = sd[f"{module}.alpha"].to(torch.float16 if rng.random() < .5 else torch.float64)
    elif op == "alpha_bad":
        sd[f"{module}.alpha"] = torch.tensor(rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-45]))
    elif op == "alpha_vec":
        sd[f"{module}.alpha"] = torch.ones(rng.choice([0, 2, 3]))
    elif op == "dora_bad":
        sd[f"{module}.dora_scale"] = rng.choice([torch.tensor(1.0), torch.ones(7), torch.ones(0), torch.ones(3, 3, 3),
                                                 torch.ones(1, 1), torch.ones(2, 1)])
    elif op == "conv_bad":
        sd[key] = torch.randn(*[max(1, d) for d in t.shape[:2]] or [3], rng.choice([2, 3, 5]), rng.choice([1, 3]))
    elif op == "drop":
        del sd[key]
    elif op == "int":
        sd[key] = t.to(torch.int64) if t.is_floating_point() else t
    elif op == "swap":
        other = _pick(rng, sd)
        sd[key], sd[other] = sd[other], t
    elif op == "transpose" and t.dim() >= 2:
        sd[key] = t.transpose(0, 1).contiguous()
    elif op == "scalar":
        sd[key] = torch.tensor(0.5)
    elif op == "extra_dim":
        sd[key] = t.unsqueeze(rng.randrange(t.dim() + 1))
    elif op == "big_values" and t.is_floating_point():
        sd[key] = (t.float() * rng.choice([1e19, 1e30, 3e38])).to(t.dtype)
    elif op == "mid_bad":
        sd[f"{module}.lora_mid.weight"] = torch.randn(*rng.choice([(2, 2), (4, 4, 3), (4, 3, 3, 3), (3, 4, 3, 3), (4, 4, 3, 3)]))
    elif op == "empty_dim":
        sd[key] = torch.zeros(*[0 if i == rng.randrange(max(t.dim(), 1)) else d for i, d in enumerate(t.shape)] or [0])
    elif op == "dup_module":
        sd[key.replace("lora_te_", "lora_te1_", 1) if "lora_te_" in key else "text_encoder." + key] = t
    elif op == "fp8" and t.is_floating_point():
        sd[key] = t.float().clamp(-400, 400).to(rng.choice([torch.float8_e4m3fn, torch.float8_e5m2])) \
            if hasattr(torch, "float8_e4m3fn") else t
    elif op == "bool":
        sd[key] = t != 0
    elif op == "f64":
        sd[key] = t.double()
    elif op == "rename":
        sd[rng.choice(["", ".", "lora_unet_", "lora_te_.alpha", "unet.", "lora_unet_x" * 50 + ".alpha",
                       "lora_unet_ünï.lora_down.weight", "base_model.model.unet.x.lora_A.weight"])] = sd.pop(key)
    return f"tensor:{op}"


_BIG = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" * 400, "1e-400", "9" * 20]


def _metadata_mutation(rng: random.Random, meta: Meta) -> str:
    op = rng.choice(["dim", "tags", "nonstr", "started", "args", "peft", "hash", "huge_text", "nested"])
    if op == "dim":
        meta[rng.choice(["ss_network_dim", "ss_network_alpha"])] = rng.choice(_BIG + ["abc", "", "4.5", "-3"])
    elif op == "tags":
        meta["ss_tag_frequency"] = rng.choice([
            '{"a": {"t": 1e400}}', '{"a": {"t": NaN}}', '{"a": {"t": -Infinity}}', '{"a": {"t": "1e400"}}',
            '{"a": [1, 2]}', '[1]', '{"a": {"t": 1' + "0" * 5000 + '}}', '{"a": {"t": 1.5}}', '{' * 5000,
            '{"a": ' * 3000 + "1" + "}" * 3000, '{"a": {"t": true}}', '{"a": {"\\ud800": 3}}'])
    elif op == "nonstr":
        meta[rng.choice(["ss_output_name", "ss_network_dim", "x"])] = rng.choice(
            [4, 1.5, None, True, [1, 2], {"a": 1}, "__RAW_1e400__"])
    elif op == "started":
        meta["ss_training_started_at"] = rng.choice(_BIG + ["-1e20", "253402300800"])
    elif op == "args":
        meta["ss_network_args"] = rng.choice(['{"algo": 5}', '{"algo": ["x"]}', "[", '"x"', '{"algo": "' + "a" * 10000 + '"}',
                                              '{"conv_dim": 1e400}', '{' * 3000 + '}' * 3000])
    elif op == "peft":
        meta["lora_adapter_metadata"] = rng.choice([
            "[]", "5", '"x"', "{", '{"text_encoder.lora_alpha": "x"}', '{"text_encoder.lora_alpha": [1]}',
            '{"text_encoder.lora_alpha": 1e400}', '{"text_encoder.lora_alpha": NaN}', '{"text_encoder.lora_alpha": 1e39}',
            '{"text_encoder.lora_alpha": 8, "text_encoder.alpha_pattern": [1]}',
            '{"text_encoder.lora_alpha": 8, "text_encoder.alpha_pattern": {"q_proj": {}}}',
            '{"text_encoder.lora_alpha": 8, "text_encoder.alpha_pattern": {"5": 1}}',
            '{"text_encoder.lora_alpha": true}', '{"text_encoder.lora_alpha": null}', "[" * 5000])
    elif op == "hash":
        meta["sshs_model_hash"] = rng.choice(["0" * 64, "zz", "", "<b>", "f" * 8])
    elif op == "huge_text":
        meta["ss_training_comment"] = "x" * rng.choice([10_000, 1_000_000])
    elif op == "nested":
        meta["ss_output_name"] = '{"a": ' * 2000 + "1" + "}" * 2000
    return f"meta:{op}"


def _header_mutation(rng: random.Random, header: dict[str, Any], data_len: int) -> str:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names) if names else None
    info = header.get(name) if name else None
    op = rng.choice(["dtype", "shape", "offsets", "entry", "metadata_type", "not_object", "extra_field", "empty",
                     "permute_shape"])
    if op == "dtype" and isinstance(info, dict):
        info["dtype"] = rng.choice(["F8_E4M3", "F8_E5M2", "f32", "F128", "", None, 5, ["F32"], {"a": 1}, "BF16",
                                    "I8", "U8", "BOOL", "F64", "C64", "U16", "U32", "U64", "F8_E8M0", "F4"])
    elif op == "shape" and isinstance(info, dict):
        info["shape"] = rng.choice([[-1], [0], [2 ** 63], [2 ** 70, 0], [0, 2 ** 62], [1.5], ["2"], [True], [[2]],
                                    None, 5, "ab", [], [1] * 40, [2 ** 31, 0], [data_len, 0], {"a": 1},
                                    [d for d in info.get("shape", [])][::-1] or [1]])
    elif op == "permute_shape" and isinstance(info, dict) and isinstance(info.get("shape"), list):
        s = list(info["shape"])
        rng.shuffle(s)
        info["shape"] = s + [1] * rng.randrange(3)
    elif op == "offsets" and isinstance(info, dict):
        o = info.get("data_offsets") or [0, 0]
        info["data_offsets"] = rng.choice([[o[1], o[0]], [-4, o[1] - 4], [o[0] + 1, o[1] + 1], [o[0], o[1] + 2 ** 64],
                                           [0.0, float(o[1] - o[0])], [str(o[0]), str(o[1])], [o[0]], [o[0], o[1], 3],
                                           None, [True, False], [2 ** 63, 2 ** 63], [o[0], o[1] + 1], "0-4", {}])
    elif op == "entry" and name:
        header[name] = rng.choice([None, 5, "x", [], [1, 2, 3], {}, {"dtype": "F32"}])
    elif op == "metadata_type":
        header["__metadata__"] = rng.choice([[], "x", 5, None, {"a": {"b": 1}}, {"a": None}, {"": ""}])
    elif op == "not_object":
        header.clear()
        header["__REPLACE__"] = rng.choice(["[]", "5", '"x"', "null", "true"])
    elif op == "extra_field" and isinstance(info, dict):
        info[rng.choice(["extra", "dtype2", ""])] = rng.choice([1, None, "x", [1]])
    elif op == "empty":
        header.clear()
    return f"header:{op}"


def _text_mutation(rng: random.Random, text: str) -> tuple[str, str]:
    op = rng.choice(["nest", "dup", "raw_number", "unicode", "nan_const", "trailing", "bom", "ws"])
    if op == "nest":
        depth = rng.choice([500, 2000, 100_000])
        return text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}", "text:nest"
    if op == "dup":
        i = text.find("{", 1)
        j = text.find('"', 1)
        if j > 0:
            end = text.find("}", j) + 1
            entry = text[j:end] if end > 0 and i > 0 else ""
            if entry and "__metadata__" not in entry[:16]:
                return text[:-1] + ", " + entry + "}", "text:dup"
        return '{"a": 1, "a": 2}', "text:dup"
    if op == "raw_number":
        return text.replace('"data_offsets": [0,', '"data_offsets": [1e400,', 1) if rng.random() < 0.5 \
            else text.replace('"shape": [', '"shape": [1e400, ', 1), "text:raw_number"
    if op == "unicode":
        return text.replace('"F32"', '"F32\\u0000"', 1).replace('"alpha"', '"\\ud800"', 1), "text:unicode"
    if op == "nan_const":
        return text.replace('"shape": [', '"shape": [NaN, ', 1), "text:nan_const"
    if op == "trailing":
        return text + rng.choice(["x", " ", "}", "\0"]), "text:trailing"
    if op == "bom":
        return "\ufeff" + text, "text:bom"
    return text + " " * rng.randrange(1, 9), "text:ws"


def _byte_mutation(rng: random.Random, data: bytearray, header_len: int) -> str:
    op = rng.choice(["flip_header", "flip_data", "truncate", "length_lie", "append", "zero_fill", "length_huge"])
    if op == "flip_header" and 0 < header_len and len(data) > 8:
        for _ in range(rng.randint(1, 8)):
            i = 8 + rng.randrange(min(header_len, len(data) - 8))
            data[i] ^= 1 << rng.randrange(8)
    elif op == "flip_data" and len(data) > 8 + header_len:
        for _ in range(rng.randint(1, 32)):
            i = rng.randrange(8 + header_len, len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del data[rng.randrange(len(data) + 1):]
    elif op == "length_lie":
        data[:8] = struct.pack("<Q", max(0, header_len + rng.choice([-9, -1, 1, 7, 1000])))
    elif op == "length_huge":
        data[:8] = struct.pack("<Q", rng.choice([2 ** 63, 2 ** 64 - 1, 100 * 1024 * 1024 + 1]))
    elif op == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif op == "zero_fill" and len(data) > 8:
        i = rng.randrange(8, len(data))
        data[i:i + rng.randrange(1, 64)] = b"\0" * len(data[i:i + 64])
    return f"bytes:{op}"


def _pt_mutation(rng: random.Random, sd: Sd) -> tuple[Any, str]:
    op = rng.choice(["plain", "nonstr_values", "nested", "state_dict", "list", "int_keys", "sparse", "complex",
                     "tensor_only", "noncontig", "bytes"])
    key = _pick(rng, sd)
    if op == "nonstr_values":
        return {**sd, "x": rng.choice([1, "a", None, [1], {"a": torch.ones(1)}])}, f"pt:{op}"
    if op == "nested":
        return {"a": {"b": sd}}, f"pt:{op}"
    if op == "state_dict":
        return {"state_dict": sd, "epoch": 3}, f"pt:{op}"
    if op == "list":
        return list(sd.values()), f"pt:{op}"
    if op == "int_keys":
        return {**sd, 5: torch.ones(1)}, f"pt:{op}"
    if op == "sparse" and key:
        return {**sd, key: sd[key].to_sparse()}, f"pt:{op}"
    if op == "complex" and key:
        return {**sd, key: sd[key].to(torch.complex64)}, f"pt:{op}"
    if op == "tensor_only":
        return torch.ones(3), f"pt:{op}"
    if op == "noncontig" and key and sd[key].dim() >= 2:
        return {**sd, key: sd[key].transpose(0, 1)}, f"pt:{op}"
    if op == "bytes":
        return b"not a pickle" * rng.randrange(1, 9), f"pt:{op}"
    return sd, "pt:plain"


# -- one case --------------------------------------------------------------------------------------


def make_case(seed: int, index: int, folder: Path) -> tuple[Path, list[str]]:
    """Write case ``index`` of ``seed`` into ``folder``; returns its path and the mutations applied."""
    rng = random.Random(seed * 1_000_003 + index)
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    kind = KINDS[index % len(KINDS)]
    sd, meta, ext = _base(kind, g, rng)
    path = folder / f"case{index:05d}-{kind}{ext}"
    steps = [f"base:{kind}"]
    n = rng.choice([0, 1, 1, 1, 2, 2, 3]) if index >= len(KINDS) else 0  # the first round: unmutated bases
    levels = [rng.choice(["tensor", "tensor", "meta", "header", "text", "bytes", "bytes"]) for _ in range(n)]
    for _ in range(levels.count("tensor")):
        steps.append(_tensor_mutation(rng, sd, meta))
    if ext == ".pt":
        obj, step = _pt_mutation(rng, sd)
        steps.append(step)
        buf = io.BytesIO()
        if isinstance(obj, bytes):
            buf.write(obj)
        else:
            torch.save(obj, buf)
        data = bytearray(buf.getvalue())
        for _ in range(levels.count("bytes")):
            steps.append(_byte_mutation(rng, data, 0))
        path.write_bytes(bytes(data))
        return path, steps
    for _ in range(levels.count("meta")):
        steps.append(_metadata_mutation(rng, meta))
    header, blob = build_header(sd, meta)
    for _ in range(levels.count("header")):
        steps.append(_header_mutation(rng, header, len(blob)))
    if "__REPLACE__" in header:
        text = header["__REPLACE__"]
    else:
        text = json.dumps(header, allow_nan=True).replace('"__RAW_1e400__"', "1e400")
    for _ in range(levels.count("text")):
        text, step = _text_mutation(rng, text)
        steps.append(step)
    raw = text.encode("utf-8", "surrogatepass")
    data = bytearray(pack(raw, blob))
    for _ in range(levels.count("bytes")):
        steps.append(_byte_mutation(rng, data, len(raw)))
    path.write_bytes(bytes(data))
    return path, steps


# -- a library folder ------------------------------------------------------------------------------


def make_library(seed: int, root: Path, outside: Path, n_files: int = 24) -> dict[str, list[str]]:
    """A LoRA folder of mutated files plus symlink loops, links out of it and odd directory entries.

    Returns {"inside": real files that must each get an entry, "outside": names that must not
    be indexed by default}.
    """
    import os

    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    inside: list[str] = []
    for i in range(n_files):
        sub = root / rng.choice(["", "a", "a/b", "c"])
        sub.mkdir(parents=True, exist_ok=True)
        p, _ = make_case(seed, rng.randrange(10_000), sub)
        p = p.rename(sub / f"f{i}{p.suffix}")
        inside.append(p.relative_to(root).as_posix())
    secret = outside / "secret.safetensors"
    secret.write_bytes(pack(*_header_bytes({**_lora(torch.Generator().manual_seed(0), *TE_Q)}, {})))
    (outside / "d").mkdir(exist_ok=True)
    (outside / "d" / "ext.safetensors").write_bytes(secret.read_bytes())
    links = {"self1": ".", "self2": ".", "a/up": "..", "a/b/loop": "../..", "c/rootloop": str(root)}
    for name, to in links.items():
        os.symlink(to, root / name)
    os.symlink(secret, root / "linked_out.safetensors")
    os.symlink("/etc/passwd", root / "passwd.safetensors")
    os.symlink(outside / "d", root / "outdir")
    os.symlink(root / "missing.safetensors", root / "dangling.safetensors")
    (root / "dir.safetensors").mkdir()
    os.mkfifo(root / "fifo.safetensors")
    deep = root
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "too_deep.safetensors").write_bytes(secret.read_bytes())
    return {"inside": inside, "outside": ["linked_out", "passwd", "outdir/ext"], "deep": [deep.relative_to(root).as_posix()]}


def _header_bytes(sd: Sd, meta: Meta) -> tuple[bytes, bytes]:
    header, blob = build_header(sd, meta)
    return json.dumps(header).encode(), blob


__all__ = ["KINDS", "TARGETS", "make_case", "make_library", "build_header", "pack"]
