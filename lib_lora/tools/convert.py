"""``convert``: kohya <-> diffusers/PEFT keys, SDXL's SGM <-> diffusers UNet spellings, dtypes.

kohya output keeps every algorithm's tensors under kohya module keys (LoRA factors reshaped to
the layer's own layout, a missing alpha written as the rank, which is the same scale).  diffusers
output is PEFT's ``<component>.<module path>.lora_A/lora_B.weight`` with the alphas in the
``lora_adapter_metadata`` header that diffusers' ``load_lora_weights`` reads; only plain
LoRA/LoCon has that form.  Other metadata is carried over.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..adapters.lora import LoRA
from ..fileio import save_safetensors
from ..network import load_network
from . import deltas, layout as layouts
from .common import STALE_KEYS, ToolError, cast, check_output
from .layout import COMPONENTS, Layer, Layout

TARGETS = ("kohya", "diffusers")


@dataclass
class ConvertResult:
    path: Path
    layers: int
    format: str


def _layout_lora(layer: Layer, role: str, t: Tensor) -> Tensor:
    """LoRA factors in the layer's own layout: [r, in, 1, 1] for a 1x1 conv, [r, in] for a linear."""
    if role not in ("lora_down.weight", "lora_up.weight") or t.dim() < 2:
        return t
    shape = layer.shape
    if role == "lora_down.weight":
        want = (t.shape[0], *shape[1:])
    else:
        want = (shape[0], t.shape[1], *([1] * (len(shape) - 2)))
    return t.reshape(want) if t.numel() == _numel(want) else t


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def kohya_key(layer: Layer, family: str, unet_names: str) -> str:
    """The kohya key: SDXL UNets in SGM or diffusers spelling, everything else canonical."""
    if layer.component != "unet" or family != "sdxl" or unet_names == "sgm":
        return layer.key
    if layer.diffusers is None:
        raise ToolError(f"{layer.key}: no diffusers module corresponds to this layer")
    return "lora_unet_" + layer.diffusers.replace(".", "_")


def convert(src: str | os.PathLike, out: str | os.PathLike, *, to: str = "kohya", unet_names: Optional[str] = None,
            dtype: torch.dtype | None = None, family: Optional[str] = None, layout: Layout | None = None,
            force: bool = False, log: Callable[[str], None] = print) -> ConvertResult:
    if to not in TARGETS:
        raise ToolError(f"unknown target format {to!r} ({', '.join(TARGETS)})")
    out = check_output(out, [src], force)
    net = load_network(src)
    layout = layout or layouts.for_family(deltas.common_family([net], family))
    pairs = deltas.bind(net, layout)
    meta = {k: v for k, v in net.metadata.items() if k not in STALE_KEYS}
    tensors: dict[str, Tensor] = {}
    if to == "kohya":
        names = unet_names or ("sgm" if layout.family == "sdxl" else "diffusers")
        if names not in ("sgm", "diffusers"):
            raise ToolError(f"unknown UNet spelling {names!r} (sgm, diffusers)")
        if names == "sgm" and layout.family != "sdxl":
            raise ToolError("the SGM UNet spelling is SDXL's; kohya names SD1/SD2 layers the diffusers way")
        for layer, a in pairs:
            key = kohya_key(layer, layout.family, names)
            for role, t in a.tensors.items():
                k = key
                if role == "kohya_oft_blocks":  # sd-scripts' networks.oft file: its own prefix and role
                    k, role = "oft_" + key[len("lora_"):], "oft_blocks"
                tensors[f"{k}.{role}"] = cast(_layout_lora(layer, role, t), dtype)
            if isinstance(a, LoRA) and a.alpha is None:
                tensors[f"{key}.alpha"] = cast(torch.tensor(float(a.rank())), dtype)  # no alpha = scale 1
    else:
        if unet_names not in (None, "diffusers"):
            raise ToolError("diffusers files always use diffusers module names")
        config: dict[str, dict[str, tuple[int, float]]] = {}
        for layer, a in pairs:
            if not isinstance(a, LoRA) or a.dora_scale is not None or "lora_mid.weight" in a.tensors:
                what = "DoRA" if a.dora_scale is not None else "a CP-decomposed conv" if isinstance(a, LoRA) else a.algo
                raise ToolError(f"{layer.key}: {what} has no diffusers/PEFT LoRA form; convert to kohya instead")
            if layer.diffusers is None:
                raise ToolError(f"{layer.key}: no diffusers module corresponds to this layer")
            comp = COMPONENTS[layer.component]
            base = f"{comp}.{layer.diffusers}"
            tensors[f"{base}.lora_A.weight"] = cast(_layout_lora(layer, "lora_down.weight",
                                                                 a.tensors["lora_down.weight"]), dtype)
            tensors[f"{base}.lora_B.weight"] = cast(_layout_lora(layer, "lora_up.weight",
                                                                 a.tensors["lora_up.weight"]), dtype)
            config.setdefault(comp, {})[layer.diffusers] = (a.rank(), a.alpha if a.alpha is not None else a.rank())
        meta["format"] = "pt"
        meta["lora_adapter_metadata"] = json.dumps(peft_metadata(config), sort_keys=True)
    save_safetensors(tensors, out, meta, overwrite=force)
    log(f"wrote {out}: {len(pairs)} layers as {to}")
    return ConvertResult(out, len(pairs), to)


def peft_metadata(config: dict[str, dict[str, tuple[int, float]]]) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata``: each component's LoraConfig with the prefix of its name
    (``unet.r``, ``unet.lora_alpha``, ...); layers off the common rank/alpha go in the patterns."""
    out: dict[str, object] = {}
    for comp, modules in config.items():
        r = Counter(v[0] for v in modules.values()).most_common(1)[0][0]
        alpha = Counter(v[1] for v in modules.values()).most_common(1)[0][0]
        out[f"{comp}.r"] = r
        out[f"{comp}.lora_alpha"] = _num(alpha)
        out[f"{comp}.target_modules"] = sorted(modules)
        out[f"{comp}.rank_pattern"] = {m: v[0] for m, v in sorted(modules.items()) if v[0] != r}
        out[f"{comp}.alpha_pattern"] = {m: _num(v[1]) for m, v in sorted(modules.items()) if v[1] != alpha}
    return out


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
