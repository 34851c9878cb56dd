"""OFT (block-diagonal orthogonal fine-tuning): the output channels of W, in blocks, are rotated.

Each block's rotation is the Cayley transform R = (I + Q)(I - Q)^-1 of the skew-symmetric
Q = B - B^T of a stored block B, with ||Q|| (over all blocks) limited to ``alpha * out``.
The merged weight is, per block k, R_k^T W_k (W_k: that block's rows), i.e. the rows are
mixed as ``einsum("k n m, k n ... -> k m ...")`` — LyCORIS's, sd-scripts' and the built-in's
layout.  Three stored forms:

- ``oft_blocks`` [blocks, size, size] (+ ``alpha``, optional ``rescale`` [out, 1, ...]):
  LyCORIS 2.1 and later; alpha 0 means unconstrained.
- ``oft_diag``: LyCORIS 2.0 stored R itself (any rescale already folded into its rows).
- ``kohya_oft_blocks`` (keymap's name for sd-scripts' ``oft_unet_*.oft_blocks``): the same
  blocks, but sd-scripts always clamps, ``Q * (min(||Q||, c) + 1e-8) / (||Q|| + 1e-8)``, so
  its alpha 0 leaves the layer (almost exactly) unchanged.

A weight m rotates by I + m (R - I) (LyCORIS and sd-scripts agree; the delta is m (R - I)^T W),
and ``rescale`` multiplies the result without being weighted, as LyCORIS does.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .base import AdapterError
from .rotation import OFTBase, cayley_step, limit_lycoris, limit_sd_scripts, rescaled, skew

BLOCK_ROLES = ("oft_blocks", "oft_diag", "kohya_oft_blocks")


class DiagOFT(OFTBase):
    algo = "oft"
    required = ()
    optional = (*BLOCK_ROLES, "rescale")

    @classmethod
    def claims_group(cls, tensors: Dict[str, Tensor]) -> bool:
        # 4-D oft_blocks are BOFT's; anything else with OFT blocks is ours (validate says what is wrong)
        if "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 4:
            return False
        return any(r in tensors for r in BLOCK_ROLES)

    @property
    def role(self) -> str:
        return next(r for r in BLOCK_ROLES if r in self.tensors)

    def validate(self) -> None:
        super().validate()
        present = [r for r in BLOCK_ROLES if r in self.tensors]
        if len(present) != 1:
            raise AdapterError(f"{self.name}: OFT needs exactly one of {', '.join(BLOCK_ROLES)}, got {present}")
        blocks = self.tensors[present[0]]
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or blocks.numel() == 0:
            raise AdapterError(f"{self.name}: {present[0]} must be [blocks, size, size], got {tuple(blocks.shape)}")
        if "rescale" in self.tensors and present[0] != "oft_blocks":
            raise AdapterError(f"{self.name}: rescale goes with LyCORIS's oft_blocks, not {present[0]}")
        if present[0] == "kohya_oft_blocks" and self.alpha is None:
            raise AdapterError(f"{self.name}: sd-scripts OFT needs its alpha (the constraint)")

    def _delta(self, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        role = self.role
        blocks = self.t(role, weight.device)
        n, b, _ = blocks.shape
        self._check_cover(weight, n, b)
        out = weight.shape[0]
        if role == "oft_diag":
            step = blocks - torch.eye(b, device=blocks.device)
        else:
            limit = limit_sd_scripts if role == "kohya_oft_blocks" else limit_lycoris
            step = cayley_step(limit(skew(blocks), self.constraint(out)))
        step = step * multiplier
        rows = weight.reshape(n, b, *weight.shape[1:])
        delta = torch.einsum("knm,kn...->km...", step, rows).reshape(weight.shape)
        rescale = self.t("rescale", weight.device) if "rescale" in self.tensors else None
        return rescaled(delta, weight, rescale, self.name)
