"""What the orthogonal adapters (OFT, BOFT) share: Cayley rotations, the norm limits, rescale.

Their deltas depend on the original weight (R W - W) and, for BOFT and rescale, not linearly
on the multiplier, so they compute the delta at the multiplier themselves (``linear = False``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Adapter, AdapterError


def skew(blocks: Tensor) -> Tensor:
    return blocks - blocks.transpose(-1, -2)


def limit_lycoris(q: Tensor, constraint: float) -> Tensor:
    """LyCORIS: scale Q down to norm ``constraint`` when it is larger (0: no limit)."""
    if constraint > 0:
        norm = float(q.norm()) + 1e-8
        if norm > constraint:
            return q * (constraint / norm)
    return q


def limit_sd_scripts(q: Tensor, constraint: float) -> Tensor:
    norm = float(q.norm())
    return q * ((min(norm, constraint) + 1e-8) / (norm + 1e-8))


def cayley_step(q: Tensor) -> Tensor:
    """R - I for the Cayley rotation R = (I + Q)(I - Q)^-1, i.e. 2 (I - Q)^-1 Q (the factors commute).

    Solving for R - I directly keeps small rotations exact instead of losing them to R - I's cancellation.
    """
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye - q, 2 * q)


def rescaled(delta: Tensor, weight: Tensor, rescale: Optional[Tensor], name: str) -> Tensor:
    """rescale * (W + delta) - W, as a delta (LyCORIS's per-output-channel factor)."""
    if rescale is None:
        return delta
    if rescale.numel() != weight.shape[0]:
        raise AdapterError(f"{name}: rescale of {rescale.numel()} does not fit {weight.shape[0]} output channels")
    s = rescale.reshape(-1, *[1] * (weight.dim() - 1))
    return s * delta + (s - 1) * weight


class OFTBase(Adapter):
    """What OFT and BOFT share: the delta depends on W and is not linear in the weight."""
    linear = False

    @property
    def needs_weight(self) -> bool:
        return True

    def validate(self) -> None:
        if self.dora_scale is not None:
            raise AdapterError(f"{self.name}: dora_scale is not defined for {self.algo}")

    def _check_cover(self, weight: Tensor, blocks: int, size: int) -> None:
        """Refuse a weight whose output channels the stored blocks do not cover."""
        if weight.dim() < 2:
            raise AdapterError(f"{self.name}: {self.algo} needs a linear or conv weight, got {tuple(weight.shape)}")
        if blocks * size != weight.shape[0]:
            raise AdapterError(f"{self.name}: {blocks} {self.algo.upper()} blocks of {size} do not cover "
                               f"{weight.shape[0]} output channels")

    def constraint(self, out: int) -> float:
        return (self.alpha or 0.0) * out
