"""A model's LoRA-able layers as the tools need them: shape, role, checkpoint key, diffusers name.

Built from the real module classes (on the ``meta`` device, so it costs no memory): from a
family's published config (``architectures.build``), from modules in memory (tests), or from a
single-file checkpoint's header (bake, extract), which also gives each layer's key in that file.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..families import UNET_FAMILIES
from ..modelmap import ModelMap, Target, open_clip_to_hf_name, ldm_unet_diffusers_names
from .common import ToolError

# diffusers pipeline component of each kohya prefix
COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_UNET_BLOCKS = {"SpatialTransformer": "attn", "ResBlock": "resnet", "Downsample": "resnet", "Upsample": "resnet"}


@dataclass(eq=False)
class Layer:
    target: Target
    shape: tuple[int, ...]              # the weight (or its q/k/v row slice) as the model holds it
    role: str                           # "attn" (UNet transformer), "resnet", "te" (attention/MLP), "other"
    diffusers: str | None               # module path in the diffusers/PEFT component
    file_key: str | None = None         # the weight's key in a checkpoint file
    bias_key: str | None = None

    @property
    def key(self) -> str:
        return self.target.key

    @property
    def component(self) -> str:
        return self.target.component

    @property
    def is_conv3(self) -> bool:
        """A conv with a spatial kernel (kohya's LoCon layers, ``conv_dim``)."""
        return len(self.shape) > 2 and any(d != 1 for d in self.shape[2:])


@dataclass
class Layout:
    family: str
    mm: ModelMap
    layers: list[Layer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_target = {id(l.target): l for l in self.layers}

    def get(self, key: str) -> Layer | None:
        """The layer a kohya (or alias) key names."""
        t = self.mm.get(key)
        return self._by_target.get(id(t)) if t is not None else None

    @classmethod
    def from_modules(cls, family: str, unet: nn.Module | None, text_encoders: list[tuple[str, nn.Module]]) -> "Layout":
        mm = ModelMap.build(family, unet, text_encoders)
        names: dict[int, str] = {}
        roles: dict[str, str] = {}
        diff: dict[str, str] = {}
        for _, root in text_encoders:
            names.update({id(m): n for n, m in root.named_modules()})
        if unet is not None:
            names.update({id(m): n for n, m in unet.named_modules()})
            diff = ldm_unet_diffusers_names(unet)
            for n, m in unet.named_modules():
                kind = _UNET_BLOCKS.get(type(m).__name__)
                if kind:
                    roles[n] = kind
        layers = []
        for t in mm.targets:
            name = names[id(t.module)]
            if name.endswith(".wrapped"):
                name = name[: -len(".wrapped")]
            shape = tuple(t.weight().shape)
            if t.component == "unet":
                role = next((roles[p] for p in _ancestors(name) if p in roles), "other")
                dotted = diff.get(name)
            else:
                role = "te" if ("_self_attn_" in t.key or "_mlp_" in t.key) else "other"
                if t.rows is not None:
                    hf = open_clip_to_hf_name(name)
                    dotted = f"{hf}.{'qkv'[t.rows.start // shape[0]]}_proj" if hf else None
                elif name.startswith("transformer.") or name in ("ln_final", "token_embedding"):
                    dotted = open_clip_to_hf_name(name)
                else:
                    dotted = name
            layers.append(Layer(t, shape, role, dotted))
        return cls(family, mm, layers)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


@functools.lru_cache(maxsize=3)
def for_family(family: str) -> Layout:
    """The published SD1.5 / SD2 / SDXL layout (shapes only)."""
    from ..architectures import build

    if family not in UNET_FAMILIES:
        raise ToolError(f"unknown family {family!r} ({', '.join(UNET_FAMILIES)})")
    parts = build(family, "meta")
    return Layout.from_modules(family, parts.unet, parts.text_encoders)


def from_checkpoint(tf) -> Layout:
    """The layout of a single-file checkpoint (a ``fileio.TensorFile``), with each layer's file key.

    Architecture comes from the tensor shapes, as ``hosts.cli`` infers it; the modules
    are built on the meta device only to name and classify the layers.
    """
    from ..hosts.cli.builders import build_text_encoder, build_unet
    from ..hosts.cli.config import (TEXT_LAYOUT, UNET_PREFIX, ArchitectureError, infer_family, infer_text_encoders,
                                    infer_unet, strip_prefix)

    sd = {k: torch.empty(tf.shape(k), dtype=tf.dtype(k), device="meta") for k in tf.keys()}
    try:
        family = infer_family(sd.keys())
        ucfg = infer_unet(strip_prefix(sd, UNET_PREFIX), family)
        tcfgs = infer_text_encoders(sd, family)
    except ArchitectureError as e:
        raise ToolError(f"{tf.path.name}: {e}") from None
    with torch.device("meta"):
        unet = build_unet(ucfg)
        tes = [(t["prefix"], build_text_encoder(t)) for t in tcfgs]
    layout = Layout.from_modules(family, unet, tes)
    prefixes = {p: fp for p, fp, _ in TEXT_LAYOUT[family]}
    names: dict[int, str] = {}
    for _, root in tes:
        names.update({id(m): n for n, m in root.named_modules()})
    names.update({id(m): n for n, m in unet.named_modules()})
    for layer in layout.layers:
        t = layer.target
        base = (UNET_PREFIX if t.component == "unet" else prefixes[t.component]) + names[id(t.module)]
        layer.file_key = _file_key(tf, f"{base}.{t.weight_name}")
        if t.bias_name and getattr(t.module, t.bias_name, None) is not None:
            layer.bias_key = _file_key(tf, f"{base}.{t.bias_name}")
        full = tuple(getattr(t.module, t.weight_name).shape)
        if layer.file_key is None or tuple(tf.shape(layer.file_key)) != full:
            raise ToolError(f"{tf.path.name}: layer {t.key} has no weight {base}.{t.weight_name} of shape {full}")
    return layout


def _file_key(tf, key: str) -> str | None:
    if key in tf:
        return key
    # merged SD1 files may lack the HF ``text_model.`` level (the WebUI reads them too)
    alt = key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.", 1)
    return alt if alt in tf else None
