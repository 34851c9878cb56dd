"""BOFT (butterfly OFT, LyCORIS 2.1+): m stages of block rotations with butterfly row shuffles.

``oft_blocks`` [m, blocks, size, size] (+ ``alpha`` as the constraint on the norm of all
skew parts together, optional ``rescale`` [out, 1, ...]).  Stage i pairs rows 2^i * size/2
apart: the rows are regrouped so that each block of ``size`` holds such pairs, rotated by
that stage's R (rows mixed as R W, not R^T W as in diag-OFT), and put back.  The weight
moves every stage towards identity, I + m (R_i - I), as LyCORIS's forward does, so the delta
is not linear in m; ``rescale`` multiplies the result unweighted.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .base import AdapterError
from .rotation import OFTBase, cayley_step, limit_lycoris, skew


class BOFT(OFTBase):
    algo = "boft"
    required = ()
    optional = ("oft_blocks", "rescale")

    @classmethod
    def claims_group(cls, tensors: Dict[str, Tensor]) -> bool:
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 4

    def validate(self) -> None:
        super().validate()
        m, n, b, b2 = self.tensors["oft_blocks"].shape
        if b != b2 or b % 2 or m == 0 or n == 0:
            raise AdapterError(f"{self.name}: BOFT oft_blocks must be [stages, blocks, size, size] with an even "
                               f"size, got {tuple(self.tensors['oft_blocks'].shape)}")
        if n % (2 ** (m - 1)):
            raise AdapterError(f"{self.name}: {m} butterfly stages need a multiple of {2 ** (m - 1)} blocks, got {n}")

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        blocks = self.t("oft_blocks", weight.device)
        m, n, b, _ = blocks.shape
        self._check_cover(weight, n, b)
        out, rest = weight.shape[0], weight.shape[1:]
        steps = cayley_step(limit_lycoris(skew(blocks), self.constraint(out)))  # R_i - I
        eye = torch.eye(b, device=steps.device)
        x = weight
        for i in range(m):
            stage = eye + multiplier * steps[i]
            k = 2 ** i * (b // 2)
            x = x.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(n, b, *rest)  # pairs k rows apart, together
            x = torch.einsum("bij,bj...->bi...", stage, x)
            x = x.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(out, *rest)
        if "rescale" in self.tensors:
            s = self.t("rescale", weight.device)
            if s.numel() != out:
                raise AdapterError(f"{self.name}: rescale of {s.numel()} does not fit {out} output channels")
            x = x * s.reshape(-1, *[1] * len(rest))
        return x - weight
