"""DoRA (weight-decomposed) merges: two strategies for turning a low-rank delta into the final change.

``lycoris`` (default) is LyCORIS's definition, which its trainers use: the magnitude vector is
stored per output channel ([out, 1, ...], or PEFT's [out]) or per input channel ([1, in, ...]),
the norm is taken along the stored orientation, and the multiplier interpolates the magnitude
scale, so weight 0 is the untouched layer and weight 1 is what was trained.

``webui`` reproduces the built-in Lora extension of WebUI 1.10.1 (network.py, ``finalize_updown``
and ``apply_weight_decompose``), for people reproducing an image made with it: the delta is scaled
by alpha/rank, always normalised per *input* channel whatever the stored shape (an [out, 1]
magnitude broadcasts against the [1, in] norm), and the whole decomposed difference is then
multiplied by the weight.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

# LyCORIS's definition lives with the adapter contract, the default every adapter falls back to.
# A strategy: (original weight, delta at multiplier 1, stored magnitude, multiplier, module name) -> delta.
from .base import AdapterError, DoraFn, dora_delta as lycoris_dora


def webui_dora(weight: Tensor, delta: Tensor, dora_scale: Tensor, multiplier: float, name: str) -> Tensor:
    """The built-in Lora's decomposition: per-input-channel norm, no epsilon, weight applied last."""
    if weight.dim() < 2:
        raise AdapterError(f"{name}: DoRA needs a 2-D or conv weight, got {tuple(weight.shape)}")
    merged = weight + delta
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    norm = norm.reshape(1, merged.shape[1], *[1] * (weight.dim() - 2))
    try:  # checked before any arithmetic: a magnitude of another rank would broadcast into a huge tensor
        fits = torch.broadcast_shapes(merged.shape, dora_scale.shape, norm.shape) == weight.shape
    except RuntimeError:  # the built-in skips such a layer after the same broadcasting error
        fits = False
    if not fits:
        raise AdapterError(f"{name}: dora_scale shape {tuple(dora_scale.shape)} does not broadcast against "
                           f"weight {tuple(weight.shape)} the way the built-in Lora applies it")
    decomposed = merged * (dora_scale / norm)
    return (decomposed - weight) * multiplier


STRATEGIES: Dict[str, DoraFn] = {"lycoris": lycoris_dora, "webui": webui_dora}
DEFAULT = "lycoris"


def strategy(name: str | None) -> DoraFn:
    """The strategy called ``name`` (None: the default); ValueError for an unknown one."""
    try:
        return STRATEGIES[name or DEFAULT]
    except KeyError:
        raise ValueError(f"unknown DoRA mode {name!r} (known: {', '.join(STRATEGIES)})") from None
