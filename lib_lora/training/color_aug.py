"""kohya's ``color_aug``: a small random colour change of an image, drawn anew each time it is trained.

sd-scripts' published behaviour (v0.10.1): each time an image is loaded, with probability 0.33
it is changed, half of those times by a hue shift drawn uniformly from +-8 of OpenCV's 180 hue
units (+-16 degrees), the other half by raising its 0-255 values to a power drawn uniformly from
[0.95, 1.05] (clipped to 255).  The same draws are made here, from the slot's own RNG
(``Batch.rng(slot, "color")``), so a resumed or multi-process run sees the same change; the
change works on the float pixels (no 8-bit rounding, as OpenCV's uint8 HSV has).  A hue shift is
a rotation of the HSV hue with saturation and value kept: each pixel keeps its largest and
smallest channel, and the middle one moves.  Latents cannot be cached while this is on.
"""
from __future__ import annotations

import random

import torch
from torch import Tensor

CHANCE = 0.33          # sd-scripts': how often an image is changed at all
HUE_LIMIT = 16.0       # degrees: sd-scripts' 8 of OpenCV's 180 hue units
GAMMA_RANGE = (0.95, 1.05)

ColorChange = tuple[str, float]   # ("hue", degrees) or ("gamma", exponent)


def draw(rng: random.Random) -> ColorChange | None:
    """The change for one image this time (None: left as it is), drawn as sd-scripts draws it."""
    if rng.random() > CHANCE:
        return None
    if rng.random() > 0.5:
        return "hue", rng.uniform(-HUE_LIMIT, HUE_LIMIT)
    return "gamma", rng.uniform(*GAMMA_RANGE)


def apply(pixels: Tensor, change: ColorChange | None) -> Tensor:
    """``pixels`` (CHW RGB in [-1, 1], the VAE's range) with ``change`` made."""
    if change is None:
        return pixels
    kind, amount = change
    x = (pixels.float() + 1) / 2
    if kind == "hue":
        x = rotate_hue(x, amount)
    elif kind == "gamma":   # sd-scripts' power of the 0-255 values, clipped at white
        x = ((x * 255).clamp(min=0) ** amount).clamp(max=255) / 255
    else:
        raise ValueError(f"unknown colour change {kind!r}")
    return (x * 2 - 1).to(pixels.dtype)


def rotate_hue(rgb: Tensor, degrees: float) -> Tensor:
    """RGB in [0, 1] (channels first) with every pixel's HSV hue turned by ``degrees``."""
    r, g, b = rgb.unbind(0)
    hi, _ = rgb.max(0)
    lo, _ = rgb.min(0)
    chroma = hi - lo
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # the hue in sixths of the circle, from whichever channel is largest
    sixth = torch.where(hi == r, ((g - b) / safe) % 6, torch.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = (sixth + degrees / 60) % 6
    # HSV back to RGB: channel n is hi - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1
    out = []
    for n in (5, 3, 1):
        k = (n + h) % 6
        out.append(hi - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out)
