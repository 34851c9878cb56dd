"""The architecture config of a single-file SD1/SD2/SDXL checkpoint, and its inference from shapes.

File layout (what the WebUI, kohya and ComfyUI read)::

    model.diffusion_model.*                                  UNet
    cond_stage_model.transformer.text_model.*                SD1 CLIP-L
    cond_stage_model.model.*                                 SD2 OpenCLIP
    conditioner.embedders.0.transformer.text_model.*         SDXL CLIP-L
    conditioner.embedders.1.model.*                          SDXL OpenCLIP bigG
    first_stage_model.*                                      VAE (ldm names)

Architecture config (``Checkpoint.config``)::

    {"family": "sd1" | "sd2" | "sdxl",
     "unet": {ldm/sgm UNetModel kwargs},
     "text_encoders": [{"prefix": "te"|"te1"|"te2", "kind": "hf_clip"|"open_clip", "width", "layers",
                        "heads", "vocab_size", "context_length", + "intermediate", "act" (hf_clip)
                        or "mlp_ratio", "embed_dim" (open_clip)}],
     "vae": {"embed_dim": 4, "ddconfig": {ldm ddconfig}},
     "prediction": "epsilon" | "v", "scale_factor": 0.18215 | 0.13025,
     "schedule": {"linear_start", "linear_end", "timesteps"}, "resolution": 512,
     "size_embed_dim": 256}                                   # SDXL size/crop embedding width

Attention head counts are not stored in weights: inference uses the real models' values (SD1
UNet 8 heads, SD2/SDXL UNet 64-channel heads, text encoders 64-wide heads) and, for toy widths
under 128, 2 heads; a yaml or explicit config overrides that.
"""
from __future__ import annotations

import copy
import re
from typing import Any

from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (kohya prefix, file prefix, kind) per family, in conditioner order
TEXT_LAYOUT: dict[str, list[tuple[str, str, str]]] = {
    "sd1": [("te", "cond_stage_model.transformer.", "hf_clip")],
    "sd2": [("te", "cond_stage_model.model.", "open_clip")],
    "sdxl": [("te1", "conditioner.embedders.0.transformer.", "hf_clip"),
             ("te2", "conditioner.embedders.1.model.", "open_clip")],
}
SCALE_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
SCHEDULE = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
SIZE_EMBED_DIM = 256           # sgm ConcatTimestepEmbedderND outdim for SDXL
BOS, EOS = 49406, 49407        # <|startoftext|>, <|endoftext|> in the CLIP BPE vocabulary

# HF CLIP keys some merged SD1 files carry without the ``text_model.`` level (the WebUI renames them too)
_SD1_TE_RENAMES = (("embeddings.", "text_model.embeddings."), ("encoder.", "text_model.encoder."),
                   ("final_layer_norm.", "text_model.final_layer_norm."))

# sgm UNet options that pick an implementation (or none), not weights; ldm's UNetModel lacks them
SGM_ONLY_UNET_OPTIONS = ("spatial_transformer_attn_type", "use_fp16", "use_fairscale_checkpoint", "offload_to_cpu")


class ArchitectureError(ValueError):
    """A checkpoint whose architecture cannot be determined or does not match its config."""



def infer_family(keys: set[str] | list[str]) -> str:
    """"sd1", "sd2" or "sdxl" from the file's key prefixes; unsupported layouts get a named error."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET_PREFIX):
        raise ArchitectureError("cannot infer architecture: no UNet weights (model.diffusion_model.*); "
                                "is this a full Stable Diffusion checkpoint?")
    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ArchitectureError("cannot infer architecture: SDXL refiner / single-OpenCLIP sgm checkpoints "
                                "are not supported")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ArchitectureError("cannot infer architecture: no known text-encoder keys (expected "
                            "cond_stage_model.transformer.* (SD1), cond_stage_model.model.* (SD2) or "
                            "conditioner.embedders.{0,1}.* (SDXL))")


def strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix``, with it removed (one component's state dict)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys: Any, pattern: str) -> list[int]:
    """Sorted distinct N in keys matching ``pattern`` (a regex with one ``(\\d+)`` group, anchored at the start)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _heads(width: int) -> int:
    # Real CLIP-L / OpenCLIP-H / bigG use 64-wide heads; toy models (tests) use 2 heads.
    return width // 64 if width >= 128 and width % 64 == 0 else 2


def _shape(sd: dict[str, Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        raise ArchitectureError(f"cannot infer architecture: {what} weight {key!r} is missing")
    return tuple(sd[key].shape)


def infer_unet(u: dict[str, Tensor], family: str) -> dict[str, Any]:
    """ldm/sgm ``UNetModel`` kwargs from a UNet state dict (names without ``model.diffusion_model.``)."""
    mc, in_ch = _shape(u, "input_blocks.0.0.weight", "UNet")[:2]
    out_ch = _shape(u, "out.2.weight", "UNet")[0]
    levels: list[dict[str, Any]] = [{"res": 0, "width": None, "depth": 0}]
    context_dim = linear = None
    for i in _indices(u, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in u:  # a downsampler closes the level
            levels.append({"res": 0, "width": None, "depth": 0})
            continue
        lv = levels[-1]
        lv["res"] += 1
        lv["width"] = _shape(u, f"input_blocks.{i}.0.out_layers.3.weight", "UNet")[0]
        depth = len(_indices(u, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        lv["depth"] = max(lv["depth"], depth)
        if depth and context_dim is None:
            context_dim = _shape(u, f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight", "UNet")[1]
            linear = len(_shape(u, f"input_blocks.{i}.1.proj_in.weight", "UNet")) == 2
    if context_dim is None or any(lv["width"] is None for lv in levels):
        raise ArchitectureError("cannot infer architecture: UNet has no cross-attention or an empty level")
    if any(lv["width"] % mc for lv in levels):
        raise ArchitectureError(f"cannot infer architecture: level widths {[lv['width'] for lv in levels]} "
                                f"are not multiples of model_channels {mc}")
    res = [lv["res"] for lv in levels]
    depths = [lv["depth"] for lv in levels]
    middle = len(_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    attn = [2 ** i for i, d in enumerate(depths) if d][::-1]
    cfg: dict[str, Any] = dict(image_size=32, in_channels=in_ch, out_channels=out_ch, model_channels=mc,
                               attention_resolutions=attn, num_res_blocks=res[0] if len(set(res)) == 1 else res,
                               channel_mult=[lv["width"] // mc for lv in levels], use_spatial_transformer=True,
                               context_dim=context_dim, use_checkpoint=False, legacy=False)
    if family == "sd1":  # v1-inference.yaml: num_heads 8
        cfg["num_heads"] = 8 if mc >= 128 else 2
    else:                # v2 / sd_xl_base: num_head_channels 64
        cfg["num_head_channels"] = 64 if mc >= 128 else mc // 2
    if linear:
        cfg["use_linear_in_transformer"] = True
    attn_depths = {d for d in depths if d}
    if attn_depths == {middle}:
        cfg["transformer_depth"] = middle
    else:  # SDXL: [0, 2, 10] (sgm per-level depths)
        cfg["transformer_depth"] = depths
        cfg["transformer_depth_middle"] = middle
    if "label_emb.0.0.weight" in u:
        cfg["num_classes"] = "sequential"
        cfg["adm_in_channels"] = _shape(u, "label_emb.0.0.weight", "UNet")[1]
    elif any(k.startswith("label_emb.") for k in u):
        raise ArchitectureError("cannot infer architecture: class-conditional UNet (label_emb) is not supported")
    return cfg


def _infer_hf_clip(t: dict[str, Tensor], prefix: str) -> dict[str, Any]:
    vocab, width = _shape(t, "text_model.embeddings.token_embedding.weight", "text encoder")
    layers = len(_indices(t, r"text_model\.encoder\.layers\.(\d+)\."))
    if not layers:
        raise ArchitectureError("cannot infer architecture: HF CLIP text encoder has no layers")
    return dict(prefix=prefix, kind="hf_clip", width=width, layers=layers, heads=_heads(width), vocab_size=vocab,
                context_length=_shape(t, "text_model.embeddings.position_embedding.weight", "text encoder")[0],
                intermediate=_shape(t, "text_model.encoder.layers.0.mlp.fc1.weight", "text encoder")[0],
                act="quick_gelu")  # CLIP-L (SD1, SDXL te1) uses quick_gelu


def _infer_open_clip(t: dict[str, Tensor], prefix: str) -> dict[str, Any]:
    vocab, width = _shape(t, "token_embedding.weight", "text encoder")
    layers = len(_indices(t, r"transformer\.resblocks\.(\d+)\."))
    if not layers:
        raise ArchitectureError("cannot infer architecture: OpenCLIP text encoder has no resblocks")
    hidden = _shape(t, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
    # SD2 never uses text_projection; files without it still load (see checkpoint.load_checkpoint)
    embed = t["text_projection"].shape[1] if "text_projection" in t else width
    return dict(prefix=prefix, kind="open_clip", width=width, layers=layers, heads=_heads(width), vocab_size=vocab,
                context_length=_shape(t, "positional_embedding", "text encoder")[0], mlp_ratio=hidden / width,
                embed_dim=embed)


def _infer_vae(v: dict[str, Tensor]) -> dict[str, Any]:
    if not v:
        raise ArchitectureError("cannot infer architecture: no VAE weights (first_stage_model.*)")
    ch, in_ch = _shape(v, "encoder.conv_in.weight", "VAE")[:2]
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    z = _shape(v, "decoder.conv_in.weight", "VAE")[1]
    dd = dict(double_z=_shape(v, "encoder.conv_out.weight", "VAE")[0] == 2 * z, z_channels=z, resolution=256,
              in_channels=in_ch, out_ch=_shape(v, "decoder.conv_out.weight", "VAE")[0], ch=ch,
              ch_mult=[_shape(v, f"encoder.down.{i}.block.0.conv2.weight", "VAE")[0] // ch for i in levels],
              num_res_blocks=len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")), attn_resolutions=[],
              dropout=0.0)
    return {"embed_dim": _shape(v, "post_quant_conv.weight", "VAE")[1], "ddconfig": dd}


def default_resolution(family: str, prediction: str) -> int:
    """The side the family was trained at (SD2: 768 for v-prediction, 512 for epsilon)."""
    return {"sd1": 512, "sd2": 768 if prediction == "v" else 512, "sdxl": 1024}[family]


def infer_text_encoders(sd: dict[str, Tensor], family: str) -> list[dict[str, Any]]:
    """One text-encoder config per ``TEXT_LAYOUT`` entry of ``family``, read off the file's shapes."""
    return [(_infer_hf_clip if kind == "hf_clip" else _infer_open_clip)(text_encoder_state(sd, family, fp), prefix)
            for prefix, fp, kind in TEXT_LAYOUT[family]]


def infer_config(sd: dict[str, Tensor]) -> dict[str, Any]:
    """Architecture config from tensor shapes alone (standard SD1/SD2/SDXL layouts, any width).

    ``prediction`` is "epsilon" here (SDXL: "v" when the file has a ``v_pred`` marker key); SD2's
    v-prediction is decided by :func:`.checkpoint.load_checkpoint` the way the WebUI does, by running the UNet.
    """
    family = infer_family(sd.keys())
    tes = infer_text_encoders(sd, family)
    unet = infer_unet(strip_prefix(sd, UNET_PREFIX), family)
    prediction = "v" if family == "sdxl" and "v_pred" in sd else "epsilon"
    cfg: dict[str, Any] = {"family": family, "unet": unet, "text_encoders": tes,
                           "vae": _infer_vae(strip_prefix(sd, VAE_PREFIX)),
                           "prediction": prediction, "scale_factor": SCALE_FACTOR[family], "schedule": dict(SCHEDULE),
                           "resolution": default_resolution(family, prediction)}
    if family == "sdxl":
        pooled = tes[1]["embed_dim"]
        extra = unet.get("adm_in_channels", 0) - pooled
        if extra <= 0 or extra % 6:
            raise ArchitectureError(f"cannot infer architecture: SDXL adm_in_channels {unet.get('adm_in_channels')} "
                                    f"is not pooled width {pooled} + 6 size embeddings")
        cfg["size_embed_dim"] = extra // 6
    return cfg


def text_encoder_state(sd: dict[str, Tensor], family: str, file_prefix: str) -> dict[str, Tensor]:
    """One text encoder's weights under ``file_prefix``, in the names its module class uses."""
    t = strip_prefix(sd, file_prefix)
    if file_prefix.endswith("transformer.") and not any(k.startswith("text_model.") for k in t):
        for old, new in _SD1_TE_RENAMES:
            t = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in t.items()}
    t.pop("text_model.embeddings.position_ids", None)  # a buffer, not a weight (often stored as float)
    if not t:
        raise ArchitectureError(f"cannot infer architecture: no {family} text-encoder weights under {file_prefix}*")
    return t


def merge_config(base: Any, override: Any) -> Any:
    """``override`` wins key by key; lists of dicts of equal length merge item by item."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge_config(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(override, list) and len(base) == len(override)
            and all(isinstance(x, dict) for x in base + override)):
        return [merge_config(b, o) for b, o in zip(base, override)]
    return copy.deepcopy(override)

